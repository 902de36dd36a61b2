"""Tests for sigec/models/spade.py: the official layout, size, and checkpoint loading."""

import pytest
import torch

from sigec.errors import CheckpointError
from sigec.models.configs import GAUGAN_CITYSCAPES, GAUGAN_TINY
from sigec.models.spade import SPADEGenerator, load_generator, random_label_map

OFFICIAL_KEYS = [  # a sample of the official SPADEGenerator state-dict keys
    "fc.weight",
    "head_0.conv_0.weight_orig",
    "head_0.conv_0.weight_u",
    "head_0.conv_0.weight_v",
    "head_0.norm_0.param_free_norm.running_mean",
    "head_0.norm_0.mlp_shared.0.weight",
    "head_0.norm_0.mlp_gamma.weight",
    "head_0.norm_0.mlp_beta.bias",
    "up_0.conv_s.weight_orig",
    "up_0.norm_s.mlp_shared.0.bias",
    "up_3.conv_1.bias",
    "conv_img.weight",
]


def test_cityscapes_generator_size_and_keys():
    with torch.device("meta"):
        model = SPADEGenerator(GAUGAN_CITYSCAPES)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 1) == 93.0  # SIGE reports 93 M
    keys = set(model.state_dict())
    assert set(OFFICIAL_KEYS) <= keys
    assert model.output_size() == (256, 512)


def test_tiny_generator_runs_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SPADEGenerator(GAUGAN_TINY).eval()
    seg = random_label_map(GAUGAN_TINY)
    assert seg.shape == (1, 6, 32, 64) and torch.equal(seg.sum(1), torch.ones(1, 32, 64))
    with torch.no_grad():
        y = model(seg)
    assert y.shape == (1, 3, 32, 64)
    path = tmp_path / "latest_net_G.pth"
    torch.save(model.state_dict(), path)
    loaded = load_generator(path, GAUGAN_TINY)
    with torch.no_grad():
        torch.testing.assert_close(loaded(seg), y)


def test_bad_checkpoints_are_typed_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_generator(tmp_path / "missing.pth", GAUGAN_TINY)
    bad = tmp_path / "truncated.pth"
    torch.save(SPADEGenerator(GAUGAN_TINY).state_dict(), bad)
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_generator(bad, GAUGAN_TINY)
    other = tmp_path / "other.pth"
    torch.save(SPADEGenerator(GAUGAN_TINY).state_dict(), other)
    with pytest.raises(CheckpointError, match="does not match"):
        load_generator(other, GAUGAN_CITYSCAPES)
