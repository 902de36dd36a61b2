"""``sigec edit`` and ``sigec demo`` on files the tests write: engine files (DDPM UNet, GauGAN
generator) and a diffusers pipeline folder; the pictures they write; sizes, labels and existing
outputs refused with what to do."""

import json

import pytest
import torch

from sigec.cli import main
from sigec.models.configs import DDPM_TINY, build
from sigec.pipelines import images
from sigec.runtime.masks import blob_mask

PICTURES = {"original.png", "edited.png", "mask.png", "generated.png", "result.png"}


@pytest.fixture(scope="module")
def ddpm_engine(tmp_path_factory):
    """A DDPM UNet engine file (exact policy: edits equal the dense run) and pictures for it."""
    tmp = tmp_path_factory.mktemp("ddpm")
    model, _, _ = build("ddpm-tiny", seed=0)
    torch.save(model.state_dict(), tmp / "unet.pth")
    argv = ["convert", str(tmp / "unet.pth"), "--config", "ddpm-tiny", "--out",
            str(tmp / "u.sigec"), "--set", "mask_policy='exact'", "--set", "cost_model=False",
            "--set", "mask_dilation=0"]  # fmt: skip
    assert main(argv) == 0
    img = images.demo_picture(32, 32)
    images.write_image(img, tmp / "a.png")
    mask = blob_mask(32, 32, 0.04, seed=1)
    images.write_mask(mask, tmp / "m.png")
    images.write_image(images.paint(img, mask, (20, 200, 60)), tmp / "b.png")
    return tmp


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_edit_a_ddpm_engine_with_a_mask_or_an_edited_picture(ddpm_engine, tmp_path, capsys):
    d = ddpm_engine
    out = tmp_path / "by-mask"
    argv = ["edit", str(d / "u.sigec"), "--image", str(d / "a.png"), "--mask", str(d / "m.png"),
            "--colour", "20", "200", "60", "--out", str(out), "--steps", "6",
            "--check-dense"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "SDEdit, 6 steps at strength 0.5, pixel space" in text and "speed-up" in text
    files = {p.name for p in out.iterdir()}
    assert PICTURES | {"dense.png", "error.png", "summary.json"} <= files
    assert any(f.startswith("tiles_32x32") for f in files)
    s = _summary(out)
    assert s["kind"] == "sdedit" and s["calls"] == 3  # 6 steps at strength 0.5
    assert s["max_error"] < 1e-3  # exact policy: the dense trajectory of the edited picture
    assert s["sparse_macs"] > 0  # exact on a 32x32 UNet: the edit spreads over the whole image
    # the edited picture instead of a mask: the same edit (its mask is the difference)
    out2 = tmp_path / "by-picture"
    argv2 = ["edit", str(d / "u.sigec"), "--image", str(d / "a.png"), "--edited",
             str(d / "b.png"), "--out", str(out2), "--steps", "6"]  # fmt: skip
    assert main(argv2) == 0
    r1 = images.read_image(out / "result.png")
    r2 = images.read_image(out2 / "result.png")
    assert torch.equal(r1, r2)
    # written pictures are never replaced without --force
    assert main(argv2) == 2
    err = capsys.readouterr().err
    assert "already has" in err and "--force" in err
    assert main([*argv2, "--force"]) == 0
    # per-step caches in host memory: the same result, the summary says where they were
    out3 = tmp_path / "host-caches"
    argv3 = [*argv2[:-4], "--out", str(out3), "--steps", "6", "--cache-device", "host"]
    assert main(argv3) == 0
    assert "of them in host memory" in capsys.readouterr().out
    assert torch.equal(images.read_image(out3 / "result.png"), r2)
    assert _summary(out3)["host_cache_bytes"] > 0


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda d: images.write_image(torch.zeros(1, 3, 16, 16), d / "small.png"), "resize"),
        (lambda d: None, "no such engine file"),
    ],
    ids=["wrong-size", "missing-engine"],
)
def test_edit_refuses_what_does_not_fit(ddpm_engine, tmp_path, capsys, change, words):
    d = ddpm_engine
    change(d)
    image = d / "small.png" if words == "resize" else d / "a.png"
    engine = d / "u.sigec" if words == "resize" else d / "missing.sigec"
    argv = ["edit", str(engine), "--image", str(image), "--mask", str(d / "m.png"), "--out",
            str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_edit_a_gaugan_engine_relabels_a_region(tmp_path, capsys):
    model, (labels,), _ = build("gaugan-tiny", seed=3)
    torch.save(model.state_dict(), tmp_path / "latest_net_G.pth")
    engine = tmp_path / "g.sigec"
    assert main(["convert", str(tmp_path / "latest_net_G.pth"), "--config", "gaugan-tiny",
                 "--out", str(engine), "--set", "mask_policy='exact'", "--set",
                 "cost_model=False"]) == 0  # fmt: skip
    images.write_label_map(labels, tmp_path / "labels.png")
    images.write_mask(blob_mask(*labels.shape[-2:], 0.05, seed=2), tmp_path / "m.png")
    base = ["edit", str(engine), "--image", str(tmp_path / "labels.png"), "--mask",
            str(tmp_path / "m.png"), "--out", str(tmp_path / "o"), "--check-dense"]  # fmt: skip
    assert main(base) == 2
    assert "needs --label" in capsys.readouterr().err
    assert main([*base, "--label", str(labels.shape[1])]) == 2  # one past the last class
    assert "classes 0 to" in capsys.readouterr().err
    assert main([*base, "--label", "1"]) == 0
    assert "label-map edit" in capsys.readouterr().out
    s = _summary(tmp_path / "o")
    assert s["kind"] == "labels" and s["max_error"] < 1e-3 and s["sparse_macs"] < s["dense_macs"]


def test_edit_a_diffusers_ddpm_pipeline_folder(tmp_path, capsys):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    DDPMPipeline(UNet2DModel(**DDPM_TINY), DDIMScheduler()).save_pretrained(tmp_path / "pipe")
    img = images.demo_picture(32, 32)
    images.write_image(img, tmp_path / "a.png")
    images.write_mask(blob_mask(32, 32, 0.04, seed=1), tmp_path / "m.png")
    argv = ["edit", str(tmp_path / "pipe"), "--image", str(tmp_path / "a.png"), "--mask",
            str(tmp_path / "m.png"), "--out", str(tmp_path / "o"), "--steps", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "SDEdit, 4 steps" in capsys.readouterr().out
    assert PICTURES <= {p.name for p in (tmp_path / "o").iterdir()}


def _tiny_sd_pipeline(folder):
    """A Stable Diffusion img2img pipeline folder of tiny parts: UNet, VAE, DDIM and a CLIP text
    encoder with a one-letter-per-token tokenizer the test writes itself."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sigec.models.sd import SD15_UNET_TINY, SD_VAE_TINY

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch], vocab[ch + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "tok").mkdir(parents=True)
    (folder / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                        model_max_length=8)  # fmt: skip
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))  # fmt: skip
    pipe = StableDiffusionImg2ImgPipeline(
        vae=AutoencoderKL(**SD_VAE_TINY), text_encoder=text, tokenizer=tok,
        unet=UNet2DConditionModel(**SD15_UNET_TINY), scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def test_edit_a_stable_diffusion_pipeline_folder_with_a_prompt(tmp_path, capsys):
    """The pipeline's text encoder, VAE and UNet from a diffusers folder: the encoder, every
    step and the decoder edited, against the dense pipeline."""
    pytest.importorskip("transformers")
    folder = _tiny_sd_pipeline(tmp_path)
    images.write_image(images.demo_picture(32, 32), tmp_path / "a.png")
    images.write_mask(blob_mask(32, 32, 0.05, seed=1), tmp_path / "m.png")
    argv = ["edit", str(folder), "--image", str(tmp_path / "a.png"), "--mask",
            str(tmp_path / "m.png"), "--prompt", "a cat", "--out", str(tmp_path / "o"), "--steps",
            "4", "--check-dense"]  # fmt: skip
    assert main(argv) == 0
    assert "latent (VAE) space" in capsys.readouterr().out
    s = _summary(tmp_path / "o")
    assert s["kind"] == "sdedit" and s["calls"] == 4  # encoder, 2 steps, decoder
    assert s["psnr"] > 25 and s["sparse_macs"] < s["dense_macs"]  # measured 41.5 dB, 1.39x
    small = tmp_path / "small.png"
    images.write_image(torch.zeros(1, 3, 16, 16), small)
    bad = [*argv[:3], str(small), *argv[4:9], str(tmp_path / "o2"), *argv[10:]]
    assert main(bad) == 2  # the pipeline takes 32x32 pictures
    assert "resize" in capsys.readouterr().err


def test_demo_writes_its_pictures_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert f"in {out}/" in text and "random weights" in text
    files = {p.name for p in out.iterdir()}
    assert PICTURES | {"dense.png", "error.png"} <= files
    assert any(f.startswith("tiles_") for f in files)
    result = images.read_image(out / "result.png")
    assert result.shape == (1, 3, 256, 256)  # the 32x32 model's pictures, enlarged to be seen
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 2  # not over its own pictures
    assert "--force" in capsys.readouterr().err
