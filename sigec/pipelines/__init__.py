"""Editing workflows: SDEdit over a diffusion trajectory with per-step caches (``SDEditor``),
label-map editing for GauGAN (``LabelMapEditor``), and the pictures they read and write
(``images``)."""

from sigec.pipelines.diffusion import CacheBudgetError, SDEditor
from sigec.pipelines.labels import LabelMapEditor

__all__ = ["CacheBudgetError", "LabelMapEditor", "SDEditor"]
