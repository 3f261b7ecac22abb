"""The reliability loop, as three steps repeated until one decision says stop.

:func:`run_step` is what :func:`stroma.middleware.execute_step` runs::

    prepare(step)                        # count the step, validate its input once
    while True:
        outcome = await admit(step)      # budget, admission gate, deadline, shared budget, model
        if outcome is None:              # admitted:
            outcome = await attempt(step)    # call, timeout, unpack, validate, charge, checkpoint
        verdict = decide(step, outcome)  # the one decision: Retry(delay) or Stop(status)
        if verdict is a Stop: return await conclude(step, verdict)
        await sleep(verdict.delay)

Every way a step ends goes through :func:`decide`: a refused admission, a budget breach, an
unpriced model under ``unpriced="fail"``, a terminal failure, exhausted retries, a retry delay
that would pass the latency limit or the run deadline, and success. What the loop writes on
spans and metrics is done by :mod:`stroma.telemetry.steps`, from what the loop tells it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from time import perf_counter, time_ns
from types import CoroutineType
from typing import Any

from pydantic import BaseModel

from stroma._loop.state import AttemptEvent, StepState, dump_state
from stroma._loop.step_io import (
    AttemptUsage,
    Fallbacks,
    accepts_context,
    as_input_class,
    enter_attempt,
    exit_attempt,
    unpack_output,
)
from stroma.context import ReliabilityContext, elapsed_ms, error_message, error_type_name
from stroma.contracts import ContractViolation, NodeContract
from stroma.cost import BudgetExceeded
from stroma.failures import FailureClass, NodeContext, classify, resolve_policy
from stroma.pricing import cost_usd
from stroma.telemetry import names as n
from stroma.telemetry import steps as spans
from stroma.telemetry._bounds import bound_text
from stroma.trace import ExecutionResult, RunStatus

Sleep = Callable[[float], Awaitable[None]]

SLEEP_OVERRIDE: ContextVar[Sleep | None] = ContextVar("stroma_sleep", default=None)
"""What waits out a retry delay instead of ``asyncio.sleep`` (see :func:`stroma.middleware.retry_sleep`)."""

UNPRICED_LOGGED = 20
"""Unpriced models logged per run (one line each); later ones are only flagged."""


class Outcome:
    """What one pass ended with: an admission refused (*breach* or *refusal*), or an attempt
    that returned *state* (its output; maybe with a *breach* after charging) or raised *failure*.

    *state* is what the step keeps if it stops now: the output paid for, else its input.
    """

    __slots__ = ("breach", "failure", "failure_class", "refusal", "state")

    def __init__(
        self,
        state: Any,
        *,
        breach: BudgetExceeded | None = None,
        failure: Exception | None = None,
        failure_class: FailureClass | None = None,
        refusal: str | None = None,
    ) -> None:
        self.state = state
        self.breach = breach
        self.failure = failure
        self.failure_class = failure_class
        self.refusal = refusal


class Stop:
    """The decision to end the step with *status* (and *state* as its final state)."""

    __slots__ = ("breach", "failure_class", "message", "state", "status")

    def __init__(
        self,
        status: RunStatus,
        state: Any,
        message: str | None = None,
        *,
        breach: BudgetExceeded | None = None,
        failure_class: FailureClass | None = None,
    ) -> None:
        self.status = status
        self.state = state
        self.message = message
        self.breach = breach
        self.failure_class = failure_class


class Retry:
    """The decision to run another attempt after *delay* seconds."""

    __slots__ = ("delay",)

    def __init__(self, delay: float) -> None:
        self.delay = delay


async def run_step(
    step_id: str, func: Callable[..., Any], input_state: Any, ctx: ReliabilityContext, contract: NodeContract | None
) -> ExecutionResult:
    """The loop of one step call (see the module docstring); ``BaseException`` propagates."""
    step = StepState(ctx, step_id, contract)
    token = spans.step_started(step)
    try:
        prepare(step, func, input_state)
        while True:
            outcome = await admit(step)
            if outcome is None:
                outcome = await attempt(step)
            verdict = decide(step, outcome)
            if type(verdict) is Stop:
                return await conclude(step, verdict)
            delay = step.delay = verdict.delay  # type: ignore[union-attr]
            if delay > 0:
                await (SLEEP_OVERRIDE.get() or asyncio.sleep)(delay)
    except BaseException as exc:
        # Cancellation and interpreter exits: no failure class, the span ends, it propagates.
        spans.step_interrupted(step, exc)
        raise
    finally:
        if token is not None:
            spans.step_left(step, token)


def prepare(step: StepState, func: Callable[..., Any], input_state: Any) -> None:
    """Count the step, register its contract, validate its input (once) and read the settings
    every attempt uses."""
    ctx = step.ctx
    contract = step.contract
    ctx.step_count += 1
    if contract is not None:
        ctx.registry.ensure(contract)
    if ctx.telemetry.capture_content:
        spans.content_seen(step, n.STEP_INPUT, input_state)
    step.input_state = step.validated_input = input_state
    if contract is not None:
        try:
            step.validated_input = ctx.registry.validate_input(step.step_id, input_state)
        except ContractViolation as violation:
            step.input_error = violation  # every attempt fails with it (classified TERMINAL)
    step.func = func
    step.pass_context = accepts_context(func)
    step.timeout_ms = ctx.step_timeouts.get(step.step_id)
    step.check_budget = not ctx.budget.is_unlimited
    step.gate = ctx.gate if ctx.gate.active else None
    step.shared = ctx.shared_budget


# --- admit -----------------------------------------------------------------------------------


async def admit(step: StepState) -> Outcome | None:
    """Admit the next attempt: ``None`` when it may run (its timeout, shared-budget hold and
    fallback policies set on *step*), else the :class:`Outcome` that refused it."""
    ctx = step.ctx
    step.attempt += 1
    state = step.input_state
    if step.check_budget:
        breach = _start_refused(step)
        if breach is not None:
            return Outcome(state, breach=breach)
    gate = step.gate
    if gate is not None and await gate.enter(ctx.spent):
        breach = _start_refused(step)  # others spent while this attempt waited for its turn
        if breach is not None:
            gate.release()
            return Outcome(state, breach=breach)
    timeout = None if ctx.run_timeout_ms is None and step.timeout_ms is None else attempt_timeout(ctx, step.timeout_ms)
    if timeout is not None and timeout <= 0:
        if gate is not None:
            gate.release()
        return Outcome(state, refusal=f"run deadline of {ctx.run_timeout_ms} ms passed")
    step.timeout = timeout
    shared = step.shared
    if shared is not None:
        # A limit shared with other processes: reserve this attempt's estimate, or stop.
        try:
            step.hold = await shared.reserve_attempt(step.step_id, ctx.run_id)
        except Exception as refused:
            if gate is not None:
                gate.release()
            if isinstance(refused, BudgetExceeded):
                return Outcome(state, breach=refused)
            return Outcome(
                state,
                refusal=f"the shared budget could not be consulted before an attempt of step {step.step_id!r} "
                f"({error_type_name(refused)}: {error_message(refused)})",
            )
    if ctx.model_fallbacks:
        choose_fallbacks(step)
    return None


def _start_refused(step: StepState) -> BudgetExceeded | None:
    """The breach that forbids an attempt to start now (a limit already reached), if any."""
    ctx = step.ctx
    try:
        ctx.cost_tracker.check_can_start(ctx.budget, step.step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
    except BudgetExceeded as blocked:
        return blocked
    return None


def attempt_timeout(ctx: ReliabilityContext, timeout_ms: int | None) -> float | None:
    """Seconds the next attempt may take: its step timeout, capped by the run deadline."""
    timeout = timeout_ms / 1000.0 if timeout_ms is not None else None
    if ctx.run_timeout_ms is not None:
        left = (ctx.run_timeout_ms - elapsed_ms(ctx.started_perf)) / 1000.0
        timeout = left if timeout is None else min(timeout, left)
    return timeout


def choose_fallbacks(step: StepState) -> None:
    """The fallback policies as they stand for the next attempt (the run's cost utilization
    now, the step's failures so far), for :func:`stroma.current_model`. The first one that
    applies is also put in ``ctx.context["_stroma_model"]``, as the established API did."""
    ctx = step.ctx
    fallbacks = step.fallbacks = Fallbacks(ctx.model_fallbacks, ctx.cost_tracker.utilization(ctx.budget), step.failed)
    policy = fallbacks.policy_for(None)
    if policy is None:
        ctx.context.pop("_stroma_model", None)
    else:
        ctx.context["_stroma_model"] = policy.fallback_model


# --- attempt ---------------------------------------------------------------------------------


async def attempt(step: StepState) -> Outcome:
    """Run one admitted attempt and charge it: the :class:`Outcome` says how it went.

    A ``BaseException`` ends the attempt span (charging what it reported) and propagates.
    """
    record, token = spans.attempt_started(step)
    started = perf_counter()
    usage, usage_token = enter_attempt(step.fallbacks, step.step_id)
    failure: Exception | None = None
    try:
        output = await call(step, usage)
    except Exception as exc:
        failure = exc
    except BaseException as exc:
        spans.attempt_interrupted(record, exc)
        charge(step, record, usage, started, None, None)
        raise
    finally:
        exit_attempt(usage_token)
        if token is not None:
            spans.attempt_left(step, token)
    if failure is not None:
        return await _failed(step, record, usage, started, failure)
    spans.attempt_valid(step, record)
    cost = charge(step, record, usage, started, output, None)
    if step.shared is not None:
        await settle_shared(step, cost, usage.input_tokens + usage.output_tokens)
    breach = None
    if step.check_budget:
        ctx = step.ctx
        try:
            ctx.cost_tracker.check_budget(ctx.budget, step.step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
        except BudgetExceeded as exc:
            breach = exc
    await checkpoint(step, output)
    if step.ctx.telemetry.capture_content:
        spans.content_seen(step, n.STEP_OUTPUT, output)
    return Outcome(output, breach=breach)


async def call(step: StepState, usage: AttemptUsage) -> Any:
    """Call the step (with its timeout), read its usage and return its validated output."""
    if step.input_error is not None:
        raise step.input_error
    ctx = step.ctx
    step_id = step.step_id
    state = step.validated_input
    if ctx.hooks.on_node_start is not None:
        await ctx.call_hook("on_node_start", step_id, dump_state(state))
    outcome = step.func(state, ctx.context) if step.pass_context else step.func(state)
    if type(outcome) is CoroutineType or inspect.isawaitable(outcome):
        timeout = step.timeout
        if timeout is None:
            outcome = await outcome
        else:
            try:
                outcome = await asyncio.wait_for(outcome, timeout)
            except asyncio.TimeoutError as exc:
                # on 3.10 asyncio's TimeoutError is not the builtin one classifiers test for
                raise TimeoutError(f"step {step_id!r} timed out after {timeout:.3f} s") from exc
    raw_output, in_tok, out_tok, declared_model = unpack_output(step_id, outcome)
    if in_tok or out_tok:
        # returned usage adds to what report_usage() recorded (each count was checked by unpack_output)
        usage.add(step_id, in_tok, out_tok)
    if declared_model is not None:
        usage.model = declared_model
    if step.contract is not None:
        return ctx.registry.validate_output(step_id, raw_output)
    return as_input_class(state, raw_output)


async def _failed(step: StepState, record: Any, usage: AttemptUsage, started: float, failure: Exception) -> Outcome:
    """Classify and charge a failed attempt, tell the failure hook."""
    ctx = step.ctx
    node_ctx = NodeContext(node_id=step.step_id, attempt=step.attempt, run_id=ctx.run_id)
    failure_class = classify(failure, node_ctx, ctx.classifiers)
    error_type = spans.attempt_failed(step, record, failure, failure_class)
    cost = charge(step, record, usage, started, None, (failure_class, failure))
    if step.shared is not None:
        await settle_shared(step, cost, usage.input_tokens + usage.output_tokens)
    step.failures.append((usage.model or usage.asked_model, error_type))
    step.failed.append((usage.model, failure_class))
    if ctx.hooks.on_node_failure is not None:
        await ctx.call_hook("on_node_failure", step.step_id, failure, failure_class)
    return Outcome(step.input_state, failure=failure, failure_class=failure_class)


def charge(
    step: StepState,
    record: Any,
    usage: AttemptUsage,
    started: float,
    output_state: Any,
    failed: tuple[FailureClass, Exception] | None,
) -> float:
    """Charge the attempt's usage to the run, end its span and append its trace event
    (deferred); returns the attempt's cost in USD."""
    ctx = step.ctx
    # The attempt ends now: pricing and bookkeeping below are not charged to its duration.
    duration_ms = int((perf_counter() - started) * 1000)
    ended_ns = time_ns()
    if record.span_context is not None:  # a live span: model calls may have been traced below it
        spans.usage_settled(step, record, usage)
    model = usage.model if step.fallbacks is None else charged_model(step, usage.model)
    in_tok, out_tok = usage.input_tokens, usage.output_tokens
    cost = 0.0
    charged = None
    if in_tok or out_tok or model is not None:
        cost, priced = cost_usd(model, in_tok, out_tok) if usage.cost is None else usage.cost
        # A model name is user input: priced as given, but bounded in length wherever it is
        # kept or shown (spans, the cost tracker, logs, the result's unpriced_models).
        shown = bound_text(model) if model is not None else None
        if shown is not None:
            step.attempt_models.append(shown)
        ctx.cost_tracker.add(
            step.step_id,
            tokens_used=in_tok + out_tok,
            cost_usd=cost,
            latency_ms=duration_ms,
            model=shown,
            output_tokens=out_tok,
            unpriced=not priced,
        )
        step.input_tokens += in_tok
        step.output_tokens += out_tok
        step.cost += cost
        charged = (model, shown, in_tok, out_tok, cost, not priced)
        if not priced:
            note_unpriced(ctx, shown or "unknown")
    step.attempts += 1
    step.last_tokens = in_tok + out_tok
    ctx.check_budget_warning(step.record, step.step_id)
    if step.gate is not None:
        step.gate.leave(cost, in_tok + out_tok)
    spans.attempt_ended(step, record, ended_ns, charged)
    failure_class, message = (None, None) if failed is None else (failed[0], error_message(failed[1]))
    ctx.trace.append_deferred(
        AttemptEvent(ctx.run_id, record, step.validated_input, output_state, duration_ms, failure_class, message)
    )
    return cost


def charged_model(step: StepState, model: str | None) -> str | None:
    """The model an attempt that used *model* is charged for, recording the fallback on the
    step (once) when *model* shows one happened: the attempt used a policy's fallback model, or
    asked for its preferred model while the policy applied (then it is charged at the fallback's
    price, as the established ``resolve_model()`` did)."""
    fallbacks = step.fallbacks
    if fallbacks is None or model is None:
        return model
    policy = fallbacks.policy_used(model)
    if policy is None:
        return model
    if not step.fallback_recorded:
        step.fallback_recorded = True
        step.fallback = policy
        reason = n.FALLBACK_REASON_BUDGET if policy.on_failure is None else n.FALLBACK_REASON_ERROR
        spans.fallback_taken(step, policy, reason)
        step.ctx.run_logger.info(
            "step %s falls back from %s to %s (%s)", step.step_id, policy.preferred_model, policy.fallback_model, reason
        )
    return policy.fallback_model


def note_unpriced(ctx: ReliabilityContext, model: str) -> None:
    """Remember (and log, for the first :data:`UNPRICED_LOGGED` of the run) an unpriced model."""
    if model in ctx.unpriced_models:
        return
    ctx.unpriced_models.add(model)
    seen = len(ctx.unpriced_models)
    if seen > UNPRICED_LOGGED:
        return  # every one is still flagged on its spans and listed in result.unpriced_models
    ctx.run_logger.warning(
        "model %s has no known price: its usage is counted as $0 and flagged stroma.cost.unpriced; "
        "register a price with stroma.pricing.set_price() (budget unpriced policy: %s)%s",
        model,
        ctx.budget.unpriced,
        "; further unpriced models of this run are not logged" if seen == UNPRICED_LOGGED else "",
    )


async def settle_shared(step: StepState, cost: float, tokens: int) -> None:
    """Replace the attempt's hold on the shared budget by what it actually spent (never raises)."""
    try:
        await step.shared.settle_attempt(step.hold, step.step_id, cost, tokens)  # type: ignore[union-attr]
    except Exception as exc:
        step.ctx.run_logger.warning(
            "step %s: settling the shared budget raised %s; ignored", step.step_id, error_type_name(exc)
        )


async def checkpoint(step: StepState, output: Any) -> None:
    """Checkpoint a model output (a store failure raises ``CheckpointError``: fail closed)."""
    ctx = step.ctx
    manager = ctx.checkpoint_manager
    if manager is None or not isinstance(output, BaseModel):
        return
    await manager.checkpoint(ctx.run_id, step.step_id, output)
    spans.checkpoint_saved(step, getattr(manager, "store_kind", "custom"))


# --- decide ----------------------------------------------------------------------------------


def decide(step: StepState, outcome: Outcome) -> Stop | Retry:
    """The one decision after each pass: stop with a status, or retry after a delay."""
    state = outcome.state
    if outcome.refusal is not None:
        return Stop(RunStatus.PARTIAL, state, outcome.refusal)
    failure = outcome.failure
    breach = outcome.breach
    if breach is None and isinstance(failure, BudgetExceeded):
        breach = failure
    if breach is not None:
        return Stop(RunStatus.PARTIAL, state, str(breach), breach=breach)
    ctx = step.ctx
    budget = ctx.budget
    if step.check_budget and ctx.unpriced_models and budget.unpriced == "fail" and budget.max_cost_usd is not None:
        return Stop(RunStatus.PARTIAL, state, unpriced_message(step))  # spend can no longer be enforced
    if failure is None:
        return Stop(RunStatus.COMPLETED, state)
    failure_class = outcome.failure_class
    assert failure_class is not None  # set with every failure (_failed)
    policy = resolve_policy(failure_class, step.step_id, ctx.policy_map, ctx.step_policies)
    if failure_class is FailureClass.TERMINAL or step.attempt > policy.max_retries:
        status = RunStatus.FAILED if failure_class is FailureClass.TERMINAL else RunStatus.PARTIAL
        return Stop(status, state, failure_message(step, failure), failure_class=failure_class)
    delays = step.policy_delays
    if delays is None:
        delays = step.policy_delays = {}
    draws = delays.get(failure_class)
    if draws is None:
        draws = delays[failure_class] = policy.delays()
    delay = next(draws)
    step.retried.append((failure_class.otel_value, step.failures[-1][1]))
    if step.check_budget and budget.max_latency_ms is not None:
        used_ms = elapsed_ms(ctx.started_perf)
        if delay * 1000 >= budget.max_latency_ms - used_ms:
            late = BudgetExceeded("latency", float(budget.max_latency_ms), float(used_ms + delay * 1000), step.step_id)
            return Stop(RunStatus.PARTIAL, state, str(late), breach=late)
    if ctx.run_timeout_ms is not None and delay * 1000 >= ctx.run_timeout_ms - elapsed_ms(ctx.started_perf):
        return Stop(
            RunStatus.PARTIAL,
            state,
            f"run deadline of {ctx.run_timeout_ms} ms would pass during the retry delay; "
            f"last error: {failure_message(step, failure)}",
        )
    return Retry(delay)


def unpriced_message(step: StepState) -> str:
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


def failure_message(step: StepState, failure: Exception) -> str:
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


# --- conclude --------------------------------------------------------------------------------


async def conclude(step: StepState, stop: Stop) -> ExecutionResult:
    """Carry out a :class:`Stop`: the success hook, the step span's end, the log line, the result."""
    ctx = step.ctx
    status = stop.status
    if status is RunStatus.COMPLETED:
        if ctx.hooks.on_node_success is not None:
            await ctx.call_hook("on_node_success", step.step_id, dump_state(stop.state), step.last_tokens)
        spans.step_ended(step)
        return ctx.result(RunStatus.COMPLETED, stop.state)
    breach = stop.breach
    if breach is not None:
        ctx.breaches.append(breach)
        spans.step_ended(
            step, error_type=error_type_name(breach), description=f"budget exceeded: {breach.dimension}", breach=breach
        )
        ctx.run_logger.warning("step %s: %s", step.step_id, breach)
    else:
        last_error = step.failures[-1][1] if step.failures else "stroma.StepStopped"
        spans.step_ended(
            step, error_type=last_error, description=f"step failed: {last_error}", failure_class=stop.failure_class
        )
        # The log names the error type, not its message: messages can carry step content, and
        # logs are often exported. The caller gets the full message in ``result.error``.
        ctx.run_logger.warning(
            "step %s stopped (%s) after %d attempt(s): %s", step.step_id, status.value, step.attempts, last_error
        )
    return ctx.result(status, stop.state, error=stop.message, failed_step=step.step_id)
