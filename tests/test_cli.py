"""Tests for sigec/cli.py through the installed console script and in-process."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sigec
from sigec.cli import edit_input, is_label_map, main
from sigec.models.configs import MODELS


def test_console_script_version_and_help():
    out = subprocess.run([sys.executable, "-m", "sigec.cli", "--version"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == f"sigec {sigec.__version__}"
    out = subprocess.run([sys.executable, "-m", "sigec.cli", "--help"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert "usage: sigec" in out.stdout and "mask" in out.stdout


def test_mask_command_reports_area_and_tiles(capsys):
    assert main(["mask", "--size", "64", "64", "--fraction", "0.05", "--seed", "1"]) == 0
    line = capsys.readouterr().out
    assert "64x64 mask, seed 1: 5.0" in line and "tiles of 6x6 active" in line


def test_demo_command_compiles_edits_and_reports(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the demo writes its pictures into a new folder here
    assert main(["demo", "--model", "convnet-missing"]) == 2
    assert "unknown model" in capsys.readouterr().out
    assert main(["demo", "--model", "ddpm-tiny", "--fraction", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "ddpm-tiny: compiled" in out and "x fewer" in out and "PSNR" in out
    assert main(["demo", "--model", "gaugan-tiny", "--fraction", "0.05"]) == 0
    assert "a label change" in capsys.readouterr().out  # a label map: a label edit, not noise
    assert main(["demo", "--model", "ddpm-tiny", "--fraction", "0"]) == 0
    assert "edit 0.000 G (nothing recomputed)" in capsys.readouterr().out
    assert main(["demo", "--model", "gaugan-tiny", "--policy", "exact"]) == 0
    out = capsys.readouterr().out
    # the exact policy matches the dense model: the error is float rounding only
    err = float(out.split("max error ")[1].split(",")[0])
    assert err < 1e-4
    # every run its own folder, nothing overwritten
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["sigec-demo", "sigec-demo-2", "sigec-demo-3", "sigec-demo-4"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--fraction", "1.5"], "--fraction: expected a share of the image from 0 to 1"),
        (["demo", "--fraction", "-0.1"], "--fraction: expected a share of the image from 0 to 1"),
        (["mask", "--size", "0", "0"], "--size: expected a positive integer, got 0"),
        (["mask", "--tile", "0"], "--tile: expected a positive integer, got 0"),
    ],
)
def test_bad_arguments_are_refused_with_what_to_do(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_demo_help_lists_the_models(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in MODELS)


def test_label_maps_get_label_edits():
    x = torch.zeros(1, 3, 8, 8)
    x[:, 0] = 1
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:5] = True
    y = edit_input(x, mask, seed=0)
    assert is_label_map(y) and not torch.equal(y[:, :, mask], x[:, :, mask])
    assert torch.equal(y[:, :, ~mask], x[:, :, ~mask])


def test_benchmark_scripts_run_as_files_from_anywhere(tmp_path):
    """docs/ says ``python benchmarks/fidelity_table.py``: it must run as a file, not only with
    the repository root on the path."""
    root = Path(__file__).resolve().parents[1]
    for script in ("fidelity_table.py", "interactive.py"):
        out = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--help"],
                             capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr[-500:]


def test_convert_a_diffusers_folder_and_a_state_dict(tmp_path, capsys):
    """Checkpoints the test writes itself: a UNet2DModel folder (save_pretrained) and a GauGAN
    state dict with its named config; both become engine files that load and edit like the
    model compiled in memory."""
    from diffusers import UNet2DModel

    from sigec.models.configs import DDPM_TINY, build
    from tests.masks_for_tests import apply_edit, edit_masks

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_TINY).eval()
    unet.save_pretrained(tmp_path / "unet")
    assert main(["convert", str(tmp_path / "unet"), "--out", str(tmp_path / "u.sigec")]) == 0
    assert "UNet2DModel from" in capsys.readouterr().out
    x = torch.randn(1, 3, 32, 32)
    t = torch.tensor([500])
    engine = sigec.load(tmp_path / "u.sigec")
    engine.record(x, t)
    xe = apply_edit(x, edit_masks(32, 32)["blob"], seed=1)
    direct = sigec.compile(unet, (x, t), config=engine.config)
    direct.record(x, t)
    assert torch.equal(engine.edit(xe, t).sample, direct.edit(xe, t).sample)

    model, args, _ = build("gaugan-tiny", seed=3)
    torch.save(model.state_dict(), tmp_path / "latest_net_G.pth")
    out = tmp_path / "g.sigec"
    argv = ["convert", str(tmp_path / "latest_net_G.pth"), "--config", "gaugan-tiny", "--out",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    engine = sigec.load(out)
    with torch.no_grad():
        torch.testing.assert_close(engine.record(*args), model(*args), rtol=1e-4, atol=1e-5)
    assert main(argv) == 2  # the engine file exists: refused without --force
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


@pytest.mark.parametrize(
    "make, argv, words",
    [
        (
            lambda p: p.write_bytes(b"\x80\x02garbage"),
            ["--config", "gaugan-tiny"],
            "not a readable state dict",
        ),
        (
            lambda p: torch.save({"nope": torch.zeros(2)}, p),
            ["--config", "gaugan-tiny"],
            "does not fit the gaugan-tiny model",
        ),
        (lambda p: torch.save({"nope": torch.zeros(2)}, p), [], "say which model it is"),
        (lambda p: torch.save({"nope": torch.zeros(2)}, p), ["--config", "nonsense"], "unknown"),
    ],
    ids=["corrupt", "wrong-model", "no-config", "unknown-config"],
)
def test_convert_refuses_bad_checkpoints_and_says_why(tmp_path, capsys, make, argv, words):
    ckpt = tmp_path / "model.pth"
    make(ckpt)
    assert main(["convert", str(ckpt), "--out", str(tmp_path / "x.sigec"), *argv]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x.sigec").exists()
