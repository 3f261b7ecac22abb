"""The reliability loop: :func:`execute_step`, :class:`ReliabilityContext` and :class:`StromaStep`.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from stroma import _step_io
from stroma._admission import BudgetGate
from stroma.contracts import ContractRegistry, ContractViolation, NodeContract
from stroma.cost import BudgetExceeded, CostTracker, ExecutionBudget, FallbackPolicy, NodeUsage
from stroma.failures import (
    Classifier,
    FailureClass,
    NodeContext,
    PolicyMap,
    RetryBudget,
    classify,
    resolve_policy,
)
from stroma.pricing import cost_usd
from stroma.telemetry import names as n
from stroma.telemetry import sinks
from stroma.telemetry.records import AttributeValue, SpanRecord
from stroma.telemetry.runtime import Telemetry, get_telemetry
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus, TraceEvent

if TYPE_CHECKING:
    from stroma.checkpoint import CheckpointManager
    from stroma.config import NodeHooks, RunConfig

logger = logging.getLogger("stroma")

Sleep = Callable[[float], Awaitable[None]]
_sleep_override: ContextVar[Sleep | None] = ContextVar("stroma_sleep", default=None)

T = TypeVar("T")


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


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    if module in ("builtins", "asyncio.exceptions"):
        return cls.__qualname__
    if module.startswith("stroma."):
        return f"stroma.{cls.__qualname__}"
    return f"{module}.{cls.__qualname__}"


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


@dataclass(eq=False)
class ReliabilityContext:
    """Everything the loop needs for one run, threaded through whatever drives the steps.

    Create it with :meth:`for_run` (or let :class:`~stroma.runner.StromaRunner` do it). A
    context may be used as a run span of its own with :meth:`as_run`; without it, the steps of
    a freestanding context nest under whatever span is current.

    The records of finished steps and attempts are kept here, not in any global registry, and
    are released by :meth:`build_result`; nothing outlives the context.
    """

    run_id: str
    registry: ContractRegistry
    checkpoint_manager: CheckpointManager | None
    cost_tracker: CostTracker
    retry_budget: RetryBudget
    trace: ExecutionTrace
    budget: ExecutionBudget
    policy_map: PolicyMap
    step_policies: dict[str, PolicyMap]
    classifiers: list[Classifier]
    step_timeouts: dict[str, int]
    model_fallbacks: list[FallbackPolicy]
    hooks: NodeHooks
    context: dict[str, Any]
    workflow_name: str = "pipeline"
    run_timeout_ms: int | None = None
    telemetry: Telemetry = field(default_factory=get_telemetry)
    run_logger: logging.LoggerAdapter[logging.Logger] = field(init=False)
    started_perf: float = field(init=False, default_factory=time.perf_counter)
    records: list[SpanRecord] = field(init=False, default_factory=list)
    keep_records: bool = field(init=False, default=False)
    breaches: list[BudgetExceeded] = field(init=False, default_factory=list)
    cost_by_step: dict[str, float] = field(init=False, default_factory=dict)
    input_tokens: int = field(init=False, default=0)
    output_tokens: int = field(init=False, default=0)
    total_cost: float = field(init=False, default=0.0)
    unpriced_models: set[str] = field(init=False, default_factory=set)
    step_count: int = field(init=False, default=0)
    run_record: SpanRecord | None = field(init=False, default=None)
    finished: bool = field(init=False, default=False)
    _hook_faults: set[str] = field(init=False, default_factory=set)
    gate: BudgetGate = field(init=False)

    def __post_init__(self) -> None:
        self.run_logger = logging.LoggerAdapter(logger, {"run_id": self.run_id})
        self.gate = BudgetGate(self.budget)
        # Span records are kept for the run sinks (the local run store) only.
        self.keep_records = sinks.has_run_sinks()

    def spent(self) -> tuple[float, int]:
        """``(cost in USD, tokens)`` spent by this run so far."""
        return self.total_cost, self.input_tokens + self.output_tokens

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        registry: ContractRegistry,
        checkpoint_manager: CheckpointManager | None,
    ) -> ReliabilityContext:
        """A fresh context for one run of *config* (counters, trace and records start empty).

        ``config.context`` is shared with the steps as given (the established behaviour);
        everything else is per run. Setting ``STROMA_RUN_STORE`` turns the local run store on
        (:mod:`stroma.runstore`) for the runs created from then on.
        """
        from stroma.runstore import enable_from_env

        enable_from_env()
        return cls(
            run_id=config.run_id,
            registry=registry,
            checkpoint_manager=checkpoint_manager,
            cost_tracker=CostTracker(),
            retry_budget=RetryBudget(),
            trace=ExecutionTrace(),
            budget=config.budget,
            policy_map=config.policy_map,
            step_policies=config.node_policies,
            classifiers=config.classifiers,
            step_timeouts=config.node_timeouts,
            model_fallbacks=config.model_fallbacks,
            hooks=config.hooks,
            context=config.context,
            workflow_name=config.workflow_name,
            run_timeout_ms=config.run_timeout_ms,
            telemetry=get_telemetry(config.telemetry),
        )

    # --- the run span ------------------------------------------------------------------------

    @contextmanager
    def as_run(self, *, links: list[Any] | None = None, resumed_from: str | None = None) -> Iterator[SpanRecord]:
        """Open the run span (``run {workflow}``) and make it current while the block runs.

        Steps executed inside nest under it. :meth:`build_result` inside the block ends it with
        the run's status and totals; leaving the block by an exception ends it as failed
        (the exception propagates). *links* (OpenTelemetry ``Link`` objects) point at the run a
        resumed run continues.
        """
        attributes: dict[str, Any] = {
            n.RUN_ID: self.run_id,
            n.GEN_AI_OPERATION_NAME: n.OPERATION_INVOKE_WORKFLOW,
            n.GEN_AI_WORKFLOW_NAME: self.workflow_name,
        }
        if resumed_from is not None:
            attributes[n.RUN_RESUMED_FROM] = resumed_from
        record = SpanRecord(n.SPAN_RUN, f"{n.SPAN_RUN} {self.workflow_name}", attributes, time.time_ns())
        self.run_record = record
        self.started_perf = time.perf_counter()
        self.telemetry.start(record, links)
        token = self.telemetry.set_current(record)
        try:
            yield record
        except BaseException as exc:
            if not self.finished:
                record.fail(_error_type(exc), "run interrupted")
                self._end_run(RunStatus.FAILED)
            raise
        finally:
            self.telemetry.reset_current(token)
            if not self.finished:
                self._end_run(RunStatus.FAILED)

    def _end_run(self, status: RunStatus) -> None:
        record = self.run_record
        if record is None or record.end_ns is not None:
            return
        attrs = record.attributes
        attrs[n.RUN_STATUS] = status.otel_value
        attrs[n.RUN_COST_AMOUNT] = float(self.total_cost)
        attrs[n.RUN_USAGE_INPUT_TOKENS] = int(self.input_tokens)
        attrs[n.RUN_USAGE_OUTPUT_TOKENS] = int(self.output_tokens)
        attrs[n.RUN_STEP_COUNT] = int(self.step_count)
        utilization = self._budget_attributes(attrs)
        for breach in self.breaches:
            record.add_event(n.EVENT_BUDGET_EXCEEDED, _breach_attributes(breach))
        if status is RunStatus.FAILED and record.error_type is None:
            record.fail("stroma.RunFailed", "a step failed")
        record.end_ns = time.time_ns()
        self.telemetry.finish(record)
        self.telemetry.record_run(self.workflow_name, record, status.otel_value, utilization)

    def _budget_attributes(self, attrs: dict[str, Any]) -> float | None:
        budget = self.budget
        utilization = None
        if budget.max_cost_usd is not None:
            attrs[n.BUDGET_COST_LIMIT] = float(budget.max_cost_usd)
            attrs[n.BUDGET_COST_USAGE] = float(self.total_cost)
            if budget.max_cost_usd > 0:
                utilization = float(self.total_cost / budget.max_cost_usd)
                attrs[n.BUDGET_COST_UTILIZATION] = utilization
        if budget.max_tokens_total is not None:
            attrs[n.BUDGET_TOKEN_LIMIT] = int(budget.max_tokens_total)
            attrs[n.BUDGET_TOKEN_USAGE] = int(self.input_tokens + self.output_tokens)
        if budget.max_latency_ms is not None:
            attrs[n.BUDGET_DURATION_LIMIT] = float(budget.max_latency_ms) / 1000.0
            attrs[n.BUDGET_DURATION_USAGE] = time.perf_counter() - self.started_perf
        return utilization

    # --- results -----------------------------------------------------------------------------

    def result(
        self,
        status: RunStatus,
        final_state: Any,
        *,
        error: str | None = None,
        failed_step: str | None = None,
    ) -> ExecutionResult:
        """The run's result so far, without ending the run (what each step call returns)."""
        run = self.run_record
        return ExecutionResult(
            run_id=self.run_id,
            status=status,
            final_state=final_state,
            trace=self.trace,
            total_cost_usd=self.total_cost,
            total_tokens=self.input_tokens + self.output_tokens,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            unpriced_models=tuple(sorted(self.unpriced_models)),
            error=error,
            failed_step=failed_step,
            budget_exceeded=self.breaches[0] if self.breaches else None,
            cost_by_step=dict(self.cost_by_step),
            trace_id=run.trace_id if run is not None else None,
        )

    def build_result(
        self,
        status: RunStatus,
        final_state: Any,
        *,
        error: str | None = None,
        failed_step: str | None = None,
    ) -> ExecutionResult:
        """The run's final :class:`~stroma.trace.ExecutionResult`, assembled from its records.

        Each attempt span became one :class:`~stroma.trace.TraceEvent` of ``result.trace``;
        totals are those of the step spans. Ends the run span (if :meth:`as_run` opened one)
        with *status*, and releases the run's span records: after this the context holds no
        per-step data beyond the trace returned to the caller.
        """
        result = self.result(status, final_state, error=error, failed_step=failed_step)
        if not self.finished:
            self._end_run(status)
            self.finished = True
            if sinks.has_run_sinks():
                budget = self.budget
                run_records = (self.run_record,) if self.run_record is not None else ()
                sinks.emit(
                    sinks.FinishedRun(
                        run_id=self.run_id,
                        workflow_name=self.workflow_name,
                        status=status.otel_value,
                        total_cost_usd=self.total_cost,
                        input_tokens=self.input_tokens,
                        output_tokens=self.output_tokens,
                        error=error,
                        records=(*run_records, *self.records),
                        budget=budget.model_dump(),
                    )
                )
            self.records.clear()
        return result

    def restore_step(
        self,
        step_id: str,
        output: Any,
        *,
        cost_usd: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        model: str | None = None,
    ) -> ExecutionResult:
        """Account for a step that already completed in an earlier run of this run id.

        Adds a ``step`` span marked ``stroma.step.skipped`` with a ``stroma.checkpoint.restored``
        event and no attempts. Its usage counts in this run's totals and budget (the money was
        spent on this run) but not in the metrics again (they were counted when it ran).
        """
        record = SpanRecord(
            n.SPAN_STEP,
            f"{n.SPAN_STEP} {step_id}",
            {n.STEP_ID: step_id, n.RUN_ID: self.run_id, n.STEP_SKIPPED: True, n.STEP_ATTEMPT_COUNT: 0},
            time.time_ns(),
            self.run_record,
        )
        self.telemetry.start(record)
        attrs = record.attributes
        attrs[n.STEP_COST_AMOUNT] = float(cost_usd)
        attrs[n.STEP_USAGE_INPUT_TOKENS] = int(input_tokens)
        attrs[n.STEP_USAGE_OUTPUT_TOKENS] = int(output_tokens)
        if model is not None:
            attrs[n.MODEL] = model
        store_kind = getattr(self.checkpoint_manager, "store_kind", "custom")
        record.add_event(n.EVENT_CHECKPOINT_RESTORED, {n.CHECKPOINT_STORE: store_kind})
        if input_tokens or output_tokens or cost_usd:
            self.cost_tracker.record(
                NodeUsage(
                    node_id=step_id,
                    tokens_used=int(input_tokens) + int(output_tokens),
                    cost_usd=float(cost_usd),
                    latency_ms=0,
                    model=model,
                    output_tokens=int(output_tokens),
                )
            )
        self.input_tokens += int(input_tokens)
        self.output_tokens += int(output_tokens)
        self.total_cost += float(cost_usd)
        if input_tokens or output_tokens or cost_usd:
            self.cost_by_step[step_id] = self.cost_by_step.get(step_id, 0.0) + float(cost_usd)
        self.step_count += 1
        record.end_ns = time.time_ns()
        self.telemetry.finish(record)
        if self.keep_records:
            self.records.append(record)
        return self.result(RunStatus.COMPLETED, output)

    # --- hooks -------------------------------------------------------------------------------

    async def call_hook(self, name: str, *args: Any) -> None:
        """Run hook *name* if set; a hook's ``Exception`` is logged once and ignored."""
        hook = getattr(self.hooks, name, None)
        if hook is None:
            return
        try:
            outcome = hook(self.run_id, *args)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:
            if name not in self._hook_faults:
                self._hook_faults.add(name)
                self.run_logger.warning(
                    "hook %s raised %s; ignored (the step's outcome is unchanged; later faults of this "
                    "hook in this run are not logged)",
                    name,
                    _error_type(exc),
                    exc_info=exc,
                )


def _breach_attributes(breach: BudgetExceeded) -> dict[str, Any]:
    return {
        n.BUDGET_DIMENSION: breach.dimension,
        n.BUDGET_LIMIT: float(breach.limit),
        n.BUDGET_USAGE: float(breach.actual),
        n.STEP_ID: breach.node_id,
    }


class _Step:
    """The state of one :func:`execute_step` call (one step span)."""

    __slots__ = (
        "attempt_models",
        "attempts",
        "contract",
        "cost",
        "ctx",
        "failures",
        "fallback",
        "fallback_reason",
        "fallback_recorded",
        "input_tokens",
        "output_tokens",
        "record",
        "retried",
        "step_id",
    )

    def __init__(self, ctx: ReliabilityContext, step_id: str, contract: NodeContract | None) -> None:
        self.ctx = ctx
        self.step_id = step_id
        self.contract = contract
        self.record = SpanRecord(
            n.SPAN_STEP,
            f"{n.SPAN_STEP} {step_id}",
            {n.STEP_ID: step_id, n.RUN_ID: ctx.run_id},
            time.time_ns(),
            ctx.run_record,
        )
        self.retried: list[tuple[str, str]] = []
        self.failures: list[tuple[str | None, str]] = []
        self.fallback: FallbackPolicy | None = None
        self.fallback_reason = n.FALLBACK_REASON_BUDGET
        self.fallback_recorded = False
        self.attempt_models: list[str] = []
        self.attempts = 0
        self.cost = 0.0
        self.input_tokens = 0
        self.output_tokens = 0


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

    *func* is called as ``func(state)`` or, if it takes two positional parameters,
    ``func(state, ctx.context)``; it may be a coroutine function or a plain function (a plain
    function runs on the event loop's thread, so it should not block for long; a timeout cannot
    interrupt it). It returns a state, or ``(state, tokens)``, ``(state, input_tokens, model)``
    or ``(state, input_tokens, output_tokens, model)``; usage can also be reported from inside
    with :func:`stroma.report_usage`.

    With *contract*, the input and output are validated against it (it is registered in
    ``ctx.registry`` if it is not there yet) and the validated output is checkpointed; without
    one, states pass through unvalidated and only model outputs are checkpointed.

    Returns the run's :class:`~stroma.trace.ExecutionResult` so far: ``COMPLETED`` with the
    output as ``final_state``; ``FAILED`` (terminal failure, invalid input) or ``PARTIAL``
    (retries exhausted, budget breached, run deadline passed) with ``error`` and
    ``failed_step`` set. A budget breach keeps the output that was paid for as
    ``final_state``. ``BaseException`` (cancellation, ``KeyboardInterrupt``) propagates.
    """
    step = _Step(ctx, step_id, contract)
    telemetry = ctx.telemetry
    record = step.record
    telemetry.start(record)
    step_token = telemetry.set_current(record)
    try:
        return await _run_step(step, func, input_state)
    except BaseException as exc:
        # Cancellation and interpreter exits: no failure class, the span ends, it propagates.
        if record.end_ns is None:
            record.fail(_error_type(exc), "interrupted")
            _finish_step(step)
        raise
    finally:
        telemetry.reset_current(step_token)


async def _run_step(step: _Step, func: Callable[..., Any], input_state: Any) -> ExecutionResult:
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
    policy_delays: dict[FailureClass, Iterator[float]] = {}
    delay = 0.0
    attempt = 0

    while True:
        attempt += 1
        # --- before the attempt: budget, deadline, model ---------------------------------------
        if check_budget:
            try:
                ctx.cost_tracker.check_can_start(budget, step_id, elapsed_ms=_elapsed_ms(ctx.started_perf))
            except BudgetExceeded as blocked:
                return _breach(step, blocked, input_state)
        if gate is not None and await gate.enter(ctx.spent):
            # others spent while this attempt waited for its turn: check again
            try:
                ctx.cost_tracker.check_can_start(budget, step_id, elapsed_ms=_elapsed_ms(ctx.started_perf))
            except BudgetExceeded as blocked:
                gate.release()
                return _breach(step, blocked, input_state)
        attempt_timeout = _attempt_timeout(ctx, timeout_ms)
        if attempt_timeout is not None and attempt_timeout <= 0:
            if gate is not None:
                gate.release()
            return _stop(step, RunStatus.PARTIAL, input_state, f"run deadline of {ctx.run_timeout_ms} ms passed")
        fallback = _choose_model(step)

        arecord = SpanRecord(
            n.SPAN_ATTEMPT,
            f"{n.SPAN_ATTEMPT} {step_id}",
            {n.STEP_ID: step_id, n.STEP_ATTEMPT_NUMBER: attempt, n.STEP_RETRY_DELAY: float(delay)},
            time.time_ns(),
            record,
        )
        started = time.perf_counter()
        telemetry.start(arecord)
        attempt_token = telemetry.set_current(arecord)
        if fallback is None:
            usage, usage_token = _step_io.enter_attempt(None, None)
        else:
            usage, usage_token = _step_io.enter_attempt(fallback.preferred_model, fallback.fallback_model)
        output_model: Any = None
        failure: Exception | None = None
        try:
            if input_error is not None:
                raise input_error
            if ctx.hooks.on_node_start is not None:
                await ctx.call_hook("on_node_start", step_id, _dump(validated_input))
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
            usage.input_tokens += in_tok
            usage.output_tokens += out_tok
            if declared_model is not None:
                usage.model = declared_model
            if contract is not None:
                output_model = ctx.registry.validate_output(step_id, raw_output)
            else:
                output_model = raw_output
        except Exception as exc:
            failure = exc
        except BaseException as exc:
            arecord.fail(_error_type(exc), "interrupted")
            _finish_attempt(step, arecord, usage, started, validated_input, None, None)
            raise
        finally:
            _step_io.exit_attempt(usage_token)
            telemetry.reset_current(attempt_token)

        # --- after the attempt -----------------------------------------------------------------
        if failure is None:
            arecord.attributes[n.CONTRACT_OUTCOME] = n.CONTRACT_VALID if contract is not None else "unchecked"
            _finish_attempt(step, arecord, usage, started, validated_input, output_model, None)
            breach = None
            if check_budget:
                try:
                    ctx.cost_tracker.check_budget(budget, step_id, elapsed_ms=_elapsed_ms(ctx.started_perf))
                except BudgetExceeded as exc:
                    breach = exc
            await _checkpoint(step, output_model)
            if telemetry.capture_content:
                telemetry.capture(record, n.STEP_OUTPUT, output_model)
            if breach is not None:
                return _breach(step, breach, output_model)
            if check_budget and _unpriced_stop(step):
                return _stop(step, RunStatus.PARTIAL, output_model, _UNPRICED_MESSAGE)
            if ctx.hooks.on_node_success is not None:
                await ctx.call_hook(
                    "on_node_success", step_id, _dump(output_model), usage.input_tokens + usage.output_tokens
                )
            _finish_step(step)
            return ctx.result(RunStatus.COMPLETED, output_model)

        # --- a failed attempt ------------------------------------------------------------------
        node_ctx = NodeContext(node_id=step_id, attempt=attempt, run_id=ctx.run_id)
        failure_class = classify(failure, node_ctx, ctx.classifiers)
        error_type = _error_type(failure)
        arecord.fail(error_type, error_type)
        arecord.attributes[n.FAILURE_CLASS] = failure_class.otel_value
        exception_event: dict[str, Any] = {"exception.type": error_type}
        if telemetry.capture_content:
            telemetry.capture(arecord, "exception.message", str(failure))
            exception_event["exception.message"] = arecord.attributes.pop("exception.message", "")
        arecord.add_event("exception", exception_event)
        if isinstance(failure, ContractViolation):
            arecord.attributes[n.CONTRACT_OUTCOME] = n.CONTRACT_INVALID
            record.add_event(
                n.EVENT_CONTRACT_VIOLATION,
                {n.CONTRACT_DIRECTION: failure.direction, "stroma.contract.error_count": len(failure.errors)},
            )
        _finish_attempt(step, arecord, usage, started, validated_input, None, (failure_class, failure))
        step.failures.append((usage.model, error_type))
        if ctx.hooks.on_node_failure is not None:
            await ctx.call_hook("on_node_failure", step_id, failure, failure_class)
        if isinstance(failure, BudgetExceeded):
            return _breach(step, failure, input_state)
        if check_budget and _unpriced_stop(step):
            return _stop(step, RunStatus.PARTIAL, input_state, _UNPRICED_MESSAGE)

        policy = resolve_policy(failure_class, step_id, ctx.policy_map, ctx.step_policies)
        if failure_class is FailureClass.TERMINAL or attempt > policy.max_retries:
            status = RunStatus.FAILED if failure_class is FailureClass.TERMINAL else RunStatus.PARTIAL
            return _stop(step, status, input_state, _failure_message(step, failure), cls=failure_class)

        _maybe_error_fallback(step, failure_class, usage.model)
        delays = policy_delays.get(failure_class)
        if delays is None:
            delays = policy_delays[failure_class] = policy.delays()
        delay = next(delays)
        step.retried.append((failure_class.otel_value, error_type))
        if check_budget and budget.max_latency_ms is not None:
            left_ms = budget.max_latency_ms - _elapsed_ms(ctx.started_perf)
            if delay * 1000 >= left_ms:
                late = BudgetExceeded(
                    "latency",
                    float(budget.max_latency_ms),
                    float(_elapsed_ms(ctx.started_perf) + delay * 1000),
                    step_id,
                )
                return _breach(step, late, input_state)
        if ctx.run_timeout_ms is not None and delay * 1000 >= ctx.run_timeout_ms - _elapsed_ms(ctx.started_perf):
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


_UNPRICED_MESSAGE = (
    "usage of a model with no known price, and the budget's unpriced policy is 'fail'; "
    "register its price with stroma.pricing.set_price() or set ExecutionBudget(unpriced='warn')"
)


def _attempt_timeout(ctx: ReliabilityContext, timeout_ms: int | None) -> float | None:
    """Seconds the next attempt may take: its step timeout, capped by the run deadline."""
    timeout = timeout_ms / 1000.0 if timeout_ms is not None else None
    if ctx.run_timeout_ms is not None:
        left = (ctx.run_timeout_ms - _elapsed_ms(ctx.started_perf)) / 1000.0
        timeout = left if timeout is None else min(timeout, left)
    return timeout


def _choose_model(step: _Step) -> FallbackPolicy | None:
    """The fallback policy that applies to the next attempt, if any.

    A budget-threshold policy applies once the run's cost crossed ``at_budget_pct`` of the cost
    limit; an error policy once an attempt of this step failed with a class it names. Sets
    ``ctx.context["_stroma_model"]`` as the established API did. Whether a fallback *happened*
    is decided after the attempt, from the model it used (:func:`_note_fallback`).
    """
    ctx = step.ctx
    policy = step.fallback
    if policy is None and ctx.model_fallbacks and ctx.budget.max_cost_usd:
        used = ctx.total_cost / ctx.budget.max_cost_usd
        for candidate in ctx.model_fallbacks:
            if not candidate.on_failure and used >= candidate.at_budget_pct:
                policy = step.fallback = candidate
                step.fallback_reason = n.FALLBACK_REASON_BUDGET
                break
    if policy is None:
        if ctx.model_fallbacks:
            ctx.context.pop("_stroma_model", None)
        return None
    ctx.context["_stroma_model"] = policy.fallback_model
    return policy


def _maybe_error_fallback(step: _Step, failure_class: FailureClass, model: str | None) -> None:
    if step.fallback is not None:
        return
    for candidate in step.ctx.model_fallbacks:
        on_failure = candidate.on_failure
        if on_failure and failure_class in on_failure and (model is None or model == candidate.preferred_model):
            step.fallback = candidate
            step.fallback_reason = n.FALLBACK_REASON_ERROR
            return


def _note_fallback(step: _Step, model: str | None) -> str | None:
    """Record the fallback on the step span when the attempt's *model* shows it happened.

    It happened when the attempt used the fallback model, or asked for the preferred one while
    the policy applied (then it is charged at the fallback's price, as the established
    ``resolve_model()`` did). Returns the model to charge.
    """
    policy = step.fallback
    if policy is None or model is None or model not in (policy.preferred_model, policy.fallback_model):
        return model
    if not step.fallback_recorded:
        step.fallback_recorded = True
        attrs: dict[str, AttributeValue] = {
            n.FALLBACK_FROM_MODEL: policy.preferred_model,
            n.FALLBACK_TO_MODEL: policy.fallback_model,
            n.FALLBACK_REASON: step.fallback_reason,
            n.FALLBACK_THRESHOLD: float(policy.at_budget_pct),
        }
        step.record.attributes.update(attrs)
        step.record.add_event(n.EVENT_FALLBACK, attrs)
        step.ctx.run_logger.info(
            "step %s falls back from %s to %s (%s)",
            step.step_id,
            policy.preferred_model,
            policy.fallback_model,
            step.fallback_reason,
        )
    return policy.fallback_model


def _note_unpriced(ctx: ReliabilityContext, model: str) -> None:
    if model in ctx.unpriced_models:
        return
    ctx.unpriced_models.add(model)
    ctx.run_logger.warning(
        "model %s has no known price: its usage is counted as $0 and flagged stroma.cost.unpriced; "
        "register a price with stroma.pricing.set_price() (budget unpriced policy: %s)",
        model,
        ctx.budget.unpriced,
    )


def _unpriced_stop(step: _Step) -> bool:
    """Whether the budget's ``unpriced="fail"`` policy ends the step now."""
    ctx = step.ctx
    return bool(ctx.unpriced_models) and ctx.budget.unpriced == "fail" and ctx.budget.max_cost_usd is not None


def _finish_attempt(
    step: _Step,
    arecord: SpanRecord,
    usage: _step_io.AttemptUsage,
    started: float,
    input_state: Any,
    output_state: Any,
    failed: tuple[FailureClass, Exception] | None,
) -> None:
    """Charge the attempt's usage, end its span and append its :class:`TraceEvent` (deferred)."""
    ctx = step.ctx
    model = _note_fallback(step, usage.model)
    in_tok, out_tok = usage.input_tokens, usage.output_tokens
    cost, priced = cost_usd(model, in_tok, out_tok)
    unpriced = not priced
    duration_ms = int((time.perf_counter() - started) * 1000)
    attrs = arecord.attributes
    if in_tok or out_tok or model is not None:
        attrs[n.USAGE_INPUT_TOKENS] = in_tok
        attrs[n.USAGE_OUTPUT_TOKENS] = out_tok
        attrs[n.COST_AMOUNT] = float(cost)
        attrs[n.COST_CURRENCY] = n.CURRENCY_USD
        if unpriced:
            attrs[n.COST_UNPRICED] = True
        if model is not None:
            attrs[n.MODEL] = model
            step.attempt_models.append(model)
        ctx.cost_tracker.add(
            step.step_id,
            tokens_used=in_tok + out_tok,
            cost_usd=cost,
            latency_ms=duration_ms,
            model=model,
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
        ctx.telemetry.record_usage(ctx.workflow_name, step.step_id, model, in_tok, out_tok, cost, unpriced)
        if unpriced:
            _note_unpriced(ctx, model or "unknown")
    step.attempts += 1
    if ctx.gate.active:
        ctx.gate.leave(cost, in_tok + out_tok)
    arecord.end_ns = time.time_ns()
    ctx.telemetry.finish(arecord)
    if ctx.keep_records:
        ctx.records.append(arecord)
    if failed is None:
        ctx.trace.append_deferred(
            _AttemptEvent(ctx.run_id, arecord, input_state, output_state, duration_ms, None, None)
        )
    else:
        failure_class, exc = failed
        ctx.trace.append_deferred(
            _AttemptEvent(ctx.run_id, arecord, input_state, output_state, duration_ms, failure_class, str(exc))
        )


class _AttemptEvent:
    """An attempt's :class:`TraceEvent`, built from its span record when the trace is read.

    States are dumped at build time; a step that mutates its input or output model in place
    after returning would show the mutation (steps should not, and pydantic models returned by
    the loop are not mutated by Stroma).
    """

    __slots__ = ("duration_ms", "failure", "failure_message", "input_state", "output_state", "record", "run_id")

    def __init__(
        self,
        run_id: str,
        record: SpanRecord,
        input_state: Any,
        output_state: Any,
        duration_ms: int,
        failure: FailureClass | None,
        failure_message: str | None,
    ) -> None:
        self.run_id = run_id
        self.record = record
        self.input_state = input_state
        self.output_state = output_state
        self.duration_ms = duration_ms
        self.failure = failure
        self.failure_message = failure_message

    def build(self) -> TraceEvent:
        record = self.record
        attrs = record.attributes
        output = self.output_state
        return TraceEvent(
            node_id=str(attrs[n.STEP_ID]),
            run_id=self.run_id,
            attempt=int(attrs[n.STEP_ATTEMPT_NUMBER]),
            timestamp_utc=datetime.fromtimestamp(record.start_ns / 1e9, tz=timezone.utc),
            input_state=_dump(self.input_state),
            output_state=None if output is None else _dump(output),
            duration_ms=self.duration_ms,
            failure=self.failure,
            failure_message=self.failure_message,
            model=attrs.get(n.MODEL),  # type: ignore[arg-type]
            input_tokens=int(attrs.get(n.USAGE_INPUT_TOKENS, 0)),
            output_tokens=int(attrs.get(n.USAGE_OUTPUT_TOKENS, 0)),
            cost_usd=float(attrs.get(n.COST_AMOUNT, 0.0)),
            unpriced=bool(attrs.get(n.COST_UNPRICED, False)),
            retry_delay_s=float(attrs[n.STEP_RETRY_DELAY]),
            error_type=record.error_type,
            trace_id=record.trace_id,
            span_id=record.span_id,
        )


def _finish_step(step: _Step) -> None:
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
    ctx.telemetry.finish(record)
    if ctx.keep_records:
        ctx.records.append(record)
    ctx.telemetry.record_step(ctx.workflow_name, record, step.retried)


def _stop(
    step: _Step,
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
    step.ctx.run_logger.warning("step %s stopped (%s): %s", step.step_id, status.value, message)
    return step.ctx.result(status, final_state, error=message, failed_step=step.step_id)


def _breach(step: _Step, breach: BudgetExceeded, final_state: Any) -> ExecutionResult:
    ctx = step.ctx
    ctx.breaches.append(breach)
    record = step.record
    record.add_event(n.EVENT_BUDGET_EXCEEDED, _breach_attributes(breach))
    error_type = _error_type(breach)
    record.fail(error_type, f"budget exceeded: {breach.dimension}")
    _finish_step(step)
    ctx.run_logger.warning("step %s: %s", step.step_id, breach)
    return ctx.result(RunStatus.PARTIAL, final_state, error=str(breach), failed_step=step.step_id)


def _failure_message(step: _Step, failure: Exception) -> str:
    """One message for the step: the last error, and each model's failures when several."""
    models: dict[str, list[str]] = {}
    for model, error_type in step.failures:
        models.setdefault(model or "(no model)", []).append(error_type)
    head = f"step {step.step_id!r} failed after {len(step.failures)} attempt(s): {_error_type(failure)}: {failure}"
    if len(models) > 1:
        detail = "; ".join(f"{model}: {', '.join(errors)}" for model, errors in models.items())
        return f"{head} [per model: {detail}]"
    return head


async def _checkpoint(step: _Step, output: Any) -> None:
    ctx = step.ctx
    manager = ctx.checkpoint_manager
    if manager is None or not isinstance(output, BaseModel):
        return
    await manager.checkpoint(ctx.run_id, step.step_id, output)
    step.record.add_event(n.EVENT_CHECKPOINT_SAVED, {n.CHECKPOINT_STORE: getattr(manager, "store_kind", "custom")})


def _dump(state: Any) -> dict[str, Any]:
    if isinstance(state, BaseModel):
        return state.model_dump()
    if isinstance(state, dict):
        return dict(state)
    return {"value": state}


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
