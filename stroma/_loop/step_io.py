"""Calling a user's step and reading what it returns: the attempt's usage scope
(:func:`report_usage`, :func:`current_model`), the step's call signature and return shapes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from pydantic import BaseModel, RootModel, ValidationError

from stroma.cost import FallbackPolicy, select_fallback
from stroma.errors import StromaError, UsageError
from stroma.failures import FailureClass

logger = logging.getLogger("stroma")

MAX_TOKENS: Final = 10**12
"""Largest token count one attempt may report, per direction (input, output): a trillion, far
above any model's context. A larger count is a bug in the step; accepting it would make every
later metric export fail (OTLP carries counters as 64-bit integers) and the run's cost absurd."""

CONTEXT_PARAMETER_NAMES: Final = frozenset({"context", "ctx"})


class StepOutputError(StromaError, TypeError):
    """A step returned a value of a shape Stroma does not understand (names the step)."""


@dataclass
class AttemptUsage:
    """Usage reported during one attempt (by :func:`report_usage` or the step's return value)."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str | None = None
    # (USD, priced) already summed per model call, when the usage came from GenAI spans
    # (stroma.telemetry.genai_usage); None: price the tokens above with the model above
    cost: tuple[float, bool] | None = None
    #: the model :func:`current_model` last told the step to call (names a failed attempt's
    #: model in the step's error when the call failed before reporting any usage)
    asked_model: str | None = None

    def add(self, step_id: str | None, input_tokens: int, output_tokens: int) -> None:
        """Add checked token counts; the attempt's totals must stay within bounds too."""
        if self.input_tokens or self.output_tokens:
            check_tokens(step_id, "input_tokens (attempt total)", self.input_tokens + input_tokens)
            check_tokens(step_id, "output_tokens (attempt total)", self.output_tokens + output_tokens)
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens


class Fallbacks:
    """The model-fallback policies of a run as they stand for one attempt.

    *utilization* is the run's cost utilization when the attempt started; *failures* the
    ``(model, failure class)`` of the step's failed attempts so far. :meth:`policy_for` applies
    the one rule (:func:`stroma.cost.select_fallback`).
    """

    __slots__ = ("failures", "policies", "utilization")

    def __init__(
        self,
        policies: list[FallbackPolicy],
        utilization: float | None,
        failures: list[tuple[str | None, FailureClass]],
    ) -> None:
        self.policies = policies
        self.utilization = utilization
        self.failures = failures

    def policy_for(self, model: str | None) -> FallbackPolicy | None:
        """The policy that applies to a step asking for *model* now, if any."""
        return select_fallback(model, self.policies, utilization=self.utilization, failures=self.failures)

    def policy_used(self, model: str) -> FallbackPolicy | None:
        """The firing policy an attempt that used *model* fell back by: *model* is its fallback
        model, or its preferred model asked for while it applied."""
        for policy in self.policies:
            if (
                model in (policy.preferred_model, policy.fallback_model)
                and self.policy_for(policy.preferred_model) is policy
            ):
                return policy
        return None


@dataclass
class _AttemptScope:
    usage: AttemptUsage
    fallbacks: Fallbacks | None
    step_id: str | None = None


def check_tokens(step_id: str | None, label: str, value: object) -> int:
    """Return *value* if it is a token count Stroma accepts: an ``int`` (not ``bool``) from 0 to
    :data:`MAX_TOKENS`. Otherwise raise :class:`~stroma.errors.UsageError` naming the step."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        where = f"step {step_id!r}" if step_id is not None else "report_usage() outside a step"
        raise UsageError(
            f"{where} reported {label}={_short_repr(value)}; token counts must be integers from 0 to "
            f"{MAX_TOKENS:,} per attempt"
        )
    return value


def check_model(step_id: str | None, value: object) -> str | None:
    """Return *value* if it is ``None`` or a model name (``str``); else raise ``UsageError``."""
    if value is None or isinstance(value, str):
        return value
    where = f"step {step_id!r}" if step_id is not None else "report_usage() outside a step"
    raise UsageError(f"{where} reported model of type {type(value).__name__}; a model name must be a str")


def _short_repr(value: object) -> str:
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:39] + "…"


_current: ContextVar[_AttemptScope | None] = ContextVar("stroma_attempt", default=None)


def report_usage(input_tokens: int = 0, output_tokens: int = 0, model: str | None = None) -> None:
    """Add token usage to the attempt that is running now.

    Use it where a step cannot return its usage, above all before it raises: usage reported by
    a failed attempt is charged like any other (the provider bills it). Outside a step it does
    nothing.

    Counts must be integers from 0 to :data:`MAX_TOKENS` (also for the attempt's running
    total) and *model* a ``str`` or ``None``; anything else raises
    :class:`~stroma.errors.UsageError` (a ``ValueError``) naming the step, records nothing, and,
    if the step lets it propagate, fails the step as ``TERMINAL`` (a bug, not worth a retry).
    """
    scope = _current.get()
    step_id = scope.step_id if scope is not None else None
    check_tokens(step_id, "input_tokens", input_tokens)
    check_tokens(step_id, "output_tokens", output_tokens)
    check_model(step_id, model)
    if scope is None:
        return
    scope.usage.add(step_id, input_tokens, output_tokens)
    if model is not None:
        scope.usage.model = model


def current_model(default: str | None = None) -> str | None:
    """The model the running step should call.

    Once a :class:`~stroma.cost.FallbackPolicy` for *default* applies (its budget threshold is
    crossed, or the step failed with a class it names), this returns its ``fallback_model``;
    a *default* no policy is for is returned unchanged, and ``None`` gets the first policy that
    applies (:func:`stroma.cost.select_fallback` is the rule). Outside a step it returns
    *default*.

    The fallback model is also in the step's context dict under ``"_stroma_model"`` (the
    established API), for steps that take a second parameter.
    """
    scope = _current.get()
    if scope is None:
        return default
    model = default
    if scope.fallbacks is not None:
        policy = scope.fallbacks.policy_for(default)
        if policy is not None:
            model = policy.fallback_model
    if isinstance(model, str):
        scope.usage.asked_model = model
    return model


def enter_attempt(fallbacks: Fallbacks | None, step_id: str | None = None) -> tuple[AttemptUsage, object]:
    """Open the usage scope of one attempt; :func:`exit_attempt` closes it."""
    usage = AttemptUsage()
    token = _current.set(_AttemptScope(usage, fallbacks, step_id))
    return usage, token


def exit_attempt(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


def accepts_context(func: Callable[..., Any]) -> bool:
    """Whether *func* is called with the run's shared context dict as its second argument.

    It is when its second positional parameter has no default (``def step(state, context)``),
    or is named ``context`` or ``ctx`` (with or without a default), or when ``*args`` comes
    before a second positional parameter. A second parameter with a default that is not
    so named (``def shout(state, suffix="!")``, the ``fn=fn`` closure idiom) keeps its
    default: the step is called with the state alone. Decided once per function (cached).
    """
    try:
        return _accepts_context_cached(func)
    except TypeError:  # an unhashable callable: decide without the cache
        return _accepts_context(func)


@lru_cache(maxsize=4096)
def _accepts_context_cached(func: Callable[..., Any]) -> bool:
    return _accepts_context(func)


def _accepts_context(func: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    positional = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
            if positional == 2:
                return parameter.default is inspect.Parameter.empty or parameter.name in CONTEXT_PARAMETER_NAMES
    return False


def unpack_output(step_id: str, output: Any) -> tuple[Any, int, int, str | None]:
    """Normalise a step's return value to ``(state, input_tokens, output_tokens, model)``.

    Accepted shapes: ``state``, ``(state, tokens)``, ``(state, input_tokens, model)`` and
    ``(state, input_tokens, output_tokens, model)``. Anything else raises
    :class:`StepOutputError` naming the step.
    """
    if type(output) is not tuple:
        return output, 0, 0, None
    size = len(output)
    if size == 2:
        state, input_tokens = output
        output_tokens, model = 0, None
    elif size == 3:
        state, input_tokens, model = output
        output_tokens = 0
    elif size == 4:
        state, input_tokens, output_tokens, model = output
    else:
        raise StepOutputError(
            f"step {step_id!r} returned a tuple of {size} items; expected state, (state, tokens), "
            "(state, input_tokens, model) or (state, input_tokens, output_tokens, model)"
        )
    for label, value in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise StepOutputError(
                f"step {step_id!r} returned {label}={_short_repr(value)}; token counts must be integers "
                f"from 0 to {MAX_TOKENS:,} per attempt"
            )
    if model is not None and not isinstance(model, str):
        raise StepOutputError(f"step {step_id!r} returned model={_short_repr(model)}; expected a model name (str)")
    return state, input_tokens, output_tokens, model


def as_input_class(input_state: Any, output: Any) -> Any:
    """Without a contract: a ``dict`` output of a step whose input is a pydantic model comes back
    as an instance of the input's class, as the established package returned it.

    Only when no data is lost: every key of *output* must be a field of that class (by name
    or alias) and the dict must validate as it. Otherwise (another shape, a missing or invalid
    field) the dict is returned unchanged: without a contract Stroma does not guess a schema.
    """
    if type(output) is not dict or not isinstance(input_state, BaseModel):
        return output
    cls = type(input_state)
    known = _field_keys(cls)
    if known is None or not all(isinstance(key, str) and key in known for key in output):
        return output
    try:
        return cls.model_validate(output)
    except (ValidationError, TypeError, ValueError):
        return output


@lru_cache(maxsize=1024)
def _field_keys(cls: type[BaseModel]) -> frozenset[str] | None:
    """The keys a dict for *cls* may have, or ``None`` when its extras would hide dropped keys."""
    if cls.model_config.get("extra") == "allow" or issubclass(cls, RootModel):
        return None
    keys: set[str] = set()
    for name, info in cls.model_fields.items():
        keys.add(name)
        if isinstance(info.alias, str):
            keys.add(info.alias)
        if isinstance(info.validation_alias, str):
            keys.add(info.validation_alias)
    return frozenset(keys)
