"""Tests for sigec/cli.py through the installed console script and in-process."""

import subprocess
import sys

import sigec
from sigec.cli import main


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


def test_demo_command_compiles_edits_and_reports(capsys):
    assert main(["demo", "--model", "convnet-missing"]) == 2
    assert "unknown model" in capsys.readouterr().out
    assert main(["demo", "--model", "gaugan-tiny", "--fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "gaugan-tiny: compiled" in out and "x fewer" in out and "PSNR" in out
    assert main(["demo", "--model", "gaugan-tiny", "--policy", "exact"]) == 0
    out = capsys.readouterr().out
    # the exact policy matches the dense model: the error is float rounding only
    err = float(out.split("max error ")[1].split(",")[0])
    assert err < 1e-4
