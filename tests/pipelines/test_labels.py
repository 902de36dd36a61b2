"""sigec/pipelines/labels.py: a label edit recomputes the relabelled region only."""

import pytest
import torch

import sigec
from sigec.models.configs import build
from sigec.pipelines import LabelMapEditor
from sigec.runtime.masks import blob_mask


def test_relabelling_a_region_equals_the_generator_on_the_new_map():
    model, (labels,), _ = build("gaugan-tiny", seed=0)
    exact = sigec.SparseConfig(mask_policy="exact", block_size={"3x3": 4, "1x1": 4},
                               cost_model=False)  # fmt: skip
    editor = LabelMapEditor(model, config=exact)
    editor.generate(labels)
    mask = blob_mask(*labels.shape[-2:], 0.05, seed=2)
    edited = editor.relabel(labels, mask, 3)
    assert (edited[0, 3][mask] == 1).all() and torch.equal(edited[..., ~mask], labels[..., ~mask])
    with torch.no_grad():
        torch.testing.assert_close(editor.edit(edited), model(edited), rtol=1e-4, atol=1e-5)
    editor.commit()
    with pytest.raises(sigec.MaskError, match="one-hot"):
        editor.edit(edited * 2)
    with pytest.raises(sigec.MaskError, match="classes 0 to"):
        editor.relabel(labels, mask, 99)
    with pytest.raises(sigec.NotRecordedError):
        LabelMapEditor(model).edit(labels)
