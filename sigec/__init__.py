"""sigec: a compiler for spatially sparse incremental inference of image generative models."""

__version__ = "0.1.0"

from sigec import kernels  # noqa: F401,E402  (registers torch.ops.sigec.*)
