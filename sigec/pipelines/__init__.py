"""Editing workflows built on diffusers schedulers (SDEdit, inpainting, label-map editing)."""
