"""Run manifests: resuming a run id, detecting a changed pipeline, keeping a finished result.

The runner stores one manifest per run through
:meth:`~stroma.checkpoint.CheckpointManager.save_manifest` (the store keeps it beside the run's
checkpoints; ``CheckpointManager.clear`` removes both). Its shape::

    {"format": "stroma.runner/1",
     "workflow": "pipeline",
     "steps": [{"step_id": "fetch", "schema_name": "app.Doc", "schema_fingerprint": "sha256:…",
                "stage": 0, "position": 0}, …],      # pipeline order; parallel children share a stage
     "origin": {"trace_id": "…", "span_id": "…"},    # the run span of the first attempt (or null)
     "previous": {"trace_id": "…", "span_id": "…"},  # the run span of the latest attempt
     "attempts": 2,                                  # how many times the run id was started
     "input_fingerprint": "sha256:…" | null,         # the initial state (see input_fingerprint)
     "usage": {"fetch": {"cost_usd": 0.01, "input_tokens": 10, "output_tokens": 5, "model": "m"}},
     "status": "running" | "completed" | "partial" | "failed" | "resumed",
     "result": null | {"status": "COMPLETED", "final_state": {…}, "total_cost_usd": …, …}}

When it is written: when a run starts (before any step runs, so a run's checkpoints never exist
without its manifest); after every stage but the last, and after each parallel child that
completes while its siblings still run, when usage changed (so a resumed run charges restored
steps with the usage they had, and never twice); and when the run ends. A crash between a step's checkpoint and the
next manifest write loses that step's usage from the resumed run's totals; the step itself is
restored, not re-run.

Input identity (issue 8 B6): ``input_fingerprint`` is the SHA-256 of the canonical JSON of the
run's initial state (:func:`input_fingerprint`). Running a run id again with:

- the same input: the rules above (a finished run returns its stored result, an unfinished one
  resumes);
- a different input, when the stored run finished (``completed`` / ``resumed``): a new execution
  of that run id; the old run's checkpoints and manifest are cleared first, then everything runs
  (a fixed run id names a job, as in the established package, whose runs were independent);
- a different input, when the stored run did not finish: :class:`~stroma.errors.RunInputChangedError`
  naming the run id, before anything runs (continuing would mix two inputs' work);
- an unknown input on either side (a manifest written before fingerprints existed, or an initial
  state that cannot be encoded as JSON): the rules above, with a warning naming the run.

``RunConfig.resume_from`` keeps its established meaning (continue from the checkpoints,
whatever the input): a different input is logged as a warning, not refused.

Pipeline identity: the ordered step ids, their stage and position, and the fingerprint of each
step's output schema. Any difference is a :class:`~stroma.errors.PipelineChangedError` raised
before anything runs. A step's code may change between attempts (that is how a failing step is
fixed); its output schema may not, because the checkpoints were validated against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.trace import Link, SpanContext, TraceFlags
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from stroma._pipeline.plan import Plan
from stroma.checkpoint import CheckpointManager
from stroma.context import ReliabilityContext
from stroma.errors import CheckpointError, PipelineChangedError, RunInputChangedError
from stroma.trace import FINISHED_VALUES, ExecutionResult, ExecutionTrace, RunStatus

logger = logging.getLogger("stroma")

FORMAT: Final = "stroma.runner/1"


def input_fingerprint(state: Any) -> str | None:
    """``"sha256:<hex>"`` of the canonical JSON of *state*, or ``None`` when it has none.

    Canonical: a pydantic model as ``model_dump(mode="json")``, anything else through pydantic's
    JSON conversion, then sorted keys and no whitespace, so a model and the dict of the same
    values fingerprint alike. ``None`` for a state that cannot be encoded as JSON (the input is
    then unknown, see the module docs).
    """
    try:
        data = state.model_dump(mode="json") if isinstance(state, BaseModel) else to_jsonable_python(state)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _same_input(manifest: Mapping[str, Any], fingerprint: str | None) -> bool | None:
    """Whether the stored run had this input: ``None`` when either side is unknown."""
    stored = manifest.get("input_fingerprint")
    if not isinstance(stored, str) or fingerprint is None:
        return None
    return stored == fingerprint


def manifest_steps(plan: Plan) -> list[dict[str, Any]]:
    """The pipeline-identity part of a manifest (see the module docs)."""
    return list(plan.identity)


def check_pipeline(run_id: str, manifest: Mapping[str, Any], plan: Plan) -> None:
    """Raise :class:`PipelineChangedError` unless *plan* is the pipeline that wrote *manifest*.

    The message names every differing step and what differs. Raises
    :class:`~stroma.errors.CheckpointError` when the manifest was not written by this runner.
    """
    stored_steps = manifest.get("steps")
    if manifest.get("format") != FORMAT or not isinstance(stored_steps, list):
        raise CheckpointError(
            f"the manifest of run {run_id!r} was not written by StromaRunner (format "
            f"{manifest.get('format')!r}); it cannot be resumed by a runner. Use another run id or clear it.",
            run_id=run_id,
        )
    stored = {str(e.get("step_id")): e for e in stored_steps if isinstance(e, Mapping)}
    current = {e["step_id"]: e for e in manifest_steps(plan)}
    problems: list[str] = []
    for step_id, entry in stored.items():
        if step_id not in current:
            problems.append(f"{step_id!r} is no longer in the pipeline (renamed or removed)")
            continue
        now = current[step_id]
        if entry.get("schema_fingerprint") != now["schema_fingerprint"]:
            problems.append(
                f"{step_id!r} changed its output schema ({entry.get('schema_name')} -> {now['schema_name']})"
            )
        elif (entry.get("stage"), entry.get("position")) != (now["stage"], now["position"]):
            problems.append(
                f"{step_id!r} moved from stage {entry.get('stage')} position {entry.get('position')} to "
                f"stage {now['stage']} position {now['position']}"
            )
    problems.extend(f"{step_id!r} is new (added or renamed)" for step_id in current if step_id not in stored)
    if problems:
        raise PipelineChangedError(
            f"run {run_id!r} was checkpointed by a different pipeline: {'; '.join(problems)}. Nothing was "
            "run. Resume it with the pipeline that started it, or start a new run id (or clear this one "
            "with CheckpointManager.clear)."
        )


def _span_link(ref: Any) -> Link | None:
    if not isinstance(ref, Mapping):
        return None
    try:
        trace_id = int(str(ref["trace_id"]), 16)
        span_id = int(str(ref["span_id"]), 16)
    except (KeyError, ValueError):
        return None
    if not trace_id or not span_id:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return Link(context)


def _usage_of(manifest: Mapping[str, Any] | None, step_id: str) -> dict[str, Any]:
    usage = (manifest or {}).get("usage")
    entry = usage.get(step_id) if isinstance(usage, Mapping) else None
    if not isinstance(entry, Mapping):
        return {}
    out: dict[str, Any] = {}
    cost, tin, tout, model = (entry.get(k) for k in ("cost_usd", "input_tokens", "output_tokens", "model"))
    if isinstance(cost, (int, float)) and not isinstance(cost, bool) and cost >= 0:
        out["cost_usd"] = float(cost)
    if isinstance(tin, int) and not isinstance(tin, bool) and tin >= 0:
        out["input_tokens"] = tin
    if isinstance(tout, int) and not isinstance(tout, bool) and tout >= 0:
        out["output_tokens"] = tout
    if isinstance(model, str):
        out["model"] = model
    return out


@dataclass
class ResumePoint:
    """Where a run continues: what to restore, from which stage to run, and how to link."""

    start_stage: int
    restored: dict[str, BaseModel] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    legacy: bool = False

    @property
    def links(self) -> list[Link]:
        found: list[Link] = []
        seen: set[tuple[Any, Any]] = set()
        for key in ("origin", "previous"):
            link = _span_link((self.manifest or {}).get(key))
            if link is not None and (link.context.trace_id, link.context.span_id) not in seen:
                seen.add((link.context.trace_id, link.context.span_id))
                found.append(link)
        return found

    def usage(self, step_id: str) -> dict[str, Any]:
        """Keyword arguments for ``ReliabilityContext.restore_step`` (the step's stored usage)."""
        return _usage_of(self.manifest, step_id)

    def resumed_from(self, plan: Plan) -> str:
        """The step id execution continues from (the last step when everything was restored)."""
        if self.start_stage < len(plan.stages):
            stage = plan.stages[self.start_stage]
            pending = [s.step_id for s in stage.steps if s.step_id not in self.restored]
            return pending[0] if pending else stage.steps[0].step_id
        return plan.stages[-1].steps[-1].step_id


async def find_resume_point(
    manager: CheckpointManager,
    run_id: str,
    plan: Plan,
    resume_from: str | None,
    fingerprint: str | None = None,
) -> ResumePoint | ExecutionResult | None:
    """Read what is stored for *run_id* and decide how the run continues. Runs nothing.

    *fingerprint* is this call's :func:`input_fingerprint`. Returns ``None`` for a run id with
    nothing stored, or whose finished run had a different input (its data is cleared first: a
    new execution); the stored :class:`ExecutionResult` for a run that already completed with
    this input (only without *resume_from*); or a :class:`ResumePoint`. Raises
    :class:`PipelineChangedError` when *plan* differs from the stored pipeline,
    :class:`~stroma.errors.RunInputChangedError` when an unfinished run had a different input,
    and :class:`~stroma.errors.CheckpointError` when stored data is unusable.
    """
    manifest = await manager.load_manifest(run_id)
    same: bool | None = None
    if manifest is not None:
        same = _same_input(manifest, fingerprint)
        finished = manifest.get("status") in FINISHED_VALUES
        if same is False and finished and resume_from is None and manifest.get("format") == FORMAT:
            # A new execution of a run id that names a job: nothing of the old run is reused.
            await manager.clear(run_id)
            return None
        check_pipeline(run_id, manifest, plan)
        if same is None:
            logger.warning(
                "run %s: no input fingerprint to compare (a manifest from an older Stroma, or an initial "
                "state that is not JSON); continuing the stored run without checking that its input is the same",
                run_id,
            )
        elif not same and resume_from is not None:
            logger.warning(
                "run %s: resume_from=%r continues checkpoints written for a different initial state",
                run_id,
                resume_from,
            )
        elif not same:
            raise RunInputChangedError(
                f"run {run_id!r} did not finish (status {manifest.get('status')!r}) and was started with a "
                "different initial state; continuing it would mix two inputs' work. Nothing was run. Run it "
                "again with the input it started with to resume it, clear it (CheckpointManager.clear"
                f"({run_id!r})) to start over, or use another run id."
            )
    if resume_from is not None:
        return await _legacy_point(manager, run_id, plan, resume_from, manifest)
    if manifest is None:
        return None
    stored = manifest.get("result")
    if manifest.get("status") in FINISHED_VALUES and isinstance(stored, Mapping):
        return stored_result(run_id, plan, stored)
    completed = set(await manager.completed_steps(run_id))
    point = ResumePoint(start_stage=len(plan.stages), manifest=manifest)
    for stage in plan.stages:
        for step in stage.steps:
            if step.step_id in completed:
                output = await manager.resume(run_id, step.step_id, step.contract.output_schema)
                if output is not None:
                    point.restored[step.step_id] = output
        if any(step.step_id not in point.restored for step in stage.steps):
            point.start_stage = stage.index
            break
    return point


async def _legacy_point(
    manager: CheckpointManager,
    run_id: str,
    plan: Plan,
    resume_from: str,
    manifest: dict[str, Any] | None,
) -> ResumePoint:
    """``RunConfig.resume_from``: run from that step's stage, whatever is checkpointed after it."""
    start = next(stage.index for stage in plan.stages if any(s.step_id == resume_from for s in stage.steps))
    point = ResumePoint(start_stage=start, manifest=manifest, legacy=True)
    for stage in plan.stages[:start]:
        for step in stage.steps:
            output = await manager.resume(run_id, step.step_id, step.contract.output_schema)
            if output is not None:
                point.restored[step.step_id] = output
    if start > 0 and any(s.step_id not in point.restored for s in plan.stages[start - 1].steps):
        logger.warning(
            "run %s: resume_from=%r but the steps before it have no checkpoint in this run; "
            "starting %r from the initial state",
            run_id,
            resume_from,
            resume_from,
        )
    return point


# --- writing -------------------------------------------------------------------------------------


def _span_ref(ctx: ReliabilityContext) -> dict[str, str] | None:
    record = ctx.run_record
    if record is None or record.trace_id is None or record.span_id is None:
        return None
    return {"trace_id": record.trace_id, "span_id": record.span_id}


class ManifestWriter:
    """Builds and saves the manifest of one run (see the module docs for when)."""

    def __init__(
        self,
        manager: CheckpointManager,
        plan: Plan,
        ctx: ReliabilityContext,
        prior: Mapping[str, Any] | None,
        fingerprint: str | None = None,
    ) -> None:
        self._manager = manager
        self._ctx = ctx
        self._step_ids = plan.step_ids
        attempts = prior.get("attempts") if prior is not None else 0
        this_run = _span_ref(ctx)
        origin = prior.get("origin") if prior is not None else None
        self._base: dict[str, Any] = {
            "format": FORMAT,
            "workflow": ctx.workflow_name,
            "steps": manifest_steps(plan),
            "origin": origin if isinstance(origin, Mapping) else this_run,
            "previous": this_run,
            "attempts": (attempts if isinstance(attempts, int) else 0) + 1,
            "input_fingerprint": fingerprint,
        }
        self._written_usage: dict[str, dict[str, Any]] | None = None

    def _usage(self) -> dict[str, dict[str, Any]]:
        summary = self._ctx.cost_tracker.summary()
        usage: dict[str, dict[str, Any]] = {}
        for step_id in self._step_ids:
            entry = summary.get(step_id)
            if entry is not None:
                usage[step_id] = {
                    "cost_usd": float(entry.cost_usd),
                    "input_tokens": int(entry.tokens_used - entry.output_tokens),
                    "output_tokens": int(entry.output_tokens),
                    "model": entry.model,
                }
        return usage

    async def save(self, status: str = "running", result: ExecutionResult | None = None) -> None:
        """Write the manifest; a progress write (``"running"``) that would change nothing is skipped."""
        usage = self._usage()
        if status == "running" and usage == self._written_usage:
            return
        manifest = dict(self._base)
        manifest["usage"] = usage
        manifest["status"] = status
        manifest["result"] = _result_record(result) if result is not None else None
        await self._manager.save_manifest(self._ctx.run_id, manifest)
        self._written_usage = usage


def _result_record(result: ExecutionResult) -> dict[str, Any] | None:
    state = result.final_state
    if not isinstance(state, BaseModel):
        return None
    return {
        "status": result.status.value,
        "final_state": state.model_dump(mode="json"),
        "total_cost_usd": float(result.total_cost_usd),
        "input_tokens": int(result.input_tokens),
        "output_tokens": int(result.output_tokens),
        "unpriced_models": list(result.unpriced_models),
        # pairs, not an object: stored JSON sorts object keys, and the step order is worth keeping
        "cost_by_step": [[k, float(v)] for k, v in result.cost_by_step.items()],
        "trace_id": result.trace_id,
    }


def stored_result(run_id: str, plan: Plan, record: Mapping[str, Any]) -> ExecutionResult:
    """Rebuild a finished run's :class:`ExecutionResult` from its manifest (no steps run).

    The trace is empty (nothing ran in this call); totals and the trace id are the original
    run's. Raises :class:`~stroma.errors.CheckpointError` when the stored result is unusable.
    """
    try:
        schema = plan.stages[-1].output_schema
        final_state = schema.model_validate(record["final_state"])
        status = RunStatus(record["status"])
        input_tokens = int(record.get("input_tokens", 0))
        output_tokens = int(record.get("output_tokens", 0))
        return ExecutionResult(
            run_id=run_id,
            status=status,
            final_state=final_state,
            trace=ExecutionTrace(),
            total_cost_usd=float(record.get("total_cost_usd", 0.0)),
            total_tokens=input_tokens + output_tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            unpriced_models=tuple(str(m) for m in record.get("unpriced_models", ())),
            cost_by_step={str(k): float(v) for k, v in record.get("cost_by_step", [])},
            trace_id=record.get("trace_id"),
        )
    except (KeyError, TypeError, ValueError, ValidationError, IndexError) as exc:
        raise CheckpointError(
            f"the stored result of finished run {run_id!r} cannot be read back ({type(exc).__name__}); "
            "clear the run (CheckpointManager.clear) or use a new run id",
            run_id=run_id,
        ) from exc
