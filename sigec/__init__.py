"""sigec: a compiler for spatially sparse incremental inference of image generative models."""

__version__ = "0.1.0"

from sigec import kernels  # noqa: E402,F401  (registers torch.ops.sigec.*)
from sigec.api import compile  # noqa: E402
from sigec.config import SparseConfig  # noqa: E402
from sigec.errors import (  # noqa: E402
    CaptureError,
    CheckpointError,
    EditReplacedError,
    InputMismatchError,
    MaskError,
    NotRecordedError,
    OutputExistsError,
    SigecError,
    StaleCacheError,
    TrajectoryChangedError,
)
from sigec.saving import load, save  # noqa: E402

__all__ = [
    "CaptureError",
    "CheckpointError",
    "EditReplacedError",
    "InputMismatchError",
    "MaskError",
    "NotRecordedError",
    "OutputExistsError",
    "SigecError",
    "SparseConfig",
    "StaleCacheError",
    "TrajectoryChangedError",
    "compile",
    "load",
    "save",
]


def __getattr__(name: str):
    """``sigec.pipelines`` on first use (the editing workflows import diffusers only when run)."""
    if name == "pipelines":
        import importlib

        return importlib.import_module("sigec.pipelines")
    raise AttributeError(f"module 'sigec' has no attribute {name!r}")
