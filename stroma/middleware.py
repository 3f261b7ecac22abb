"""The reliability loop: :func:`execute_step`, and :class:`StromaStep` which applies it to callables.

There is exactly one loop. :class:`~stroma.runner.StromaRunner`, :func:`~stroma.runner.parallel`
and framework adapters call :func:`execute_step`; none of them copies it. Its parts live in
:mod:`stroma._loop` (admit, attempt, one decision; see :mod:`stroma._loop.run`), what it writes
on spans and metrics in :mod:`stroma.telemetry.steps`.

One call of :func:`execute_step` is one ``step`` span; each try is an ``attempt`` span beneath it
(design §4). What happens in a call, in order:

1. the input is validated against the contract (once; a violation ends the call with
   ``FAILED`` and the violation, it is not raised);
2. before each attempt, the remaining budget is checked (no call starts once a limit is
   reached) and the model is chosen (a fallback model once spend crossed a
   :class:`~stroma.cost.FallbackPolicy` threshold, or after a failure class it names);
3. the step runs (with its timeout), its usage is charged (failed attempts that reported usage
   are charged too), its output is validated and the budget is checked again;
4. on success the output is checkpointed and the call returns ``COMPLETED``; a budget breach
   returns ``PARTIAL`` keeping the output already paid for (checkpointed, so a resume with a
   larger budget continues) and is never retried;
5. on an ``Exception`` the failure is classified (custom classifiers first) and retried per
   policy with a delay from ``backoff``'s exponential full-jitter generator. ``TERMINAL``
   failures end the call with ``FAILED``; exhausted retries with ``PARTIAL``.

``asyncio.CancelledError``, ``KeyboardInterrupt`` and every other ``BaseException`` are never
caught, retried or classified: the spans they cross are ended and the exception propagates.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel

from stroma._loop.run import SLEEP_OVERRIDE, Sleep, run_step
from stroma.context import ReliabilityContext
from stroma.contracts import NodeContract
from stroma.trace import ExecutionResult

__all__ = ["ReliabilityContext", "StromaStep", "execute_step", "retry_sleep"]


@contextmanager
def retry_sleep(sleep: Sleep) -> Iterator[None]:
    """Use *sleep* instead of ``asyncio.sleep`` for retry delays within this context.

    Delays are still drawn and recorded (``stroma.step.retry.delay``); only the waiting is
    replaced. :func:`stroma.testing.no_retry_sleep` builds on this.
    """
    token = SLEEP_OVERRIDE.set(sleep)
    try:
        yield
    finally:
        SLEEP_OVERRIDE.reset(token)


async def execute_step(
    step_id: str,
    func: Callable[..., Any],
    input_state: Any,
    ctx: ReliabilityContext,
    *,
    contract: NodeContract | None = None,
) -> ExecutionResult:
    """Run *func* on *input_state* as one reliable, observable step; never raises for a
    failure of the step itself.

    *func* is called as ``func(state)`` or, if its second positional parameter has no default
    (or is named ``context`` or ``ctx``), ``func(state, ctx.context)``; it may be a coroutine
    function or a plain function (a plain function runs on the event loop's thread, so it should
    not block for long; a timeout cannot interrupt it). It returns a state, or
    ``(state, tokens)``, ``(state, input_tokens, model)`` or
    ``(state, input_tokens, output_tokens, model)``; usage can also be reported from inside
    with :func:`stroma.report_usage`.

    With *contract*, the input and output are validated against it (it is registered in
    ``ctx.registry`` if it is not there yet) and the validated output is checkpointed; without
    one, states pass through unvalidated and only model outputs are checkpointed, except that a
    ``dict`` output of a step whose input is a pydantic model is returned as an instance of the
    input's class when it is one without loss (the established behaviour; see
    :func:`stroma._loop.step_io.as_input_class`).

    Returns the run's :class:`~stroma.trace.ExecutionResult` so far: ``COMPLETED`` with the
    output as ``final_state``; ``FAILED`` (terminal failure, invalid input) or ``PARTIAL``
    (retries exhausted, budget breached, run deadline passed) with ``error`` and
    ``failed_step`` set. A budget breach keeps the output that was paid for as
    ``final_state``. ``BaseException`` (cancellation, ``KeyboardInterrupt``) propagates.
    """
    return await run_step(step_id, func, input_state, ctx, contract)


class StromaStep:
    """Applies the reliability loop to individual callables, without a runner.

    ``wrap(step_id, func, contract=None)`` returns an async callable that runs
    :func:`execute_step` on every call and returns its :class:`~stroma.trace.ExecutionResult`;
    the instance is also a decorator factory: ``@step("summarize", input=Doc, output=Summary)``
    creates the contract, registers it in the context's registry and wraps the function.
    ``functools.wraps`` metadata (name, docstring, module) is kept; sync functions are
    accepted.
    """

    def __init__(self, ctx: ReliabilityContext) -> None:
        self._ctx = ctx

    def wrap(
        self,
        step_id: str,
        func: Callable[..., Any],
        *,
        contract: NodeContract | None = None,
    ) -> Callable[..., Awaitable[ExecutionResult]]:
        """Wrap *func* so that each call runs it through :func:`execute_step`."""
        ctx = self._ctx

        async def wrapped(input_state: Any) -> ExecutionResult:
            return await execute_step(step_id, func, input_state, ctx, contract=contract)

        functools.update_wrapper(wrapped, func)
        wrapped.__wrapped__ = func  # type: ignore[attr-defined]
        wrapped._stroma_node_id = step_id  # type: ignore[attr-defined]
        wrapped._stroma_contract = contract  # type: ignore[attr-defined]
        # Already a whole step call: a runner must not run it through the loop a second time.
        wrapped._stroma_runs_step = True  # type: ignore[attr-defined]
        return wrapped

    def __call__(
        self,
        step_id: str,
        *,
        input: type[BaseModel],
        output: type[BaseModel],
    ) -> Callable[[Callable[..., Any]], Callable[..., Awaitable[ExecutionResult]]]:
        """Decorator: build ``NodeContract(step_id, input, output)``, register it, wrap the function."""
        contract = NodeContract(node_id=step_id, input_schema=input, output_schema=output)
        self._ctx.registry.register(contract)

        def decorator(func: Callable[..., Any]) -> Callable[..., Awaitable[ExecutionResult]]:
            return self.wrap(step_id, func, contract=contract)

        return decorator
