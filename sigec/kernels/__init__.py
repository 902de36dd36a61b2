"""Tile kernels: one file per op family (Triton kernel, PyTorch reference, ``sigec::`` custom op).

Importing this package registers ``torch.ops.sigec.gather``, ``torch.ops.sigec.scatter``,
``torch.ops.sigec.restore`` and ``torch.ops.sigec.tile_conv``. It imports only torch and triton.
"""

from sigec.kernels._common import ACTIVATIONS, can_precompile, launch, precompiling
from sigec.kernels.conv import tile_conv, tile_conv_reference, tile_conv_triton
from sigec.kernels.gather import gather, gather_parts, gather_reference, gather_triton
from sigec.kernels.restore import restore, restore_reference, restore_triton
from sigec.kernels.scatter import scatter, scatter_reference, scatter_triton

__all__ = [
    "ACTIVATIONS",
    "can_precompile",
    "launch",
    "precompiling",
    "gather",
    "gather_parts",
    "gather_reference",
    "gather_triton",
    "restore",
    "restore_reference",
    "restore_triton",
    "scatter",
    "scatter_reference",
    "scatter_triton",
    "tile_conv",
    "tile_conv_reference",
    "tile_conv_triton",
]
