"""The root of Stroma's exception hierarchy.

Every exception Stroma raises on its own account derives from :class:`StromaError`, so callers
can catch Stroma's errors without catching their own. Configuration mistakes also derive from
:class:`ValueError` (nonsense settings raise at construction, naming the setting). Exceptions
keep their constructor arguments in ``args`` so they pickle across processes.
"""

from __future__ import annotations

_MAX_CHAIN = 8


class StromaError(Exception):
    """Base class of every error Stroma raises itself."""


class ConfigurationError(StromaError, ValueError):
    """A setting is invalid. The message names the setting, the value and what is allowed."""


class UsageError(StromaError, ValueError):
    """A step reported usage Stroma cannot account for: a token count that is not an integer from
    0 to :data:`stroma._loop.step_io.MAX_TOKENS`, or a model name that is not a ``str``.

    The message names the step. Raised by :func:`stroma.report_usage`; a step that lets it
    propagate fails as ``TERMINAL`` (it is a bug in the step, a retry would not fix it).
    """


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


def exception_types(exc: BaseException) -> str:
    """The type names of *exc* and the exceptions it was raised from or during, for a log line.

    ``"hooks.HookFailed <- ValueError"`` for ``raise HookFailed(...) from ValueError(...)``. No
    messages and no traceback: both can carry step content, and Stroma's log lines name error
    types only (README, "Secrets"). At most 8 links; never raises.
    """
    names: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(names) < _MAX_CHAIN:
        seen.add(id(current))
        cls = type(current)
        module = getattr(cls, "__module__", None)
        name = getattr(cls, "__qualname__", None)
        if not isinstance(name, str):
            name = "Exception"
        if isinstance(module, str) and module not in ("builtins", "asyncio.exceptions"):
            name = f"{module}.{name}"
        names.append(name[:200])
        cause = current.__cause__
        current = cause if cause is not None else (None if current.__suppress_context__ else current.__context__)
    return " <- ".join(names)


class RunInputChangedError(StromaError, ValueError):
    """An unfinished run id was given a different initial state than the one it started with."""
