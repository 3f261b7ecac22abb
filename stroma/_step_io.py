"""Calling a user's step and reading what it returns.

Kept apart from the loop so that :mod:`stroma.middleware` reads as the loop alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from stroma.errors import StromaError

logger = logging.getLogger("stroma")


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


@dataclass
class _AttemptScope:
    usage: AttemptUsage
    preferred: str | None
    fallback: str | None


_current: ContextVar[_AttemptScope | None] = ContextVar("stroma_attempt", default=None)


def report_usage(input_tokens: int = 0, output_tokens: int = 0, model: str | None = None) -> None:
    """Add token usage to the attempt that is running now.

    Use it where a step cannot return its usage, above all before it raises: usage reported by
    a failed attempt is charged like any other (the provider bills it). Outside a step it does
    nothing. Counts must be non-negative integers (``ValueError`` otherwise).
    """
    if isinstance(input_tokens, bool) or isinstance(output_tokens, bool):
        raise ValueError("report_usage: token counts must be integers, not bool")
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError(f"report_usage: token counts must be >= 0, got input={input_tokens}, output={output_tokens}")
    scope = _current.get()
    if scope is None:
        return
    scope.usage.input_tokens += int(input_tokens)
    scope.usage.output_tokens += int(output_tokens)
    if model is not None:
        scope.usage.model = model


def current_model(default: str | None = None) -> str | None:
    """The model the running step should call.

    Once a :class:`~stroma.cost.FallbackPolicy` applies (its budget threshold is crossed, or
    the step failed with a class it names), this returns its ``fallback_model`` when *default*
    is its ``preferred_model`` or ``None``; any other *default* is returned unchanged (a step on
    another model is not affected). Outside a step it returns *default*.

    The fallback model is also in the step's context dict under ``"_stroma_model"`` (the
    established API), for steps that take a second parameter.
    """
    scope = _current.get()
    if scope is None or scope.fallback is None:
        return default
    if default is None or default == scope.preferred:
        return scope.fallback
    return default


def enter_attempt(preferred: str | None, fallback: str | None) -> tuple[AttemptUsage, object]:
    usage = AttemptUsage()
    token = _current.set(_AttemptScope(usage, preferred, fallback))
    return usage, token


def exit_attempt(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]


@lru_cache(maxsize=4096)
def accepts_context(func: Callable[..., Any]) -> bool:
    """Whether *func* takes a second positional argument (the run's shared context dict)."""
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
    return positional >= 2


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
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StepOutputError(
                f"step {step_id!r} returned {label}={value!r}; token counts must be non-negative integers"
            )
    if model is not None and not isinstance(model, str):
        raise StepOutputError(f"step {step_id!r} returned model={model!r}; expected a model name (str)")
    return state, input_tokens, output_tokens, model
