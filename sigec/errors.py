"""Errors a user of sigec can hit. Each says what was wrong and what to do."""


class SigecError(Exception):
    """Base class of sigec's own errors."""


class NotRecordedError(SigecError, RuntimeError):
    """``edit`` or ``commit`` before ``record`` for that slot."""


class StaleCacheError(SigecError, ValueError):
    """A non-image input (timestep, prompt embedding, label) differs from the recorded one."""


class InputMismatchError(SigecError, ValueError):
    """Inputs whose shape, dtype, device or structure differ from the compiled example."""


class MaskError(SigecError, ValueError):
    """An edit mask of the wrong size, rank or type."""


class CaptureError(SigecError, RuntimeError):
    """The model could not be captured as a graph."""


class CheckpointError(SigecError, ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model."""


class EditReplacedError(SigecError, RuntimeError):
    """``commit`` of a slot whose uncommitted edit an edit of another slot replaced."""


class OutputExistsError(SigecError, FileExistsError):
    """A file sigec would write already exists, and replacing it was not asked for."""


class TrajectoryChangedError(SigecError, ValueError):
    """An editing workflow asked to edit a run whose prompt, strength, steps or seed changed."""
