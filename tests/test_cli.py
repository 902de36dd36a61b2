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
