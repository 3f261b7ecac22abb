"""The root of Stroma's exception hierarchy.

Every exception Stroma raises on its own account derives from :class:`StromaError`, so callers
can catch Stroma's errors without catching their own. Configuration mistakes also derive from
:class:`ValueError` (nonsense settings raise at construction, naming the setting). Exceptions
keep their constructor arguments in ``args`` so they pickle across processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from stroma.money import format_usd

if TYPE_CHECKING:
    from pydantic import ValidationError

_MAX_CHAIN = 8
_MAX_ERRORS_IN_MESSAGE = 5
_MIN_SCRUBBED_CHARS = 3
_MAX_SCRUB_DEPTH = 4
_MAX_SCRUB_ITEMS = 256
# Error types whose message is written by a validator (Stroma's own, or the user's schema):
# those choose their words; every other message is pydantic's and is scrubbed of the input.
_AUTHORED_TYPES = frozenset({"value_error", "assertion_error"})

Dimension = Literal["tokens", "cost", "latency", "shared_cost", "shared_tokens"]
"""A budget dimension; ``shared_*`` are the limits of a :class:`~stroma.cost.SharedLimit` (a fleet-wide budget)."""

BUDGET_LIMIT_FIELDS: Mapping[str, str] = {
    "tokens": "max_tokens_total",
    "cost": "max_cost_usd",
    "latency": "max_latency_ms",
}
"""The :class:`~stroma.cost.ExecutionBudget` field that limits each run-budget dimension."""


class StromaError(Exception):
    """Base class of every error Stroma raises itself."""


class ConfigurationError(StromaError, ValueError):
    """A setting is invalid. The message names the setting, what is allowed and, for a number or
    an identifier (a run id, a step id, a model name), the value; other text is never repeated."""


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


def _format_amount(dimension: str, value: float) -> str:
    if dimension == "cost":
        return format_usd(value)
    if dimension == "tokens":
        return f"{value:,.0f} tokens"
    if dimension == "latency":
        return f"{value:,.0f} ms"
    return f"{value:g}"


class BudgetExceeded(StromaError):
    """A run's budget is exhausted.

    Attributes:
        dimension: ``"tokens"``, ``"cost"`` (USD) or ``"latency"`` (milliseconds of wall clock).
        limit: the budget's limit for that dimension.
        actual: usage when the check failed (above the limit after an attempt; at or above it
            when an attempt was about to start).
        node_id: the step at which the check failed.

    Never retried (the classifier makes it ``TERMINAL``): the run stops as ``PARTIAL`` and keeps
    what it already paid for. Defined here so that classification needs no import of
    :mod:`stroma.cost`; its public home (and ``__module__``) is ``stroma.cost``.
    """

    def __init__(self, dimension: Dimension, limit: float, actual: float, node_id: str) -> None:
        self.dimension = dimension
        self.limit = limit
        self.actual = actual
        self.node_id = node_id
        super().__init__(self._message())

    def _message(self) -> str:
        setting = BUDGET_LIMIT_FIELDS.get(self.dimension, self.dimension)
        return (
            f"{self.dimension} budget exhausted at step {self.node_id!r}: used "
            f"{_format_amount(self.dimension, self.actual)} of a "
            f"{_format_amount(self.dimension, self.limit)} limit. Raise ExecutionBudget.{setting} "
            "(and resume the run) to continue."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.dimension, self.limit, self.actual, self.node_id))


# The documented name, and the one error types and log lines have always shown.
BudgetExceeded.__module__ = "stroma.cost"


# --- pydantic's validation errors, as messages -----------------------------------------------------


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic's errors of *exc* without the input values: ``type``, ``loc``, ``msg`` (and ``ctx``).

    Stroma's one way to turn a ``ValidationError`` into data that may be shown, logged or
    exported. No ``input`` and no URL; ``ctx`` is kept JSON-safe and picklable (values that are
    not plain scalars become their ``str``). Pydantic writes some inputs into its own messages
    and context (a discriminated union's tag): there every string of the failing input (3
    characters or more) is replaced by ``<input>``. Messages written by a validator
    (``value_error``, ``assertion_error``: Stroma's own checks and the user's schema validators)
    are kept as written.
    """
    errors: list[dict[str, Any]] = []
    for item in exc.errors(include_url=False):
        error: dict[str, Any] = {key: value for key, value in item.items() if key != "input"}
        ctx = error.get("ctx")
        if isinstance(ctx, dict):
            error["ctx"] = ctx = {
                key: value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
                for key, value in ctx.items()
            }
        msg = str(error.get("msg", "invalid"))
        if error.get("type") not in _AUTHORED_TYPES:
            texts = _texts(item.get("input"))
            msg = _scrub(msg, texts)
            if isinstance(ctx, dict):
                error["ctx"] = {
                    key: _scrub(value, texts) if isinstance(value, str) else value for key, value in ctx.items()
                }
        error["msg"] = msg
        errors.append(error)
    return errors


def _scrub(text: str, texts: list[str]) -> str:
    """*text* with each of *texts* (longest first) replaced by ``<input>``."""
    for form in texts:
        if form in text:
            text = text.replace(form, "<input>")
    return text


def _texts(value: object) -> list[str]:
    """The strings in the failing input *value* and their reprs, longest first: *value* itself, or
    the values inside its mappings and sequences (a bounded walk: a few levels, a few hundred
    strings). Keys are left alone: they are field names, and shown in error paths anyway."""
    found: set[str] = set()
    pending: list[tuple[object, int]] = [(value, 0)]
    visited = 0
    while pending and visited < _MAX_SCRUB_ITEMS:
        current, depth = pending.pop()
        visited += 1
        if isinstance(current, (bytes, bytearray)):
            current = bytes(current).decode("utf-8", "replace")
        if isinstance(current, str):
            if len(current) >= _MIN_SCRUBBED_CHARS:
                found.update((current, repr(current)))
        elif depth < _MAX_SCRUB_DEPTH and isinstance(current, Mapping):
            pending.extend((item, depth + 1) for item in list(current.values())[:_MAX_SCRUB_ITEMS])
        elif depth < _MAX_SCRUB_DEPTH and isinstance(current, (list, tuple)):
            pending.extend((item, depth + 1) for item in current[:_MAX_SCRUB_ITEMS])
    return sorted(found, key=len, reverse=True)


def describe_validation_error(owner: str | None, exc: ValidationError, *, show_numbers: bool = False) -> str:
    """``"owner.field: message; ..."`` for *exc*: what failed and where, never a text input.

    Stroma's one formatter of pydantic's errors (configuration, checkpoints, traces, the CLI).
    The first five errors, then ``"and N more"``. A message that already starts with
    ``owner.`` (Stroma's own validators name the setting) is not prefixed again; pydantic's
    ``"Value error, "`` prefix is dropped. Without an *owner* the field path stands alone
    (``<root>`` for the whole value). With *show_numbers* (settings, not data) a number, bool or
    ``None`` that failed is shown as ``owner.field=value``; strings, bytes, containers and
    objects never are: they may be secrets. Built on :func:`validation_errors`.
    """
    errors = validation_errors(exc)
    inputs = [item.get("input") for item in exc.errors(include_url=False)] if show_numbers else []
    parts: list[str] = []
    for index, error in enumerate(errors[:_MAX_ERRORS_IN_MESSAGE]):
        msg = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if owner is not None and msg.startswith(f"{owner}."):
            parts.append(msg)
            continue
        location = ".".join(str(part) for part in error.get("loc", ()))
        where = f"{owner}.{location}" if owner and location else (owner or location or "<root>")
        if show_numbers and _is_number(inputs[index]):
            where = f"{where}={inputs[index]!r}"
        parts.append(f"{where}: {msg}")
    if len(errors) > _MAX_ERRORS_IN_MESSAGE:
        parts.append(f"and {len(errors) - _MAX_ERRORS_IN_MESSAGE} more")
    return "; ".join(parts) or (f"invalid {owner}" if owner else "invalid value")


def _is_number(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def configuration_error(owner: str, exc: ValidationError) -> ConfigurationError:
    """A :class:`ConfigurationError` for the settings object *owner* from pydantic's *exc*.

    :func:`describe_validation_error` with numbers shown (a limit of ``-1`` is named); text
    values never are.
    """
    return ConfigurationError(describe_validation_error(owner, exc, show_numbers=True))
