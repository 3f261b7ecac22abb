"""The root of Stroma's exception hierarchy.

Every exception Stroma raises on its own account derives from :class:`StromaError`, so callers
can catch Stroma's errors without catching their own. Configuration mistakes also derive from
:class:`ValueError` (nonsense settings raise at construction, naming the setting). Exceptions
keep their constructor arguments in ``args`` so they pickle across processes.
"""

from __future__ import annotations


class StromaError(Exception):
    """Base class of every error Stroma raises itself."""


class ConfigurationError(StromaError, ValueError):
    """A setting is invalid. The message names the setting, the value and what is allowed."""


class CheckpointError(StromaError):
    """A checkpoint could not be written or read back safely.

    Raised (never silently ignored) when stored data is corrupt, tampered with, does not match
    the step's schema, or the store is unavailable. The message names the run and the step.
    """

    def __init__(self, message: str, *, run_id: str | None = None, node_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.node_id = node_id

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_checkpoint_error, (str(self), self.run_id, self.node_id))


def _rebuild_checkpoint_error(message: str, run_id: str | None, node_id: str | None) -> CheckpointError:
    return CheckpointError(message, run_id=run_id, node_id=node_id)


class PipelineChangedError(StromaError, ValueError):
    """A run being resumed was checkpointed by a different pipeline (steps or schemas changed)."""


class RunInputChangedError(StromaError, ValueError):
    """An unfinished run id was given a different initial state than the one it started with."""
