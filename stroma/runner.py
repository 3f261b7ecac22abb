"""The pipeline runner: :class:`StromaRunner`, :func:`parallel` and the node decorators.

A pipeline is a list of nodes run in order, each on the previous node's validated output; a
:func:`parallel` stage runs its nodes concurrently on the same state and merges their outputs.
Every node runs through :func:`~stroma.middleware.execute_step` (there is one reliability loop;
the runner only sequences it), inside one ``run {workflow}`` span (design §4)::

    run pipeline                        gen_ai.operation.name=invoke_workflow, run totals, budget
    ├─ step fetch                       (a step restored on resume: stroma.step.skipped=true)
    │  └─ attempt fetch
    ├─ step summarize   ┐ one parallel stage: sibling step spans
    ├─ step classify    ┘
    └─ step publish

Run ids and resuming. Each :meth:`StromaRunner.run` call gets a fresh run id, unless one is
given (``run(..., run_id=...)`` > an explicit ``RunConfig.run_id``). With a checkpoint manager,
the runner keeps a manifest per run (:mod:`stroma._pipeline.resume`), so running a run id again:

- whose run completed returns the stored result without running anything;
- whose run stopped (crash, ``PARTIAL`` budget stop, failure) skips the steps that completed
  (restored from their checkpoints: no re-run, their cost counted once, a ``stroma.step.skipped``
  span each) and continues with the first step that did not; the run span links to the original
  run span and carries ``stroma.run.resumed_from`` (the step execution continued from);
- whose pipeline changed (steps renamed, added, moved, or an output schema changed) raises
  :class:`~stroma.errors.PipelineChangedError` before any step runs;
- with a different initial state than the run started with (compared by a fingerprint kept in
  the manifest, see :mod:`stroma._pipeline.resume`): a finished run starts a new execution of that run
  id, an unfinished one raises :class:`~stroma.errors.RunInputChangedError` before any step runs.

``RunConfig.resume_from=<step id>`` keeps the established meaning: skip the steps before it,
start from the checkpoint of the step before it, run everything from there again, and end with
status ``RESUMED``.

Timeouts. ``RunConfig.node_timeouts`` (milliseconds) bound each attempt of a step: running out
is a ``TimeoutError`` inside the step, classified (``RECOVERABLE`` by default) and retried like any
failure. ``RunConfig.run_timeout_ms`` bounds the run: each attempt's timeout is capped by what is
left, and what the loop cannot interrupt from inside a step (a hook, a retry delay, a checkpoint
write) is cancelled by the runner at most 50 ms past the deadline; the run then ends ``PARTIAL``
with its completed steps checkpointed. A plain (sync) step function cannot be interrupted.

Steps run exactly once per run id as long as they complete; a step interrupted between its side
effect and its checkpoint runs again on resume (at-least-once), so give side effects an
idempotency key such as ``(run_id, step_id)``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel

from stroma._pipeline.parallel import MergeConflict, merge_outputs, run_parallel_stage
from stroma._pipeline.plan import ConflictRule, ParallelGroup, Plan, PlanCache, Stage, mark_node, parallel
from stroma._pipeline.resume import ManifestWriter, ResumePoint, find_resume_point, input_fingerprint
from stroma.checkpoint import (
    AsyncCheckpointStore,
    AsyncInMemoryStore,
    CheckpointManager,
    CheckpointStore,
    RedisStore,
)
from stroma.config import NodeHooks, RunConfig, StepHooks, check_run_id, new_run_id
from stroma.contracts import ContractRegistry, NodeContract
from stroma.cost import ExecutionBudget, FallbackPolicy
from stroma.errors import ConfigurationError
from stroma.failures import Classifier, FailureClass, PolicyMap
from stroma.middleware import ReliabilityContext, execute_step
from stroma.telemetry import sinks
from stroma.trace import FINISHED_STATUSES, ExecutionResult, RunStatus

__all__ = [
    "ConflictRule",
    "NodeHooks",
    "ParallelGroup",
    "RunConfig",
    "StepHooks",
    "StromaRunner",
    "parallel",
    "stroma_node",
    "stroma_step",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# How long past RunConfig.run_timeout_ms the runner waits for the loop's own deadline handling
# (attempt timeouts are capped by the deadline) before it cancels the run itself.
_DEADLINE_GRACE_S = 0.05


def stroma_node(node_id: str, contract: NodeContract) -> Callable[[F], F]:
    """Mark a step function as pipeline node *node_id* validated by *contract*.

    Returns the function itself with the node's id and contract attached (``_stroma_node_id``,
    ``_stroma_contract``); it is registered in a runner's registry when it first runs. Raises
    :class:`~stroma.errors.ConfigurationError` when *contract* is not a ``NodeContract`` or
    belongs to another step id.

    ``stroma_step`` is the same object under a paradigm-neutral name.
    """
    if not isinstance(contract, NodeContract):
        raise ConfigurationError(f"stroma_node({node_id!r}, ...) needs a NodeContract, got {type(contract).__name__}")
    if contract.node_id != node_id:
        raise ConfigurationError(
            f"stroma_node({node_id!r}, ...) got the contract of step {contract.node_id!r}; use the same id"
        )

    def decorator(func: F) -> F:
        marked: F = mark_node(func, node_id, contract)  # type: ignore[assignment]
        return marked

    return decorator


stroma_step = stroma_node


@dataclass
class _Progress:
    """Where a run is, for the result built when the run deadline cancels it."""

    state: Any
    step_id: str | None = None


class _DeadlinePassed(Exception):
    pass


class StromaRunner:
    """Runs pipelines of nodes with contracts, retries, budgets, checkpoints and one span tree.

    ``StromaRunner(registry, checkpoint_manager, config)`` keeps the established signature;
    *checkpoint_manager* may be ``None`` (no checkpoints: nothing can be resumed) and *config*
    defaults to ``RunConfig()``. :meth:`quick` builds one with an in-memory store.

    The ``with_*`` builders change this runner's configuration (each result is validated, see
    :meth:`RunConfig.replace`) and return the runner, so they chain. A runner may run several
    pipelines, also concurrently; each run reads the configuration once when it starts.
    """

    def __init__(
        self,
        registry: ContractRegistry,
        checkpoint_manager: CheckpointManager | None,
        config: RunConfig | None = None,
    ) -> None:
        if not isinstance(registry, ContractRegistry):
            raise TypeError(f"registry must be a ContractRegistry, got {type(registry).__name__}")
        if checkpoint_manager is not None and not isinstance(checkpoint_manager, CheckpointManager):
            raise TypeError(
                f"checkpoint_manager must be a CheckpointManager or None, got {type(checkpoint_manager).__name__}"
            )
        if config is not None and not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        self.registry = registry
        self.checkpoint_manager = checkpoint_manager
        self.config = config if config is not None else RunConfig()
        self._plans = PlanCache()

    def __repr__(self) -> str:
        return f"StromaRunner(workflow={self.config.workflow_name!r}, checkpoints={self.checkpoint_manager!r})"

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def quick(
        cls,
        *,
        store: CheckpointStore | AsyncCheckpointStore | None = None,
        budget: ExecutionBudget | None = None,
        policy_map: PolicyMap | None = None,
        classifiers: list[Classifier] | None = None,
        hooks: NodeHooks | None = None,
        **config_kwargs: Any,
    ) -> StromaRunner:
        """A runner with defaults: a new registry, an in-memory checkpoint store, ``RunConfig()``.

        *store* replaces the in-memory store; *budget*, *policy_map*, *classifiers*, *hooks* and
        any other ``RunConfig`` field given as a keyword set the configuration. The in-memory
        store keeps every run until ``checkpoint_manager.clear(run_id)``: use a persistent store
        (``SQLiteStore``, :meth:`with_redis`) for long-lived processes.
        """
        settings: dict[str, Any] = dict(config_kwargs)
        for name, value in (
            ("budget", budget),
            ("policy_map", policy_map),
            ("classifiers", classifiers),
            ("hooks", hooks),
        ):
            if value is not None:
                settings[name] = value
        manager = CheckpointManager(store if store is not None else AsyncInMemoryStore())
        return cls(ContractRegistry(), manager, RunConfig(**settings))

    def _update(self, **changes: Any) -> StromaRunner:
        self.config = self.config.replace(**changes)
        return self

    def with_redis(self, redis_url: str, ttl_seconds: int = 3600, **options: Any) -> StromaRunner:
        """Checkpoint to Redis: ``RedisStore(redis_url, ttl_seconds, **options)`` (async).

        *options* are ``RedisStore``'s keywords (``key_prefix``, ``timeout_seconds``). Needs the
        ``redis`` extra. No connection is made until a run checkpoints; an unreachable server
        then fails the run with a ``CheckpointError`` naming the server.
        """
        self.checkpoint_manager = CheckpointManager(RedisStore(redis_url, ttl_seconds, **options))
        return self

    def with_budget(
        self,
        *,
        tokens: int | None = None,
        cost_usd: float | None = None,
        latency_ms: int | None = None,
        unpriced: Literal["warn", "fail"] | None = None,
        warn_at_pct: float | None = None,
    ) -> StromaRunner:
        """Limit each run: total tokens, cost in USD, wall-clock milliseconds (``None``: no limit).

        Replaces the whole budget. *unpriced* (``"warn"`` or ``"fail"``) and *warn_at_pct* (the
        early-warning share, see :class:`~stroma.cost.ExecutionBudget`) keep the current
        budget's values when not given.
        """
        policy = unpriced if unpriced is not None else self.config.budget.unpriced
        warn = warn_at_pct if warn_at_pct is not None else self.config.budget.warn_at_pct
        budget = ExecutionBudget(
            max_tokens_total=tokens,
            max_cost_usd=cost_usd,
            max_latency_ms=latency_ms,
            unpriced=policy,
            warn_at_pct=warn,
        )
        return self._update(budget=budget)

    def with_model_fallback(
        self,
        model: str,
        *,
        to: str,
        at_budget_pct: float = 0.80,
        on_failure: Sequence[FailureClass | str] | None = None,
    ) -> StromaRunner:
        """Add a fallback: steps using *model* switch to *to* once spend reaches *at_budget_pct*
        of the cost budget, or (with *on_failure*) after a failed attempt of those classes."""
        policy = FallbackPolicy(
            preferred_model=model,
            fallback_model=to,
            at_budget_pct=at_budget_pct,
            on_failure=frozenset(on_failure) if on_failure is not None else None,  # type: ignore[arg-type]
        )
        return self._update(model_fallbacks=[*self.config.model_fallbacks, policy])

    def with_classifiers(self, classifiers: list[Classifier]) -> StromaRunner:
        """Set the failure classifiers consulted before the built-in rules (in order)."""
        return self._update(classifiers=list(classifiers))

    def with_hooks(self, hooks: NodeHooks) -> StromaRunner:
        """Set the step hooks (sync or async; a raising hook is logged once and ignored)."""
        return self._update(hooks=hooks)

    def with_context(self, context: dict[str, Any]) -> StromaRunner:
        """Set the shared context dict; each run gets its own shallow copy of it."""
        return self._update(context=dict(context))

    def with_policy_map(self, policy_map: PolicyMap) -> StromaRunner:
        """Set the retry policy per failure class."""
        return self._update(policy_map=dict(policy_map))

    def with_node_policies(self, node_policies: dict[str, PolicyMap]) -> StromaRunner:
        """Set per-step overrides of the policy map (step ids are checked when a run starts)."""
        return self._update(node_policies=dict(node_policies))

    def with_node_timeouts(self, node_timeouts: dict[str, int]) -> StromaRunner:
        """Set per-step timeouts of one attempt, in milliseconds.

        An attempt that runs out raises ``TimeoutError`` inside the step: a classified failure
        (``RECOVERABLE`` unless a classifier says otherwise), retried per policy, visible as the
        attempt span's ``error.type``. Step ids are checked when a run starts.
        """
        return self._update(node_timeouts=dict(node_timeouts))

    def node(self, node_id: str, *, input: type[BaseModel], output: type[BaseModel]) -> Callable[[F], F]:
        """Decorator: create ``NodeContract(node_id, input, output)``, register it, mark the function.

        The function is returned unchanged (with the node's id and contract attached).
        """
        contract = NodeContract(node_id=node_id, input_schema=input, output_schema=output)
        self.registry.register(contract)
        return stroma_node(node_id, contract)

    # --- running -------------------------------------------------------------------------------

    def _config_for_run(self, run_id: str | None) -> tuple[RunConfig, bool]:
        config = self.config
        config.warn_risky(stacklevel=4)
        if run_id is not None:
            chosen, explicit = check_run_id(run_id, setting="run(run_id=...)"), True
        elif config.explicit_run_id:
            chosen, explicit = config.run_id, True
        else:
            chosen, explicit = new_run_id(), False
        # A per-run copy: its own run id and its own context dict (nothing leaks between runs).
        return config.model_copy(update={"run_id": chosen, "context": dict(config.context)}), explicit

    async def run(self, nodes: Sequence[Any], initial_state: Any, *, run_id: str | None = None) -> ExecutionResult:
        """Run *nodes* in order starting from *initial_state*; return the run's result.

        *run_id* (or an explicit ``RunConfig.run_id``) names the run: when that run id has a
        history in the checkpoint store, the run resumes it (see the module docs); otherwise the
        run gets a fresh id. Never raises for a step's failure: the result is ``COMPLETED``,
        ``RESUMED`` (with ``resume_from``), ``FAILED`` or ``PARTIAL`` with ``error`` and
        ``failed_step``.

        Raises, before any step runs: :class:`~stroma.errors.ConfigurationError` for a node
        without id or contract, a duplicate step id, or per-step settings naming unknown steps
        (the message lists the known ids), or a step whose required input field the step before
        it never outputs (the message names both steps and the field; see
        :meth:`~stroma._pipeline.plan.Plan.check_feeds`); :class:`~stroma.errors.PipelineChangedError` when the
        run id was checkpointed by a different pipeline;
        :class:`~stroma.errors.RunInputChangedError` when an unfinished run id is given a
        different initial state than it started with. Raises
        :class:`~stroma.errors.CheckpointError` when the checkpoint store fails (fail closed);
        cancellation propagates, with every span ended.
        """
        plan = self._plans.plan(nodes, self.registry)
        config, explicit = self._config_for_run(run_id)
        config.check_step_ids(plan.step_ids)
        plan.check_feeds(_stage_index(plan, config.resume_from) if config.resume_from is not None else 0)
        manager = self.checkpoint_manager if plan.stages else None
        fingerprint = input_fingerprint(initial_state) if manager is not None else None
        point: ResumePoint | None = None
        if manager is not None and (explicit or config.resume_from is not None):
            found = await find_resume_point(manager, config.run_id, plan, config.resume_from, fingerprint)
            if isinstance(found, ExecutionResult):
                return found
            point = found
        elif config.resume_from is not None:
            point = ResumePoint(start_stage=_stage_index(plan, config.resume_from), legacy=True)
        ctx = ReliabilityContext.for_run(config, self.registry, manager)
        links = point.links if point is not None else None
        resumed_from = point.resumed_from(plan) if point is not None else None
        with ctx.as_run(links=links or None, resumed_from=resumed_from):
            try:
                prior = point.manifest if point else None
                writer = ManifestWriter(manager, plan, ctx, prior, fingerprint) if manager else None
                if writer is not None:
                    await writer.save()
                progress = _Progress(initial_state)
                deadline = config.run_timeout_ms
                try:
                    if deadline is None:
                        result = await self._drive(plan, ctx, point, progress, writer)
                    else:
                        result = await _within(self._drive(plan, ctx, point, progress, writer), ctx, deadline)
                except _DeadlinePassed:
                    result = ctx.build_result(
                        RunStatus.PARTIAL,
                        progress.state,
                        error=f"run deadline of {deadline} ms passed",
                        failed_step=progress.step_id,
                    )
                if writer is not None:
                    status = result.status
                    await writer.save(status.otel_value, result if status in FINISHED_STATUSES else None)
                return result
            except BaseException as exc:
                if not isinstance(exc, Exception):  # Ctrl-C, cancellation, interpreter exit
                    _record_interrupted(ctx, exc)
                raise

    def run_sync(self, nodes: Sequence[Any], initial_state: Any, *, run_id: str | None = None) -> ExecutionResult:
        """:meth:`run` for scripts: runs it on a new event loop (``asyncio.run``).

        Raises ``RuntimeError`` when called from a running event loop (``await run(...)`` there).
        An async store bound to one loop (``RedisStore``) cannot be reused across calls.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # no loop: the usual case. The run starts outside this handler, so its own
            # exceptions do not carry "no running event loop" as their context.
        else:
            raise RuntimeError("run_sync() was called from a running event loop; use `await runner.run(...)`")
        return asyncio.run(self.run(nodes, initial_state, run_id=run_id))

    async def _drive(
        self,
        plan: Plan,
        ctx: ReliabilityContext,
        point: ResumePoint | None,
        progress: _Progress,
        writer: ManifestWriter | None,
    ) -> ExecutionResult:
        start = point.start_stage if point is not None else 0
        state = progress.state
        for stage in plan.stages[:start]:
            restored = self._restore_stage(stage, ctx, point, state)
            if isinstance(restored, ExecutionResult):
                return restored
            if stage.index == start - 1:
                # The state after the last restored stage; with resume_from and no checkpoint of
                # that stage, the initial state (as the established API did).
                state = restored if restored is not None else state
        progress.state = state
        last = len(plan.stages) - 1
        for stage in plan.stages[start:]:
            progress.step_id = stage.steps[0].step_id
            if stage.group is None:
                step = stage.steps[0]
                outcome = await execute_step(step.step_id, step.func, state, ctx, contract=step.contract)
                if outcome.status is not RunStatus.COMPLETED:
                    return _stop(ctx, outcome)
                state = outcome.final_state
            else:
                done = self._restore_children(stage, ctx, point)
                progress_hook = writer.save if writer is not None else None
                outputs, failure = await run_parallel_stage(stage, state, ctx, done, progress_hook)
                if failure is not None:
                    return ctx.build_result(failure.status, state, error=failure.error, failed_step=failure.failed_step)
                try:
                    state = merge_outputs(stage, outputs)
                except MergeConflict as conflict:
                    return ctx.build_result(
                        RunStatus.FAILED, state, error=str(conflict), failed_step=stage.steps[-1].step_id
                    )
            progress.state = state
            if writer is not None and stage.index != last:
                await writer.save()
        legacy = point is not None and point.legacy
        return ctx.build_result(RunStatus.RESUMED if legacy else RunStatus.COMPLETED, state)

    @staticmethod
    def _restore_stage(
        stage: Stage, ctx: ReliabilityContext, point: ResumePoint | None, state: Any
    ) -> BaseModel | ExecutionResult | None:
        """Account for a stage that is not run (a skipped span per restored step).

        Returns the stage's output, ``None`` when some of its steps have no checkpoint (only
        possible with ``resume_from``), or the failed result of a merge conflict.
        """
        assert point is not None
        outputs = {}
        for step in stage.steps:
            output = point.restored.get(step.step_id)
            if output is not None:
                ctx.restore_step(step.step_id, output, **point.usage(step.step_id))
                outputs[step.step_id] = output
        if len(outputs) < len(stage.steps):
            return None
        try:
            return merge_outputs(stage, outputs)
        except MergeConflict as conflict:
            return ctx.build_result(RunStatus.FAILED, state, error=str(conflict), failed_step=stage.steps[-1].step_id)

    @staticmethod
    def _restore_children(stage: Stage, ctx: ReliabilityContext, point: ResumePoint | None) -> dict[str, BaseModel]:
        if point is None or point.legacy or point.start_stage != stage.index:
            return {}
        done: dict[str, BaseModel] = {}
        for step in stage.steps:
            output = point.restored.get(step.step_id)
            if output is not None:
                ctx.restore_step(step.step_id, output, **point.usage(step.step_id))
                done[step.step_id] = output
        return done


INTERRUPTED: Final = "interrupted"
"""The run-store status of a run ended by ``KeyboardInterrupt``, cancellation or exit."""


def _record_interrupted(ctx: ReliabilityContext, exc: BaseException) -> None:
    """Hand an interrupted run to the run sinks (the local run store) before it propagates.

    A run ended by Ctrl-C never builds a result, so without this it vanished from ``stroma
    runs`` (issue 8 B9). The record carries the steps that finished; the run's manifest is left
    as it was, so running the run id again resumes it. Never raises (a sink failure is the
    sinks' to log); the run span itself is ended by ``as_run`` as before.
    """
    if ctx.finished or not sinks.has_run_sinks():
        return  # a run that built its result was recorded with its own status
    run_records = (ctx.run_record,) if ctx.run_record is not None else ()
    sinks.emit(  # never raises: a failing sink is logged once by sinks
        sinks.FinishedRun(
            run_id=ctx.run_id,
            workflow_name=ctx.workflow_name,
            status=INTERRUPTED,
            total_cost_usd=ctx.total_cost,
            input_tokens=ctx.input_tokens,
            output_tokens=ctx.output_tokens,
            error=f"interrupted ({type(exc).__name__})",
            records=(*run_records, *ctx.records),
            budget=ctx.budget.model_dump(),
        )
    )
    ctx.records.clear()


def _stop(ctx: ReliabilityContext, outcome: ExecutionResult) -> ExecutionResult:
    return ctx.build_result(outcome.status, outcome.final_state, error=outcome.error, failed_step=outcome.failed_step)


def _stage_index(plan: Plan, step_id: str) -> int:
    for stage in plan.stages:
        if any(step.step_id == step_id for step in stage.steps):
            return stage.index
    raise ConfigurationError(f"resume_from names unknown step id {step_id!r}; known steps: {list(plan.step_ids)}")


async def _within(work: Coroutine[Any, Any, T], ctx: ReliabilityContext, deadline_ms: int) -> T:
    """Await *work*, cancelling it shortly after the run deadline (raises :class:`_DeadlinePassed`).

    The loop caps every attempt by the deadline itself; this catches what it cannot interrupt
    from inside a step: a slow hook, checkpoint write or retry delay. ``asyncio.timeout`` is
    3.11+, so this is done with a task.
    """
    left = deadline_ms / 1000.0 - (time.perf_counter() - ctx.started_perf) + _DEADLINE_GRACE_S
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(left, 0.0))
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise _DeadlinePassed
    return task.result()  # it ended on its own while being cancelled: its result, or its error
