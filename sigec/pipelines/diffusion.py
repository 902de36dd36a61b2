"""SDEdit with per-step caches: edit an image, re-run the same diffusion trajectory incrementally.

``SDEditor`` wraps a diffusers UNet (``UNet2DModel`` in pixel space, or ``UNet2DConditionModel``
with text embeddings and classifier-free guidance, batched), a diffusers scheduler (default
DDIM, deterministic) and optionally a VAE (``AutoencoderKL``: the image is encoded to latents
and the result decoded)::

    editor = sigec.pipelines.SDEditor(unet, scheduler, vae=vae, steps=30, strength=0.6)
    image = editor.generate(original, prompt_embeds=c, negative_prompt_embeds=u, seed=0)
    edited = editor.edit(painted)         # the same noise and timesteps, only the edit recomputed
    editor.commit()                       # the edit becomes the original of the next one

``generate`` runs the trajectory densely and records every UNet call in a slot of its own (one
per denoising step), and the VAE encoder and decoder in theirs. ``edit`` runs the same
trajectory (same start noise, same timesteps) with every call incremental. In the truncated
policy (SIGE's) every step and the decoder recompute one mask: the edited pixels (``mask``, or
where the image differs from the original), dilated by ``mask_dilation`` and max-pooled to the
latent; the trajectory outside it is the recorded one, an approximation of the dense trajectory
(measured: tests, docs/results.md). In the exact policy each call's mask is the difference of
its input, wherever the edit spread, and the edited trajectory equals the dense one.
The engines share one working set, so a step's edit replaces the previous step's: ``commit``
therefore runs the last edit once more, committing every step as it goes (or pass
``edit(..., commit=True)``). A changed prompt, strength, step count or seed raises
``TrajectoryChangedError``: call ``generate`` again.

``from_pipe(pipe)`` takes a diffusers Stable Diffusion pipeline's components (``unet``,
``scheduler``, ``vae``) and its prompt encoder.

Memory: ``cache_bytes(where)`` (every step's caches, the working sets). ``cache_device`` says
where the recorded caches live: ``"device"`` (default: all on the GPU; ``max_cache_bytes``
refuses a run that needs more), ``"host"`` (all in pinned host memory: each step's caches are
copied in while the previous step runs; the GPU holds the working sets and one staging copy), or
``"auto"`` (on the GPU up to ``max_cache_bytes``, the rest on the host: first the encoder's and
decoder's, which cost no copy per edit since they keep one slot each, then the last steps'). What
each costs is measured in docs/results.md (``benchmarks/sdedit.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import sigec
from sigec.config import SparseConfig
from sigec.errors import MaskError, NotRecordedError, SigecError, TrajectoryChangedError
from sigec.runtime.engine import SparseEngine
from sigec.runtime.masks import difference_mask, dilate
from sigec.runtime.offload import check_where

SIGE_SD = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 1}
CACHE_DEVICES = ("device", "host", "auto")  # where an editor's recorded caches live


class CacheBudgetError(SigecError, MemoryError):
    """A run's per-step caches would exceed ``max_cache_bytes``."""


@dataclass
class _Run:
    """What ``generate`` fixed: an edit must run the same trajectory."""

    key: tuple
    timesteps: list  # per step: the UNet's timestep input, [1] on the device
    noise: torch.Tensor
    cond: torch.Tensor | None  # [2 or 1, tokens, dim] encoder hidden states of the UNet call
    embeds: tuple  # (prompt_embeds, negative_prompt_embeds) as generate() got them
    image: torch.Tensor  # the original (the committed edit): edits' masks are differences to it
    steps_int: list  # per step: the timestep as an int (the scheduler's: no device sync)
    inpaint: torch.Tensor | None = None  # inpainting: bool [H, W], the region regenerated


class _Encode(torch.nn.Module):
    """An image -> its latents (the posterior's mean: deterministic), scaled like diffusers."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.mean * self.vae.config.scaling_factor


class _Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


class SDEditor:
    """See the module docstring.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (its device and dtype are the
            editor's).
        scheduler: a diffusers scheduler (copied); default DDIM with the UNet's training steps.
        vae: optional ``AutoencoderKL``; without it the UNet works on the image itself (DDPM).
        config: the ``SparseConfig`` of every engine (default: SIGE's settings).
        steps, strength: the SDEdit trajectory (steps of the full schedule; the share of it run).
        guidance_scale: classifier-free guidance (a conditional UNet with negative embeddings).
        encode_prompt: ``prompt -> (prompt_embeds, negative_prompt_embeds)`` for text prompts.
        max_cache_bytes: the most bytes of caches kept on the GPU (see ``cache_device``).
        cache_device: ``"device"``, ``"host"`` or ``"auto"``: where the recorded caches live.
        progress: show a progress bar over the steps (tqdm).
    """

    def __init__(self, unet, scheduler=None, vae=None, *, config: SparseConfig | None = None,
                 steps: int = 30, strength: float = 0.6, guidance_scale: float = 7.5,
                 encode_prompt=None, max_cache_bytes: int | None = None,
                 cache_device: str = "device", progress: bool = False):  # fmt: skip
        if scheduler is None:
            from diffusers import DDIMScheduler

            scheduler = DDIMScheduler(num_train_timesteps=1000)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength: expected a share of the trajectory in (0, 1], got "
                             f"{strength}")  # fmt: skip
        self.engines: dict[str, SparseEngine] = {}
        if isinstance(unet, SparseEngine):  # compiled already (an engine file): use it
            self.engines["unet"] = unet
            _, self.dtype, self.device = unet.program.image_meta
        else:
            unet.eval()
            param = next(unet.parameters())
            self.device, self.dtype = param.device, param.dtype
        self.unet, self.vae = unet, vae.eval() if vae is not None else None
        self.scheduler = copy.deepcopy(scheduler)
        if isinstance(unet, SparseEngine) and config is None:
            config = unet.config  # the engine's policy decides how edits are masked
        self.config = config or SparseConfig(**SIGE_SD)
        self.steps, self.strength, self.guidance_scale = steps, strength, guidance_scale
        self.encode_prompt = encode_prompt
        self.max_cache_bytes, self.progress = max_cache_bytes, progress
        self.cache_device = check_where(cache_device, CACHE_DEVICES, "cache_device")
        self._run: _Run | None = None
        self._last_edit = None  # (edited image, mask) of the last uncommitted edit

    @classmethod
    def from_pipe(cls, pipe, **kwargs) -> SDEditor:
        """An editor on a diffusers pipeline's UNet, scheduler, VAE and prompt encoder."""
        encode = None
        if hasattr(pipe, "encode_prompt"):

            def encode(prompt):
                cond, uncond = pipe.encode_prompt(prompt, pipe.device, 1, True)
                return cond, uncond

        return cls(pipe.unet, pipe.scheduler, getattr(pipe, "vae", None), encode_prompt=encode,
                   **kwargs)  # fmt: skip

    # -- the trajectory --------------------------------------------------------------------------

    def generate(self, image: torch.Tensor, prompt: str | None = None, *, prompt_embeds=None,
                 negative_prompt_embeds=None, strength: float | None = None,
                 steps: int | None = None, seed: int = 0,
                 inpaint: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Run the SDEdit trajectory densely from ``image`` ([1, 3, H, W] in [-1, 1]) and record
        every call; returns the generated image. ``inpaint`` (an inpainting UNet, 9 input
        channels): bool ``[H, W]``, the region to regenerate (default none)."""
        cond = self._conditioning(prompt, prompt_embeds, negative_prompt_embeds)
        steps = steps or self.steps
        strength = strength if strength is not None else self.strength
        self.scheduler.set_timesteps(steps)
        start = steps - min(steps, max(1, int(round(steps * strength))))
        ints = [int(t) for t in self.scheduler.timesteps[start:]]
        timesteps = [torch.tensor([t], device=self.device) for t in ints]
        image = image.to(device=self.device, dtype=self.dtype)
        latents = self._call("encode", image, record=True) if self.vae is not None else image
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=g).to(latents)
        key = (prompt, _digest(prompt_embeds), _digest(negative_prompt_embeds), steps, strength,
               seed)  # fmt: skip
        self._run = _Run(key, timesteps, noise, cond, (prompt_embeds, negative_prompt_embeds),
                         image, ints, self._region(inpaint, image))  # fmt: skip
        self._last_edit = None
        extra = self._inpaint_channels(
            image, self._run.inpaint, lambda m: self._call("encode", m, slot=1, record=True)
        )
        x = self.scheduler.add_noise(latents, noise, timesteps[0])
        for i, t in enumerate(self._steps(timesteps)):
            x = self._denoise(x, t, ints[i], self._unet(i, record=True), extra)
        out = self._call("decode", x, record=True) if self.vae is not None else x
        self.place_caches(self.cache_device)
        return out

    def edit(self, edited: torch.Tensor, prompt: str | None = None, *, mask=None,
             prompt_embeds=None, negative_prompt_embeds=None, strength=None, steps=None,
             seed: int = 0, commit: bool = False, observe=None,
             inpaint: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The trajectory of ``generate`` from the edited image, every call incremental.

        Args:
            edited: the edited image, like ``generate``'s.
            prompt: ``generate``'s prompt (same order of arguments as ``generate``).
            mask: optional bool ``[H, W]`` of the edited pixels (default: where it differs).
            inpaint: an inpainting UNet's region to regenerate (bool ``[H, W]``; default none);
                where it differs from the recorded region is recomputed too.
            prompt_embeds, ..., seed: must be ``generate``'s (they fix the trajectory).
            commit: make each step's edit its new original as it goes.
            observe: called as ``observe(name, engine, slot)`` after each call's edit (while
                its tiles and stats are the engine's last: the steps share one working set).
        """
        run = self._run
        if run is None:
            raise NotRecordedError("edit before generate: call editor.generate(image, ...) first")
        steps = steps or self.steps
        strength = strength if strength is not None else self.strength
        key = (prompt, _digest(prompt_embeds), _digest(negative_prompt_embeds), steps, strength,
               seed)  # fmt: skip
        if key != run.key:
            changed = [n for n, a, b in zip(("prompt", "prompt_embeds", "negative_prompt_embeds",
                                             "steps", "strength", "seed"), key, run.key,
                                            strict=True) if a != b]  # fmt: skip
            raise TrajectoryChangedError(
                f"{', '.join(changed)} differ from generate()'s: the cached trajectory is of "
                "another run; call editor.generate(...) with the new settings first"
            )
        edited = edited.to(device=self.device, dtype=self.dtype)
        region = self._region(inpaint, edited)
        pixels, latent = self._masks(edited, mask, region)
        if self.vae is not None:
            latents = self._call("encode", edited, mask=pixels, commit=commit, observe=observe)
        else:
            latents = edited
        extra = self._inpaint_channels(edited, region, lambda m: self._call(
            "encode", m, slot=1, mask=pixels, commit=commit, observe=observe))  # fmt: skip
        x = self.scheduler.add_noise(latents, run.noise, run.timesteps[0])
        for i, t in enumerate(self._steps(run.timesteps)):
            unet = self._unet(i, commit=commit, observe=observe, mask=latent,
                              next_slot=(i + 1) % len(run.timesteps))  # fmt: skip
            x = self._denoise(x, t, run.steps_int[i], unet, extra)
        out = x
        if self.vae is not None:
            out = self._call("decode", x, commit=commit, observe=observe, mask=latent)
        self._last_edit = None if commit else (edited, mask, inpaint)
        if commit:
            run.image, run.inpaint = edited, region
        return out

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: latents, the region's mask and the masked image's latents in."""
        engine = self.engines.get("unet")  # compiled (or given as an engine) first
        channels = engine.program.image_meta[0][1] if engine else self.unet.config.in_channels
        return channels == 9

    def _region(self, inpaint, image) -> torch.Tensor | None:
        """The inpainting region as bool ``[H, W]`` on the device (all False when not given)."""
        if not self.inpainting:
            if inpaint is not None:
                raise MaskError("inpaint=: this UNet is not an inpainting UNet (9 input "
                                "channels); edit the image instead")  # fmt: skip
            return None
        if self.vae is None:
            raise ValueError("an inpainting UNet needs its VAE (vae=...)")
        h, w = image.shape[-2:]
        if inpaint is None:
            return torch.zeros(h, w, dtype=torch.bool, device=self.device)
        if not isinstance(inpaint, torch.Tensor) or inpaint.dtype != torch.bool or tuple(
                inpaint.shape[-2:]) != (h, w):  # fmt: skip
            raise MaskError(f"inpaint: expected a bool tensor [{h}, {w}] (the image's size), got "
                            f"{getattr(inpaint, 'shape', type(inpaint).__name__)}")  # fmt: skip
        return inpaint.to(self.device).reshape(-1, h, w).any(0)

    def _inpaint_channels(self, image, region, encode) -> torch.Tensor | None:
        """An inpainting UNet's extra input: the region at the latent size and the latents of the
        image outside it (``encode(masked image)``; as diffusers' inpainting pipeline makes
        them), or None."""
        if region is None:
            return None
        latents = encode(image * (~region).to(image.dtype))
        small = torch.nn.functional.interpolate(region[None, None].to(image.dtype),
                                                size=latents.shape[-2:])  # fmt: skip
        return torch.cat([small.expand(latents.shape[0], 1, -1, -1), latents], dim=1)

    def _masks(self, edited: torch.Tensor, mask, region=None):
        """The encoder's mask (pixels) and every step's (latent pixels). Truncated policy: the
        edit's pixels (``mask``, or where ``edited`` differs from the original), dilated by
        ``mask_dilation``, and that mask max-pooled to the latent resolution for every step and
        the decoder, as SIGE does: the trajectory is recomputed there and kept elsewhere. Exact
        policy: None (each call's mask is the difference of its input, wherever it spread)."""
        if self.config.mask_policy != "truncated":
            return mask, None
        if mask is None:
            m = difference_mask(self._run.image, edited, self.config.mask_eps).any(0, keepdim=True)
        else:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise MaskError("mask: expected a bool torch.Tensor [H, W] of the edited pixels")
            if tuple(mask.shape[-2:]) != tuple(edited.shape[-2:]):
                raise MaskError(f"mask: shape {tuple(mask.shape)}, but the image is "
                                f"{tuple(edited.shape[-2:])}: pass the edited pixels at the "
                                "image's size")  # fmt: skip
            m = mask.to(edited.device).reshape(-1, *mask.shape[-2:]).any(0, keepdim=True)
        if region is not None:  # a changed inpainting region is an edit too
            m = m | (region != self._run.inpaint)[None]
        pixels = dilate(m, self.config.mask_dilation)
        if self.vae is None:
            return pixels, pixels
        latent_hw = self._run.noise.shape[-2:]
        latent = torch.nn.functional.adaptive_max_pool2d(pixels[None].float(), latent_hw)[0] > 0
        return pixels, latent

    def commit(self) -> None:
        """Make the last edit the original of the next (its trajectory runs once more, each
        step committed: the steps share one working set)."""
        if self._last_edit is None:
            return
        edited, mask, inpaint = self._last_edit
        run = self._run
        self.edit(edited, run.key[0], mask=mask, prompt_embeds=run.embeds[0],
                  negative_prompt_embeds=run.embeds[1], steps=run.key[3], strength=run.key[4],
                  seed=run.key[5], commit=True, inpaint=inpaint)  # fmt: skip

    def dense(self, image: torch.Tensor, modules: dict | None = None,
              inpaint: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The trajectory of the last ``generate``'s settings from ``image``, every call the dense
        model (no cache touched): the reference an edit approximates. ``modules`` replaces a
        part's dense program by a callable of the same inputs (``"unet"``: ``(x, t, **cond)``,
        ``"encode"``: image -> latents, ``"decode"``: latents -> image), e.g. a
        ``torch.compile``-d module as a baseline. ``inpaint``: an inpainting UNet's region."""
        run = self._run
        if run is None:
            raise NotRecordedError("dense before generate: call editor.generate(image, ...) first")
        calls = {part: (lambda *a, _p=part, **k: self._dense(_p, *a, **k))
                 for part in ("unet", "encode", "decode")}  # fmt: skip
        calls.update(modules or {})
        image = image.to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            latents = calls["encode"](image) if self.vae is not None else image
            extra = self._inpaint_channels(image, self._region(inpaint, image), calls["encode"])
            x = self.scheduler.add_noise(latents, run.noise, run.timesteps[0])
            for t, t_int in zip(self._steps(run.timesteps), run.steps_int, strict=True):
                unet = lambda *a, **k: sample_of(calls["unet"](*a, **k))  # noqa: E731
                x = self._denoise(x, t, t_int, unet, extra)
            return sample_of(calls["decode"](x)) if self.vae is not None else x

    def encoder(self):
        """The image -> latents module the editor compiles (None without a VAE)."""
        return _Encode(self.vae) if self.vae is not None else None

    def decoder(self):
        """The latents -> image module the editor compiles (None without a VAE)."""
        return _Decode(self.vae) if self.vae is not None else None

    def _dense(self, part: str, *args, **kwargs):
        return sample_of(self.engines[part].dense(*args, **kwargs))

    def cache_bytes(self, where: str | None = None) -> int:
        """Bytes of every recorded call's caches (all steps, encoder, decoder) and the engines'
        working sets; ``where="device"`` or ``"host"``: only those held there."""
        return sum(engine.cache_bytes(where) for engine in self.engines.values())

    def place_caches(self, cache_device: str) -> None:
        """Put the recorded caches where ``cache_device`` says (see the module docstring; what
        ``generate`` does with the editor's ``cache_device``). Raises ``CacheBudgetError`` when
        the caches kept on the GPU stay above ``max_cache_bytes``."""
        where = check_where(cache_device, CACHE_DEVICES, "cache_device")
        if self._run is None:
            raise NotRecordedError("place_caches before generate: call editor.generate first")
        slots = [(part, key) for part in ("encode", "decode") if part in self.engines
                 for key in self.engines[part].slots]  # fmt: skip
        steps = len(self._run.timesteps)
        slots += [("unet", str(i)) for i in reversed(range(steps))]  # the last steps first
        host = set(slots) if where == "host" else set()
        if where == "auto" and self.max_cache_bytes is not None:  # planned from sizes alone
            need = sum(e.live.nbytes() - e.live.staging.nbytes() for e in self.engines.values())
            need += sum(self.engines[p].slots[k].nbytes() for p, k in slots)
            for part, key in slots:
                if need <= self.max_cache_bytes:
                    break
                engine = self.engines[part]
                host.add((part, key))
                need -= engine.slots[key].nbytes()
                if len(engine.slots) > 1 and sum(p == part for p, _ in host) == 1:
                    need += engine.live.packed_bytes()  # its staging copy
        for part, key in sorted(slots, key=lambda s: s not in host):  # free the GPU first
            self.engines[part].place(key, "host" if (part, key) in host else "device")
        self.engines["unet"].prefetch(0)  # the first step of the next edit, if on the host
        self._check_budget()
        self.cache_device = where

    # -- one call --------------------------------------------------------------------------------

    def _denoise(self, x, t, t_int: int, unet, extra=None):
        """One scheduler step from ``x`` at ``t`` (the UNet's input; ``t_int`` the scheduler's);
        ``unet(x_in, t, **cond)`` runs the UNet (as a recorded, an edited or the dense call);
        ``extra``: channels appended to its input (inpainting)."""
        cond = self._run.cond
        guided = cond is not None and cond.shape[0] == 2
        inp = torch.cat([x, x]) if guided else x
        if extra is not None:
            inp = torch.cat([inp, extra.expand(inp.shape[0], -1, -1, -1)], dim=1)
        kwargs = {"encoder_hidden_states": cond} if cond is not None else {}
        eps = unet(inp, t, **kwargs)
        if guided:
            uncond, text = eps.chunk(2)
            eps = uncond + self.guidance_scale * (text - uncond)
        return self.scheduler.step(eps, t_int, x).prev_sample

    def _unet(self, step: int, record=False, commit=False, observe=None, mask=None,
              next_slot=None):  # fmt: skip
        return lambda *a, **k: self._call("unet", *a, slot=step, record=record, commit=commit,
                                          observe=observe, mask=mask, next_slot=next_slot,
                                          **k)  # fmt: skip

    def _call(self, part: str, *args, slot=0, record=False, commit=False, mask=None, observe=None,
              next_slot=None, **kwargs):  # fmt: skip
        engine = self.engines.get(part)
        if engine is None:
            module = {"unet": self.unet, "encode": self.encoder(), "decode": self.decoder()}[part]
            engine = self.engines[part] = sigec.compile(module, args, kwargs, config=self.config)
        if record:
            out = engine.record(*args, slot=slot, **kwargs)
        else:
            out = engine.edit(*args, slot=slot, mask=mask, next_slot=next_slot, **kwargs)
            if observe is not None:
                observe(part if part != "unet" else f"unet step {slot}", engine, slot)
            if commit:
                engine.commit(slot=slot)
        return sample_of(out)

    def _conditioning(self, prompt, embeds, negative):
        if prompt is not None:
            if self.encode_prompt is None:
                raise ValueError("a text prompt needs encode_prompt= (or from_pipe(pipe)); "
                                 "or pass prompt_embeds")  # fmt: skip
            embeds, negative = self.encode_prompt(prompt)
        if embeds is None:
            return None
        embeds = embeds.to(device=self.device, dtype=self.dtype)
        if negative is None or self.guidance_scale == 1.0:
            return embeds
        return torch.cat([negative.to(embeds), embeds])

    def _steps(self, timesteps):
        if not self.progress:
            return timesteps
        from tqdm import tqdm

        return tqdm(timesteps, desc="sigec", unit="step")

    def _check_budget(self) -> None:
        need = self.cache_bytes("device")
        if self.max_cache_bytes is not None and need > self.max_cache_bytes:
            hint = ("cache_device='auto' or 'host' keeps caches in host memory"
                    if self.cache_device == "device" else
                    "the working sets alone exceed it")  # fmt: skip
            raise CacheBudgetError(
                f"the run's caches need {need / 2**20:.0f} MiB on the GPU, above max_cache_bytes "
                f"({self.max_cache_bytes / 2**20:.0f} MiB): {hint}; or use fewer steps, a lower "
                "strength or a smaller image"
            )


def _digest(t) -> tuple | None:
    """A cheap fingerprint of a tensor argument (shape and a few sums), to notice a change."""
    if t is None:
        return None
    t = t.detach().float()
    return (tuple(t.shape), round(float(t.sum()), 4), round(float((t * t).sum()), 4))


def sample_of(out):
    """A diffusers output's ``.sample`` (a plain tensor as it is)."""
    return out.sample if hasattr(out, "sample") else out
