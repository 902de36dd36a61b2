"""The emitted runtime: caches, record / edit / commit, masks -> per-resolution masks -> tiles.

Depends on ``sigec.kernels`` only.
"""

from sigec.runtime import masks

__all__ = ["masks"]
