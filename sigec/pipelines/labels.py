"""Label-map editing (GauGAN / SPADE): change a region's class, get the image, incrementally.

    editor = sigec.pipelines.LabelMapEditor(generator)        # an nn.Module or an engine
    image = editor.generate(label_map)                         # one-hot [1, classes, H, W]
    edited = editor.edit(editor.relabel(label_map, mask, c))   # only the changed region runs
    editor.commit()

The generator is compiled on the first ``generate`` (or taken as a ``SparseEngine``, e.g. from
``sigec.load``); its edit mask is the set of pixels whose label changed.
"""

from __future__ import annotations

import torch

import sigec
from sigec.config import SparseConfig
from sigec.errors import MaskError, NotRecordedError
from sigec.runtime.engine import SparseEngine

SIGE_GAUGAN = {"block_size": {"3x3": 6, "1x1": 4}, "mask_dilation": 1}


class LabelMapEditor:
    """See the module docstring."""

    def __init__(self, generator, config: SparseConfig | None = None):
        self.config = config or SparseConfig(**SIGE_GAUGAN)
        is_engine = isinstance(generator, SparseEngine)
        self.engine = generator if is_engine else None
        self.model = None if is_engine else generator.eval()
        self._recorded = False

    def generate(self, label_map: torch.Tensor) -> torch.Tensor:
        """The image of ``label_map`` (one-hot ``[1, classes, H, W]``), recorded for edits."""
        _check_one_hot(label_map)
        if self.engine is None:
            self.engine = sigec.compile(self.model, (label_map,), config=self.config)
        self._recorded = True
        return self.engine.record(label_map)

    def edit(self, label_map: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The image of the edited ``label_map``; ``mask`` (bool ``[H, W]``) defaults to the
        pixels whose label changed."""
        if not self._recorded:
            raise NotRecordedError("edit before generate: call editor.generate(label_map) first")
        _check_one_hot(label_map)
        return self.engine.edit(label_map, mask=mask)

    def commit(self) -> None:
        self.engine.commit()

    @staticmethod
    def relabel(label_map: torch.Tensor, mask: torch.Tensor, label: int) -> torch.Tensor:
        """``label_map`` with every pixel of ``mask`` set to class ``label``."""
        classes = label_map.shape[1]
        if not 0 <= label < classes:
            raise MaskError(f"label {label}: the map has classes 0 to {classes - 1}")
        onehot = torch.zeros_like(label_map)
        onehot[:, label] = 1
        return torch.where(mask.to(label_map.device), onehot, label_map)


def _check_one_hot(label_map: torch.Tensor) -> None:
    if label_map.dim() != 4 or not bool((label_map.sum(1) == 1).all()):
        raise MaskError(
            f"label map: expected a one-hot [N, classes, H, W] map (one class per pixel), got "
            f"shape {tuple(label_map.shape)}; pipelines.images.read_label_map makes one"
        )
