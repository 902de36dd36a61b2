"""The import rules, checked by import-linter: one-way layers (kernels <- runtime <- passes <-
api/cli), a compiler layer that builds no model and runs no engine, analyses that read only the
layout vocabulary, independent pass families (``pyproject.toml``)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_holds():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    out = subprocess.run([exe, str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert contracts >= 4 and f"{contracts} kept, 0 broken" in out.stdout


def test_kernels_import_only_torch_and_triton():
    """Kernels depend on torch, triton and the standard library only: no numpy, no other sigec
    layer, so the package can be lifted into another project as is."""
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    for path in (ROOT / "sigec" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                ok = name.split(".")[0] in allowed or name.startswith("sigec.kernels")
                assert ok, f"{path.name}:{node.lineno} imports {name}"
