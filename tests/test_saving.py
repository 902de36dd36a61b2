"""sigec/saving.py: engine files round-trip bit for bit, load in a process without diffusers, and
refuse what they cannot trust (corrupt, truncated, another format or torch); saves never lose
an existing file."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import sigec
from sigec.models.configs import MODELS, build
from tests.masks_for_tests import apply_edit, edit_masks


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


def _engine(name):
    model, args, kwargs = build(name, seed=0)
    return sigec.compile(model, args, kwargs, config=sigec.SparseConfig(**MODELS[name].sige_config)
                         ), args, kwargs  # fmt: skip


@pytest.mark.parametrize("name", ["ddpm-tiny", "gaugan-tiny", "sd15-unet-tiny"])
def test_a_saved_engine_edits_bit_for_bit_like_the_original(name, tmp_path):
    engine, args, kwargs = _engine(name)
    path = sigec.save(engine, tmp_path / f"{name}.sigec")
    loaded = sigec.load(path)
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"], seed=1)
    for e in (engine, loaded):
        e.record(*args, **kwargs)
    got = loaded.edit(xe, *args[1:], **kwargs)
    want = engine.edit(xe, *args[1:], **kwargs)
    assert torch.equal(_sample(got), _sample(want))
    assert type(got) is type(want)  # the library's output class, where it is imported
    assert loaded.config == engine.config


def test_a_fresh_process_without_diffusers_loads_and_edits(tmp_path):
    engine, args, kwargs = _engine("sd15-unet-tiny")
    path = sigec.save(engine, tmp_path / "unet.sigec")
    x = args[0]
    xe = apply_edit(x, edit_masks(*x.shape[-2:])["blob"], seed=1)
    engine.record(*args, **kwargs)
    want = _sample(engine.edit(xe, *args[1:], **kwargs))
    torch.save({"args": args, "kwargs": kwargs, "xe": xe, "want": want}, tmp_path / "io.pt")
    script = f"""
import sys, torch, sigec
e = sigec.load({str(path)!r})
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
e.record(*io["args"], **io["kwargs"])
out = e.edit(io["xe"], *io["args"][1:], **io["kwargs"])
assert "diffusers" not in sys.modules, "loading imported diffusers"
assert type(out).__name__ == "ModelOutput" and torch.equal(out.sample, io["want"])
assert torch.equal(out["sample"], io["want"])
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=root, env={"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1",
                                        "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-1500:]


def _rewrite(path: Path, out: Path, edit) -> Path:
    """A copy of an engine file with ``edit(name, data) -> data`` applied to each entry."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, edit(name, src.read(name)))
    return out


def test_corrupt_truncated_foreign_and_other_version_files_are_refused(tmp_path):
    engine, _, _ = _engine("ddpm-tiny")
    path = sigec.save(engine, tmp_path / "e.sigec")

    def flip(name, data):  # one weight byte changed
        if name != "weights.safetensors":
            return data
        return data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:]

    def torch_version(name, data):
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["torch"] = "1.13.1"
        return json.dumps(m).encode()

    def format_version(name, data):
        if name != "manifest.json":
            return data
        m = json.loads(data)
        m["format_version"] = 99
        return json.dumps(m).encode()

    truncated = tmp_path / "cut.sigec"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    foreign = tmp_path / "foreign.sigec"
    foreign.write_bytes(b"not an engine" * 100)
    cases = {
        _rewrite(path, tmp_path / "flip.sigec", flip): "is corrupt",
        truncated: "not a whole sigec engine file",
        foreign: "not a whole sigec engine file",
        _rewrite(path, tmp_path / "torch.sigec", torch_version): "made with torch 1.13.1",
        _rewrite(path, tmp_path / "fmt.sigec", format_version): "format 99",
        tmp_path / "missing.sigec": "no such file",
    }
    for bad, words in cases.items():
        with pytest.raises(sigec.CheckpointError, match=words):
            sigec.load(bad)
    sigec.load(path)  # the original is untouched and still loads


def test_saving_never_overwrites_or_loses_an_existing_file(tmp_path, monkeypatch):
    engine, _, _ = _engine("ddpm-tiny")
    path = tmp_path / "e.sigec"
    path.write_bytes(b"the user's file")
    with pytest.raises(sigec.OutputExistsError, match="overwrite=True"):
        sigec.save(engine, path)
    assert path.read_bytes() == b"the user's file"

    def broken(tensors):
        raise RuntimeError("disk full")

    monkeypatch.setattr("sigec.saving._safetensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sigec.save(engine, path, overwrite=True)
    assert path.read_bytes() == b"the user's file"  # a failed save leaves it as it was
    assert [p.name for p in tmp_path.iterdir()] == ["e.sigec"]  # and no temporary file
    monkeypatch.undo()
    sigec.save(engine, path, overwrite=True)
    sigec.load(path)
