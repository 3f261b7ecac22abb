"""The reliability loop: :func:`execute_step`, and :class:`StromaStep` which applies it to callables.

There is exactly one loop. :class:`~stroma.runner.StromaRunner`, :func:`~stroma.runner.parallel`
and framework adapters call :func:`execute_step`; none of them copies it.

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

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel

from stroma import _step_io
from stroma._step_state import AttemptEvent, StepState, choose_fallback, dump_state, error_fallback, note_fallback
from stroma.context import ReliabilityContext, breach_attributes, elapsed_ms, error_message, error_type_name
from stroma.contracts import ContractViolation, NodeContract
from stroma.cost import BudgetExceeded, SharedLimit
from stroma.failures import FailureClass, NodeContext, classify, resolve_policy
from stroma.pricing import cost_usd
from stroma.telemetry import genai_usage
from stroma.telemetry import names as n
from stroma.telemetry._bounds import bound_text
from stroma.telemetry.records import SpanRecord
from stroma.trace import ExecutionResult, RunStatus

__all__ = ["ReliabilityContext", "StromaStep", "execute_step", "retry_sleep"]

logger = logging.getLogger("stroma")

Sleep = Callable[[float], Awaitable[None]]
_sleep_override: ContextVar[Sleep | None] = ContextVar("stroma_sleep", default=None)


@contextmanager
def retry_sleep(sleep: Sleep) -> Iterator[None]:
    """Use *sleep* instead of ``asyncio.sleep`` for retry delays within this context.

    Delays are still drawn and recorded (``stroma.step.retry.delay``); only the waiting is
    replaced. :func:`stroma.testing.no_retry_sleep` builds on this.
    """
    token = _sleep_override.set(sleep)
    try:
        yield
    finally:
        _sleep_override.reset(token)


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
    :func:`stroma._step_io.as_input_class`).

    Returns the run's :class:`~stroma.trace.ExecutionResult` so far: ``COMPLETED`` with the
    output as ``final_state``; ``FAILED`` (terminal failure, invalid input) or ``PARTIAL``
    (retries exhausted, budget breached, run deadline passed) with ``error`` and
    ``failed_step`` set. A budget breach keeps the output that was paid for as
    ``final_state``. ``BaseException`` (cancellation, ``KeyboardInterrupt``) propagates.
    """
    step = StepState(ctx, step_id, contract)
    telemetry = ctx.telemetry
    record = step.record
    step_token = None
    if telemetry.enabled:
        telemetry.start(record)
        step_token = telemetry.set_current(record)
    try:
        return await _run_step(step, func, input_state)
    except BaseException as exc:
        # Cancellation and interpreter exits: no failure class, the span ends, it propagates.
        if record.end_ns is None:
            record.fail(error_type_name(exc), "interrupted")
            _finish_step(step)
        raise
    finally:
        if step_token is not None:
            telemetry.reset_current(step_token)


async def _run_step(step: StepState, func: Callable[..., Any], input_state: Any) -> ExecutionResult:
    ctx = step.ctx
    step_id = step.step_id
    contract = step.contract
    telemetry = ctx.telemetry
    record = step.record
    ctx.step_count += 1

    if contract is not None:
        ctx.registry.ensure(contract)
    if telemetry.capture_content:
        telemetry.capture(record, n.STEP_INPUT, input_state)

    validated_input: Any = input_state
    input_error: ContractViolation | None = None
    if contract is not None:
        try:
            validated_input = ctx.registry.validate_input(step_id, input_state)
        except ContractViolation as violation:
            input_error = violation

    pass_context = _step_io.accepts_context(func)
    timeout_ms = ctx.step_timeouts.get(step_id)
    budget = ctx.budget
    check_budget = not budget.is_unlimited
    gate = ctx.gate if ctx.gate.active else None
    shared = ctx.shared_budget
    policy_delays: dict[FailureClass, Iterator[float]] = {}
    delay = 0.0
    attempt = 0

    while True:
        attempt += 1
        # --- before the attempt: budget, deadline, model ---------------------------------------
        if check_budget:
            try:
                ctx.cost_tracker.check_can_start(budget, step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
            except BudgetExceeded as blocked:
                return _breach(step, blocked, input_state)
        if gate is not None and await gate.enter(ctx.spent):
            # others spent while this attempt waited for its turn: check again
            try:
                ctx.cost_tracker.check_can_start(budget, step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
            except BudgetExceeded as blocked:
                gate.release()
                return _breach(step, blocked, input_state)
        attempt_timeout = _attempt_timeout(ctx, timeout_ms)
        if attempt_timeout is not None and attempt_timeout <= 0:
            if gate is not None:
                gate.release()
            return _stop(step, RunStatus.PARTIAL, input_state, f"run deadline of {ctx.run_timeout_ms} ms passed")
        hold: Any = None
        if shared is not None:
            # A limit shared with other processes: reserve this attempt's estimate, or stop.
            try:
                hold = await shared.reserve_attempt(step_id, ctx.run_id)
            except Exception as refused:
                if gate is not None:
                    gate.release()
                if isinstance(refused, BudgetExceeded):
                    return _breach(step, refused, input_state)
                return _stop(
                    step,
                    RunStatus.PARTIAL,
                    input_state,
                    f"the shared budget could not be consulted before an attempt of step {step_id!r} "
                    f"({error_type_name(refused)}: {error_message(refused)})",
                )
        fallback = choose_fallback(step)

        arecord = SpanRecord(
            n.SPAN_ATTEMPT,
            f"{n.SPAN_ATTEMPT} {step_id}",
            {n.STEP_ID: step_id, n.STEP_ATTEMPT_NUMBER: attempt, n.STEP_RETRY_DELAY: float(delay)},
            time.time_ns(),
            record,
        )
        started = time.perf_counter()
        attempt_token = None
        if telemetry.enabled:
            telemetry.start(arecord)
            attempt_token = telemetry.set_current(arecord)
        if fallback is None:
            usage, usage_token = _step_io.enter_attempt(None, None, step_id)
        else:
            usage, usage_token = _step_io.enter_attempt(fallback.preferred_model, fallback.fallback_model, step_id)
        output_model: Any = None
        failure: Exception | None = None
        try:
            if input_error is not None:
                raise input_error
            if ctx.hooks.on_node_start is not None:
                await ctx.call_hook("on_node_start", step_id, dump_state(validated_input))
            outcome = func(validated_input, ctx.context) if pass_context else func(validated_input)
            if inspect.isawaitable(outcome):
                if attempt_timeout is not None:
                    try:
                        outcome = await asyncio.wait_for(outcome, attempt_timeout)
                    except asyncio.TimeoutError as exc:
                        # on 3.10 asyncio's TimeoutError is not the builtin one classifiers test for
                        raise TimeoutError(f"step {step_id!r} timed out after {attempt_timeout:.3f} s") from exc
                else:
                    outcome = await outcome
            raw_output, in_tok, out_tok, declared_model = _step_io.unpack_output(step_id, outcome)
            if in_tok or out_tok:
                # returned usage adds to what report_usage() recorded: the sum is bounded too
                _step_io.check_tokens(step_id, "input_tokens (attempt total)", usage.input_tokens + in_tok)
                _step_io.check_tokens(step_id, "output_tokens (attempt total)", usage.output_tokens + out_tok)
            usage.input_tokens += in_tok
            usage.output_tokens += out_tok
            if declared_model is not None:
                usage.model = declared_model
            if contract is not None:
                output_model = ctx.registry.validate_output(step_id, raw_output)
            else:
                output_model = _step_io.as_input_class(validated_input, raw_output)
        except Exception as exc:
            failure = exc
        except BaseException as exc:
            arecord.fail(error_type_name(exc), "interrupted")
            _finish_attempt(step, arecord, usage, started, validated_input, None, None)
            raise
        finally:
            _step_io.exit_attempt(usage_token)
            if attempt_token is not None:
                telemetry.reset_current(attempt_token)

        # --- after the attempt -----------------------------------------------------------------
        if failure is None:
            arecord.attributes[n.CONTRACT_OUTCOME] = n.CONTRACT_VALID if contract is not None else "unchecked"
            cost = _finish_attempt(step, arecord, usage, started, validated_input, output_model, None)
            if shared is not None:
                await _settle_shared(step, shared, hold, cost, usage.input_tokens + usage.output_tokens)
            breach = None
            if check_budget:
                try:
                    ctx.cost_tracker.check_budget(budget, step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
                except BudgetExceeded as exc:
                    breach = exc
            await _checkpoint(step, output_model)
            if telemetry.capture_content:
                telemetry.capture(record, n.STEP_OUTPUT, output_model)
            if breach is not None:
                return _breach(step, breach, output_model)
            if check_budget and _unpriced_stop(step):
                return _stop(step, RunStatus.PARTIAL, output_model, _unpriced_message(step))
            if ctx.hooks.on_node_success is not None:
                await ctx.call_hook(
                    "on_node_success", step_id, dump_state(output_model), usage.input_tokens + usage.output_tokens
                )
            _finish_step(step)
            return ctx.result(RunStatus.COMPLETED, output_model)

        # --- a failed attempt ------------------------------------------------------------------
        node_ctx = NodeContext(node_id=step_id, attempt=attempt, run_id=ctx.run_id)
        failure_class = classify(failure, node_ctx, ctx.classifiers)
        error_type = error_type_name(failure)
        arecord.fail(error_type, error_type)
        arecord.attributes[n.FAILURE_CLASS] = failure_class.otel_value
        exception_event: dict[str, Any] = {"exception.type": error_type}
        if telemetry.capture_content:
            telemetry.capture(arecord, "exception.message", error_message(failure))
            exception_event["exception.message"] = arecord.attributes.pop("exception.message", "")
        arecord.add_event("exception", exception_event)
        if isinstance(failure, ContractViolation):
            arecord.attributes[n.CONTRACT_OUTCOME] = n.CONTRACT_INVALID
            record.add_event(
                n.EVENT_CONTRACT_VIOLATION,
                {n.CONTRACT_DIRECTION: failure.direction, "stroma.contract.error_count": len(failure.errors)},
            )
        cost = _finish_attempt(step, arecord, usage, started, validated_input, None, (failure_class, failure))
        if shared is not None:
            await _settle_shared(step, shared, hold, cost, usage.input_tokens + usage.output_tokens)
        step.failures.append((usage.model or usage.asked_model, error_type))
        if ctx.hooks.on_node_failure is not None:
            await ctx.call_hook("on_node_failure", step_id, failure, failure_class)
        if isinstance(failure, BudgetExceeded):
            return _breach(step, failure, input_state)
        if check_budget and _unpriced_stop(step):
            return _stop(step, RunStatus.PARTIAL, input_state, _unpriced_message(step))

        policy = resolve_policy(failure_class, step_id, ctx.policy_map, ctx.step_policies)
        if failure_class is FailureClass.TERMINAL or attempt > policy.max_retries:
            status = RunStatus.FAILED if failure_class is FailureClass.TERMINAL else RunStatus.PARTIAL
            return _stop(step, status, input_state, _failure_message(step, failure), cls=failure_class)

        error_fallback(step, failure_class, usage.model)
        delays = policy_delays.get(failure_class)
        if delays is None:
            delays = policy_delays[failure_class] = policy.delays()
        delay = next(delays)
        step.retried.append((failure_class.otel_value, error_type))
        if check_budget and budget.max_latency_ms is not None:
            left_ms = budget.max_latency_ms - elapsed_ms(ctx.started_perf)
            if delay * 1000 >= left_ms:
                late = BudgetExceeded(
                    "latency",
                    float(budget.max_latency_ms),
                    float(elapsed_ms(ctx.started_perf) + delay * 1000),
                    step_id,
                )
                return _breach(step, late, input_state)
        if ctx.run_timeout_ms is not None and delay * 1000 >= ctx.run_timeout_ms - elapsed_ms(ctx.started_perf):
            return _stop(
                step,
                RunStatus.PARTIAL,
                input_state,
                f"run deadline of {ctx.run_timeout_ms} ms would pass during the retry delay; "
                f"last error: {_failure_message(step, failure)}",
            )
        if delay > 0:
            sleep = _sleep_override.get() or asyncio.sleep
            await sleep(delay)


def _unpriced_message(step: StepState) -> str:
    """Why ``unpriced="fail"`` stopped *step*: the step, the model(s) without a price, the fix."""
    models = sorted(step.ctx.unpriced_models)
    named = ", ".join(repr(bound_text(model, 128)) for model in models[:5])
    if len(models) > 5:
        named += f" and {len(models) - 5} more"
    example = bound_text(models[0], 128) if models else "<model>"
    return (
        f"step {step.step_id!r} used model(s) with no known price ({named}) and the budget's unpriced "
        "policy is 'fail', so the cost limit cannot be enforced; register a price with "
        f"stroma.pricing.set_price({example!r}, input_per_1m=..., output_per_1m=...) "
        "or set ExecutionBudget(unpriced='warn')"
    )


def _attempt_timeout(ctx: ReliabilityContext, timeout_ms: int | None) -> float | None:
    """Seconds the next attempt may take: its step timeout, capped by the run deadline."""
    timeout = timeout_ms / 1000.0 if timeout_ms is not None else None
    if ctx.run_timeout_ms is not None:
        left = (ctx.run_timeout_ms - elapsed_ms(ctx.started_perf)) / 1000.0
        timeout = left if timeout is None else min(timeout, left)
    return timeout


def _note_unpriced(ctx: ReliabilityContext, model: str) -> None:
    if model in ctx.unpriced_models:
        return
    ctx.unpriced_models.add(model)
    seen = len(ctx.unpriced_models)
    if seen > _UNPRICED_LOGGED:
        return  # every one is still flagged on its spans and listed in result.unpriced_models
    ctx.run_logger.warning(
        "model %s has no known price: its usage is counted as $0 and flagged stroma.cost.unpriced; "
        "register a price with stroma.pricing.set_price() (budget unpriced policy: %s)%s",
        model,
        ctx.budget.unpriced,
        "; further unpriced models of this run are not logged" if seen == _UNPRICED_LOGGED else "",
    )


_UNPRICED_LOGGED = 20
"""Unpriced models logged per run (one line each); later ones are only flagged."""


def _unpriced_stop(step: StepState) -> bool:
    """Whether the budget's ``unpriced="fail"`` policy ends the step now."""
    ctx = step.ctx
    return bool(ctx.unpriced_models) and ctx.budget.unpriced == "fail" and ctx.budget.max_cost_usd is not None


def _finish_attempt(
    step: StepState,
    arecord: SpanRecord,
    usage: _step_io.AttemptUsage,
    started: float,
    input_state: Any,
    output_state: Any,
    failed: tuple[FailureClass, Exception] | None,
) -> float:
    """Charge the attempt's usage, end its span and append its :class:`TraceEvent` (deferred);
    returns the attempt's cost in USD."""
    ctx = step.ctx
    # The attempt ends now: pricing and bookkeeping below are not charged to its duration.
    duration_ms = int((time.perf_counter() - started) * 1000)
    ended_ns = time.time_ns()
    if arecord.span_context is not None:
        genai_usage.settle(ctx.telemetry.usage_source, arecord, usage)  # issue 10: model-call spans
    model = note_fallback(step, usage.model)
    in_tok, out_tok = usage.input_tokens, usage.output_tokens
    cost, priced = cost_usd(model, in_tok, out_tok) if usage.cost is None else usage.cost
    unpriced = not priced
    attrs = arecord.attributes
    if in_tok or out_tok or model is not None:
        attrs[n.USAGE_INPUT_TOKENS] = in_tok
        attrs[n.USAGE_OUTPUT_TOKENS] = out_tok
        attrs[n.COST_AMOUNT] = float(cost)
        attrs[n.COST_CURRENCY] = n.CURRENCY_USD
        if unpriced:
            attrs[n.COST_UNPRICED] = True
        # A model name is user input: priced as given, but bounded in length wherever it is
        # kept or shown (spans, the cost tracker, logs, the result's unpriced_models).
        shown = bound_text(model) if model is not None else None
        if shown is not None:
            attrs[n.MODEL] = shown
            step.attempt_models.append(shown)
        ctx.cost_tracker.add(
            step.step_id,
            tokens_used=in_tok + out_tok,
            cost_usd=cost,
            latency_ms=duration_ms,
            model=shown,
            output_tokens=out_tok,
            unpriced=unpriced,
        )
        step.input_tokens += in_tok
        step.output_tokens += out_tok
        step.cost += cost
        ctx.input_tokens += in_tok
        ctx.output_tokens += out_tok
        ctx.total_cost += cost
        ctx.cost_by_step[step.step_id] = ctx.cost_by_step.get(step.step_id, 0.0) + cost
        if ctx.telemetry.enabled:
            ctx.telemetry.record_usage(ctx.workflow_name, step.step_id, model, in_tok, out_tok, cost, unpriced)
        if unpriced:
            _note_unpriced(ctx, shown or "unknown")
    step.attempts += 1
    ctx.check_budget_warning(step.record, step.step_id)
    if ctx.gate.active:
        ctx.gate.leave(cost, in_tok + out_tok)
    arecord.end_ns = ended_ns
    if arecord.span is not None:
        ctx.telemetry.finish(arecord)
    if ctx.keep_records:
        ctx.records.append(arecord)
    if failed is None:
        ctx.trace.append_deferred(AttemptEvent(ctx.run_id, arecord, input_state, output_state, duration_ms, None, None))
    else:
        failure_class, exc = failed
        ctx.trace.append_deferred(
            AttemptEvent(ctx.run_id, arecord, input_state, output_state, duration_ms, failure_class, error_message(exc))
        )
    return cost


async def _settle_shared(step: StepState, shared: SharedLimit, hold: Any, cost: float, tokens: int) -> None:
    """Replace the attempt's hold on the shared budget by what it actually spent (never raises)."""
    try:
        await shared.settle_attempt(hold, step.step_id, cost, tokens)
    except Exception as exc:
        step.ctx.run_logger.warning(
            "step %s: settling the shared budget raised %s; ignored", step.step_id, error_type_name(exc)
        )


def _finish_step(step: StepState) -> None:
    """End the step span with the totals over its attempts (design §4: step = sum of attempts)."""
    ctx = step.ctx
    record = step.record
    attrs = record.attributes
    attrs[n.STEP_COST_AMOUNT] = float(step.cost)
    attrs[n.STEP_USAGE_INPUT_TOKENS] = step.input_tokens
    attrs[n.STEP_USAGE_OUTPUT_TOKENS] = step.output_tokens
    attrs[n.STEP_ATTEMPT_COUNT] = step.attempts
    if step.attempt_models:
        attrs[n.MODEL] = step.attempt_models[-1]
    record.end_ns = time.time_ns()
    if record.span is not None:
        ctx.telemetry.finish(record)
    if ctx.keep_records:
        ctx.records.append(record)
    if ctx.telemetry.enabled:
        ctx.telemetry.record_step(ctx.workflow_name, record, step.retried)


def _stop(
    step: StepState,
    status: RunStatus,
    final_state: Any,
    message: str,
    *,
    cls: FailureClass | None = None,
) -> ExecutionResult:
    record = step.record
    last_error = step.failures[-1][1] if step.failures else "stroma.StepStopped"
    record.fail(last_error, f"step failed: {last_error}")
    if cls is not None:
        record.attributes[n.FAILURE_CLASS] = cls.otel_value
    _finish_step(step)
    # The log names the error type, not its message: messages can carry step content, and logs
    # are often exported. The caller gets the full message in ``result.error``.
    step.ctx.run_logger.warning(
        "step %s stopped (%s) after %d attempt(s): %s", step.step_id, status.value, step.attempts, last_error
    )
    return step.ctx.result(status, final_state, error=message, failed_step=step.step_id)


def _breach(step: StepState, breach: BudgetExceeded, final_state: Any) -> ExecutionResult:
    ctx = step.ctx
    ctx.breaches.append(breach)
    record = step.record
    record.add_event(n.EVENT_BUDGET_EXCEEDED, breach_attributes(breach))
    error_type = error_type_name(breach)
    record.fail(error_type, f"budget exceeded: {breach.dimension}")
    _finish_step(step)
    ctx.run_logger.warning("step %s: %s", step.step_id, breach)
    return ctx.result(RunStatus.PARTIAL, final_state, error=str(breach), failed_step=step.step_id)


def _failure_message(step: StepState, failure: Exception) -> str:
    """One message for the step: the last error, and each model's failures when several."""
    models: dict[str, list[str]] = {}
    for model, error_type in step.failures:
        models.setdefault(model or "(no model)", []).append(error_type)
    head = (
        f"step {step.step_id!r} failed after {len(step.failures)} attempt(s): "
        f"{error_type_name(failure)}: {error_message(failure)}"
    )
    if len(models) > 1:
        detail = "; ".join(f"{model}: {', '.join(errors)}" for model, errors in models.items())
        return f"{head} [per model: {detail}]"
    return head


async def _checkpoint(step: StepState, output: Any) -> None:
    ctx = step.ctx
    manager = ctx.checkpoint_manager
    if manager is None or not isinstance(output, BaseModel):
        return
    await manager.checkpoint(ctx.run_id, step.step_id, output)
    step.record.add_event(n.EVENT_CHECKPOINT_SAVED, {n.CHECKPOINT_STORE: getattr(manager, "store_kind", "custom")})


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
        import functools

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
