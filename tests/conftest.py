"""Test setup: Triton kernels run in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module that defines a ``@triton.jit`` kernel is imported,
so it is set here, at collection start, and only when CUDA is absent (on a GPU the kernels compile).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
