"""The per-run state of the reliability loop: :class:`ReliabilityContext`.

A context bundles what :func:`~stroma.middleware.execute_step` needs for one run (registry,
checkpoints, budget, policies, hooks, telemetry) and what the run has done so far (totals, the
trace, span records). It can open the run span (:meth:`ReliabilityContext.as_run`) and assembles
the run's :class:`~stroma.trace.ExecutionResult` (:meth:`ReliabilityContext.build_result`).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stroma._loop.admission import BudgetGate
from stroma.contracts import ContractRegistry
from stroma.cost import BudgetExceeded, CostTracker, Dimension, ExecutionBudget, FallbackPolicy, NodeUsage, SharedLimit
from stroma.errors import exception_types
from stroma.failures import Classifier, PolicyMap, RetryBudget
from stroma.pricing import preload as preload_prices
from stroma.runstore import enable_from_env
from stroma.telemetry import names as n
from stroma.telemetry import sinks
from stroma.telemetry._bounds import bound_text
from stroma.telemetry.records import SpanRecord
from stroma.telemetry.runtime import Telemetry, get_telemetry
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus

if TYPE_CHECKING:
    from stroma.checkpoint import CheckpointManager
    from stroma.config import NodeHooks, RunConfig

logger = logging.getLogger("stroma")


def error_type_name(exc: BaseException) -> str:
    """The ``error.type`` of *exc*: its class's qualified name, prefixed by its module unless the
    module is ``builtins``; at most :data:`~stroma.telemetry._bounds.MAX_LABEL_CHARS` characters.

    Never raises, whatever the class claims (a ``__module__`` of ``None`` or a non-string
    name gives the bare class name).
    """
    cls = type(exc)
    name = getattr(cls, "__qualname__", None)
    if not isinstance(name, str):
        name = getattr(cls, "__name__", None)
        if not isinstance(name, str):
            name = "Exception"
    module = getattr(cls, "__module__", None)
    if not isinstance(module, str) or module in ("builtins", "asyncio.exceptions"):
        return bound_text(name)
    if module.startswith("stroma."):
        return bound_text(f"stroma.{name}")
    return bound_text(f"{module}.{name}")


def error_message(exc: BaseException) -> str:
    """``str(exc)``, or a placeholder naming the type when the exception's ``__str__`` raises.

    Never raises (an exception object from user code may be hostile; its failure to print
    must not turn a step's failure into a crash of the loop).
    """
    try:
        text = str(exc)
    except Exception as fault:
        return f"<{error_type_name(exc)}: str() raised {error_type_name(fault)}>"
    if not isinstance(text, str):  # pragma: no cover - str() always returns a str
        return f"<{error_type_name(exc)}>"
    return text


def elapsed_ms(started: float) -> int:
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
    shared_budget: SharedLimit | None = None
    run_logger: logging.LoggerAdapter[logging.Logger] = field(init=False)
    started_perf: float = field(init=False, default_factory=time.perf_counter)
    records: list[SpanRecord] = field(init=False, default_factory=list)
    keep_records: bool = field(init=False, default=False)
    breaches: list[BudgetExceeded] = field(init=False, default_factory=list)
    unpriced_models: set[str] = field(init=False, default_factory=set)
    step_count: int = field(init=False, default=0)
    run_record: SpanRecord | None = field(init=False, default=None)
    finished: bool = field(init=False, default=False)
    _hook_faults: set[str] = field(init=False, default_factory=set)
    gate: BudgetGate = field(init=False)
    # limited dimensions not yet warned about: (dimension, limit) (see check_budget_warning)
    _unwarned: list[tuple[str, float]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.run_logger = logging.LoggerAdapter(logger, {"run_id": self.run_id})
        self.gate = BudgetGate(self.budget)
        if self.budget.warn_at_pct is not None:
            dimensions: tuple[Dimension, ...] = ("tokens", "cost", "latency")
            for dimension in dimensions:
                limit = self.budget.limit(dimension)
                if limit is not None and limit > 0:
                    self._unwarned.append((dimension, limit))
        # Span records are kept for the run sinks (the local run store) only.
        self.keep_records = sinks.has_run_sinks()

    # --- run totals: one source, the cost tracker ------------------------------------------------

    @property
    def total_cost(self) -> float:
        """USD spent by this run so far (``cost_tracker.total_cost_usd``)."""
        return self.cost_tracker.total_cost_usd

    @property
    def input_tokens(self) -> int:
        """Input tokens used by this run so far (``cost_tracker.total_input_tokens``)."""
        return self.cost_tracker.total_input_tokens

    @property
    def output_tokens(self) -> int:
        """Output tokens used by this run so far (``cost_tracker.total_output_tokens``)."""
        return self.cost_tracker.total_output_tokens

    @property
    def cost_by_step(self) -> dict[str, float]:
        """USD per step id that used anything, in first-use order (a copy; ``cost_tracker.cost_by_node()``)."""
        return self.cost_tracker.cost_by_node()

    def spent(self) -> tuple[float, int]:
        """``(cost in USD, tokens)`` spent by this run so far."""
        tracker = self.cost_tracker
        return tracker.total_cost_usd, tracker.total_tokens

    @classmethod
    def for_run(
        cls,
        config: RunConfig,
        registry: ContractRegistry,
        checkpoint_manager: CheckpointManager | None,
    ) -> ReliabilityContext:
        """A fresh context for one run of *config* (counters, trace and records start empty).

        ``config.context`` is shared with the steps as given (the established behaviour);
        everything else is per run. With a cost limit or model fallbacks, the price table is
        loaded here (once per process), before the first step. Setting ``STROMA_RUN_STORE`` turns the local run store on
        (:mod:`stroma.runstore`) for the runs created from then on.
        """
        enable_from_env()
        if config.budget.max_cost_usd is not None or config.model_fallbacks:
            # Load the price table before the first step, not inside its first priced attempt.
            models = {
                name for policy in config.model_fallbacks for name in (policy.preferred_model, policy.fallback_model)
            }
            preload_prices(sorted(models))
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
            shared_budget=config.shared_budget,
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
                record.fail(error_type_name(exc), "run interrupted")
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
            record.add_event(n.EVENT_BUDGET_EXCEEDED, breach_attributes(breach))
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

    def check_budget_warning(self, record: SpanRecord, step_id: str) -> None:
        """The early budget warning: call after an attempt's usage is charged.

        The first time this run's use of a limited dimension (tokens, cost in USD, latency in
        ms since the run started) reaches ``budget.warn_at_pct`` of its limit, *record* (the
        step span) gets a ``stroma.budget.warning`` event and the ``stroma.budget.warnings``
        counter is incremented, with an early export so that the warning alert does not wait
        for the next scheduled one. At most once per run and dimension; costs nothing without
        a budget or with ``warn_at_pct=None``.
        """
        if not self._unwarned:
            return
        pct = self.budget.warn_at_pct
        if pct is None:  # not reached: _unwarned is empty then
            return
        for entry in list(self._unwarned):
            dimension, limit = entry
            if dimension == "tokens":
                used = float(self.input_tokens + self.output_tokens)
            elif dimension == "cost":
                used = float(self.total_cost)
            else:
                used = float(elapsed_ms(self.started_perf))
            utilization = used / limit
            if utilization < pct:
                continue
            self._unwarned.remove(entry)
            record.add_event(
                n.EVENT_BUDGET_WARNING,
                {
                    n.BUDGET_DIMENSION: dimension,
                    n.BUDGET_LIMIT: limit,
                    n.BUDGET_USAGE: used,
                    n.BUDGET_UTILIZATION: utilization,
                    n.BUDGET_WARN_AT_PCT: pct,
                    n.STEP_ID: step_id,
                },
            )
            if self.telemetry.enabled:
                self.telemetry.record_budget_warning(self.workflow_name, step_id, dimension)

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
        cost, input_tokens, output_tokens, cost_by_step = self.cost_tracker.snapshot()
        return ExecutionResult(
            run_id=self.run_id,
            status=status,
            final_state=final_state,
            trace=self.trace,
            total_cost_usd=cost,
            total_tokens=input_tokens + output_tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            unpriced_models=tuple(sorted(self.unpriced_models)) if self.unpriced_models else (),
            error=error,
            failed_step=failed_step,
            budget_exceeded=self.breaches[0] if self.breaches else None,
            cost_by_step=cost_by_step,
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
        per-step data beyond the trace returned to the caller. Raises ``TypeError`` when
        *final_state* is itself an :class:`~stroma.trace.ExecutionResult` (pass its
        ``final_state``).
        """
        if isinstance(final_state, ExecutionResult):
            raise TypeError(
                "build_result(final_state=...) got an ExecutionResult, which would nest one run's result "
                "in another; pass its state instead: final_state=result.final_state (a @step-decorated "
                "function returns an ExecutionResult)"
            )
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
                # Types only, never the message or a traceback: a hook's exception (or the step's
                # exception it was raised from) can carry step content (issue 8 D16).
                self.run_logger.warning(
                    "hook %s raised %s; ignored (the step's outcome is unchanged; later faults of this "
                    "hook in this run are not logged)",
                    name,
                    exception_types(exc),
                )


def breach_attributes(breach: BudgetExceeded) -> dict[str, Any]:
    return {
        n.BUDGET_DIMENSION: breach.dimension,
        n.BUDGET_LIMIT: float(breach.limit),
        n.BUDGET_USAGE: float(breach.actual),
        n.STEP_ID: breach.node_id,
    }
