"""sigec/pipelines/workflow.py: one edit end to end (what ``sigec edit`` runs), on workflows the
CLI tests do not reach: a Stable Diffusion inpainting UNet with its VAE, and one plain call."""

import torch

import sigec
from sigec.models.configs import MODELS, build
from sigec.models.sd import SD15_UNET_TINY, SD_VAE_TINY
from sigec.pipelines import SDEditor, workflow
from sigec.runtime.masks import blob_mask

EXACT = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4}, cost_model=False)


def test_an_inpainting_edit_matches_the_dense_inpainting_and_writes_pictures(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD15_UNET_TINY, "in_channels": 9}).eval()
    vae = AutoencoderKL(**SD_VAE_TINY).eval()
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    editor = SDEditor(unet, vae=vae, config=EXACT, steps=4, strength=1.0, guidance_scale=3.0)
    flow = workflow.SDEditFlow(editor, prompt_embeds=cond, negative_prompt_embeds=uncond)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    region = blob_mask(32, 32, 0.08, seed=4)
    assert flow.input_size() == ((32, 32), 3) and flow.describe().startswith("inpainting")
    report = workflow.run_edit(flow, img, img, region, check_dense=True)
    assert report.max_error < 1e-3 and report.calls == 1 + 1 + 4 + 1  # encode x2, steps, decode
    written = {p.name for p in report.write(tmp_path)}
    assert {"mask.png", "result.png", "dense.png", "error.png", "summary.json"} <= written


def test_one_call_of_a_vae_decoder_engine():
    model, (z,), _ = build("sd-vae-decoder-tiny", seed=0)
    sige = MODELS["sd-vae-decoder-tiny"].sige_config
    config = sigec.SparseConfig(mask_policy="exact", cost_model=False, **sige)
    engine = sigec.compile(model, (z,), config=config)
    flow = workflow.CallFlow(engine)
    assert workflow.engine_kind(engine) == "call"
    edited = z.clone()
    edited[..., 2:5, 2:6] += 1.0
    report = workflow.run_edit(flow, z, edited, check_dense=True)
    assert report.max_error < 1e-4  # exact: the dense decoder on the edited latents
    assert any(k.startswith("tiles_") for k in report.pictures)
    config = sigec.SparseConfig(cost_model=False, **sige)  # truncated: less work
    flow = workflow.CallFlow(model, config=config)
    report = workflow.run_edit(flow, z, edited, check_dense=True)
    assert report.sparse_macs < report.dense_macs and report.psnr > 20
