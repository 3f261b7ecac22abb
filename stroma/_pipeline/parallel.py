"""Running a parallel stage: every child through :func:`~stroma.middleware.execute_step`.

Nothing here retries, validates or charges anything itself: each child is one ordinary
``execute_step`` call on the run's :class:`~stroma.middleware.ReliabilityContext`, so it gets its
own ``step`` span under the run span, its contract check, retries, cost accounting, budget checks
and checkpoint. This module only schedules the calls, cancels siblings, and merges.

``max_concurrency`` of :func:`~stroma.runner.parallel` caps how many children run at once
(children waiting for a slot have no span yet). Under a cost or token budget the loop's own
admission gate (:mod:`stroma._loop.admission`) additionally holds back attempts that could together
overspend the limit by more than about one attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from stroma._pipeline.plan import Stage, StepSpec
from stroma.errors import ConfigurationError
from stroma.middleware import ReliabilityContext, execute_step
from stroma.trace import ExecutionResult, RunStatus


class MergeConflict(ConfigurationError):
    """Two children of a parallel stage set the same field to different values (``on_conflict="error"``)."""


def merge_outputs(stage: Stage, outputs: dict[str, BaseModel]) -> BaseModel:
    """Merge the validated *outputs* (by step id) of *stage*'s children in argument order.

    ``on_conflict="last"``: a field set by several children keeps the value of the child listed
    last. ``on_conflict="error"``: :class:`MergeConflict` when two children set a field to
    different values (the message names the field and both steps, never the values). A
    single-step stage returns its output unchanged.
    """
    if stage.group is None or len(stage.steps) == 1:
        return outputs[stage.steps[0].step_id]
    values: dict[str, Any] = {}
    owners: dict[str, str] = {}
    strict = stage.group.on_conflict == "error"
    for step in stage.steps:
        for key, value in outputs[step.step_id]:  # fields, then extras of extra="allow" models
            if strict and key in values and values[key] != value:
                raise MergeConflict(
                    f"parallel steps {owners[key]!r} and {step.step_id!r} both set field {key!r} to "
                    "different values (on_conflict='error')"
                )
            values[key] = value
            owners[key] = step.step_id
    # Every value was validated by its own child's schema: construct without validating again.
    return stage.output_schema.model_construct(**values)


async def run_parallel_stage(
    stage: Stage,
    state: object,
    ctx: ReliabilityContext,
    done: dict[str, BaseModel],
    on_progress: Callable[[], Awaitable[None]] | None = None,
) -> tuple[dict[str, BaseModel], ExecutionResult | None]:
    """Run the children of *stage* not in *done* (restored outputs) on *state*.

    *on_progress* is awaited on this (the calling) task each time a child completed while
    siblings are still running; the runner uses it to record the child's usage in the run
    manifest, so a crash later in the stage does not lose it. Writes are therefore never
    concurrent.

    Returns ``(outputs by step id, None)`` when every child completed, else ``(outputs so far,
    the failing child's result)``: the first ``FAILED`` child in completion order (its running
    siblings are cancelled at once), otherwise the first child in argument order that did not
    complete. A ``BaseException`` (cancellation) or a checkpoint store error raised by a child
    cancels the others, waits for them to end their spans, and propagates.
    """
    outputs = dict(done)
    todo = [step for step in stage.steps if step.step_id not in done]
    if not todo:
        return outputs, None
    assert stage.group is not None
    limit = stage.group.max_concurrency
    slots = asyncio.Semaphore(limit) if limit is not None and limit < len(todo) else None

    async def run_child(step: StepSpec) -> ExecutionResult:
        if slots is None:
            return await execute_step(step.step_id, step.func, state, ctx, contract=step.contract)
        async with slots:
            return await execute_step(step.step_id, step.func, state, ctx, contract=step.contract)

    tasks = {asyncio.ensure_future(run_child(step)): step for step in todo}
    position = {step.step_id: index for index, step in enumerate(stage.steps)}
    results: dict[str, ExecutionResult] = {}
    first_failed: ExecutionResult | None = None
    try:
        pending = set(tasks)
        while pending and first_failed is None:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(finished, key=lambda t: position[tasks[t].step_id]):
                result = task.result()  # a BaseException or CheckpointError propagates (finally cleans up)
                results[tasks[task].step_id] = result
                if result.status is RunStatus.FAILED and first_failed is None:
                    first_failed = result
            if on_progress is not None and pending and first_failed is None:
                await on_progress()
    finally:
        await _cancel_all([task for task in tasks if not task.done()])
        for task in tasks:  # retrieve every outcome so none is reported as "never retrieved"
            if task.done() and not task.cancelled():
                task.exception()
    if first_failed is not None:
        return outputs, first_failed
    for step in stage.steps:
        child = results.get(step.step_id)
        if child is None:
            continue
        if child.status is not RunStatus.COMPLETED:
            return outputs, child
        outputs[step.step_id] = child.final_state
    return outputs, None


async def _cancel_all(tasks: list[asyncio.Future[ExecutionResult]]) -> None:
    """Cancel *tasks* and wait until each has ended (so their spans are ended too)."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
