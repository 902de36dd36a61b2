"""sigec: a compiler for spatially sparse incremental inference of image generative models."""

__version__ = "0.1.0"

from sigec import kernels  # noqa: E402,F401  (registers torch.ops.sigec.*)
from sigec.api import compile  # noqa: E402
from sigec.config import SparseConfig  # noqa: E402
from sigec.errors import (  # noqa: E402
    CaptureError,
    CheckpointError,
    EditReplacedError,
    InputMismatchError,
    MaskError,
    NotRecordedError,
    OutputExistsError,
    SigecError,
    StaleCacheError,
    TrajectoryChangedError,
)
from sigec.saving import load, save  # noqa: E402

__all__ = [
    "CaptureError",
    "CheckpointError",
    "EditReplacedError",
    "InputMismatchError",
    "MaskError",
    "NotRecordedError",
    "OutputExistsError",
    "SigecError",
    "SparseConfig",
    "StaleCacheError",
    "TrajectoryChangedError",
    "compile",
    "load",
    "save",
]
