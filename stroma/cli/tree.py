"""The run tree: one model of a run for every source (local run store, Jaeger).

:func:`build_tree` turns span records into a :class:`RunTree`: the run, its steps (nested steps
too, e.g. the children of ``parallel()``) and each step's attempts, with status, duration,
tokens, cost, model, fallback, failure class, checkpoint and budget. Records come from the local
run store (:meth:`SpanRecord.to_dict` plus ``id``/``parent``) or from Jaeger
(:mod:`stroma.cli.jaeger` converts its traces to the same shape); :mod:`stroma.cli.render`
prints the tree.

Records are dicts with ``kind`` (``run``/``step``/``attempt``; derived from ``name`` when
missing), ``name``, ``attributes`` (the names of :mod:`stroma.telemetry.names`), ``events``
(``{"name", "attributes"}``), ``error_type``, ``start_ns``, ``end_ns``, ``trace_id``, ``id`` and
``parent`` (the ``id`` of the parent record, or ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from stroma.telemetry import names as n

__all__ = ["AttemptNode", "BudgetView", "ModelCallNode", "RunTree", "StepNode", "as_number", "build_tree"]


# --- the model ---------------------------------------------------------------------------------


@dataclass
class ModelCallNode:
    """One model call counted for an attempt (a ``stroma.model_call`` event, from a GenAI span)."""

    model: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float
    unpriced: bool = False
    error_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "error_type": self.error_type,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "unpriced": self.unpriced,
        }


@dataclass
class AttemptNode:
    """One try of a step."""

    number: int
    ok: bool
    duration_s: float
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: bool = False
    error_type: str | None = None
    failure_class: str | None = None
    retry_delay_s: float = 0.0
    contract: str | None = None
    calls: list[ModelCallNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        extra = {"model_calls": [call.to_dict() for call in self.calls]} if self.calls else {}
        return {
            **extra,
            "attempt": self.number,
            "status": "ok" if self.ok else "error",
            "duration_s": self.duration_s,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "unpriced": self.unpriced,
            "error_type": self.error_type,
            "failure_class": self.failure_class,
            "retry_delay_s": self.retry_delay_s,
            "contract": self.contract,
        }


@dataclass
class StepNode:
    """One ``execute_step`` call: totals over its attempts, and what happened to it."""

    step_id: str
    status: str  # "ok", "error" or "restored" (taken from a checkpoint on resume)
    duration_s: float
    start_ns: int = 0
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error_type: str | None = None
    failure_class: str | None = None
    fallback: dict[str, Any] | None = None
    breach: dict[str, Any] | None = None
    checkpoint: str | None = None
    attempts: list[AttemptNode] = field(default_factory=list)
    children: list[StepNode] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "error"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "status": self.status,
            "duration_s": self.duration_s,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
            "error_type": self.error_type,
            "failure_class": self.failure_class,
            "fallback": self.fallback,
            "budget_exceeded": self.breach,
            "checkpoint": self.checkpoint,
            "attempts": [attempt.to_dict() for attempt in self.attempts],
            "steps": [child.to_dict() for child in self.children],
        }


@dataclass
class BudgetView:
    """Limits and usage at the end of the run, per dimension (``None`` = no limit)."""

    cost_limit: float | None = None
    cost_usage: float | None = None
    utilization: float | None = None
    token_limit: int | None = None
    token_usage: int | None = None
    duration_limit_s: float | None = None
    duration_usage_s: float | None = None

    @property
    def any_limit(self) -> bool:
        return any(limit is not None for limit in (self.cost_limit, self.token_limit, self.duration_limit_s))

    def to_dict(self) -> dict[str, Any]:
        return {
            "cost_limit_usd": self.cost_limit,
            "cost_usage_usd": self.cost_usage,
            "cost_utilization": self.utilization,
            "token_limit": self.token_limit,
            "token_usage": self.token_usage,
            "duration_limit_s": self.duration_limit_s,
            "duration_usage_s": self.duration_usage_s,
        }


@dataclass
class RunTree:
    """A run and its steps, as ``stroma show`` prints it."""

    run_id: str
    workflow: str | None
    status: str
    started_at: datetime | None
    duration_s: float
    cost_usd: float
    input_tokens: int
    output_tokens: int
    trace_id: str | None = None
    error: str | None = None
    budget: BudgetView = field(default_factory=BudgetView)
    breaches: list[dict[str, Any]] = field(default_factory=list)
    steps: list[StepNode] = field(default_factory=list)
    source: str = "local"
    unpriced: bool = False
    resumed_from: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def all_steps(self) -> list[StepNode]:
        """Every step, depth first."""
        found: list[StepNode] = []
        stack = list(reversed(self.steps))
        while stack:
            step = stack.pop()
            found.append(step)
            stack.extend(reversed(step.children))
        return found

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``stroma show --json``)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "duration_s": self.duration_s,
            "cost_usd": self.cost_usd,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "trace_id": self.trace_id,
            "error": self.error,
            "budget": self.budget.to_dict(),
            "budget_exceeded": self.breaches,
            "unpriced_usage": self.unpriced,
            "resumed_from": self.resumed_from,
            "source": self.source,
            "steps": [step.to_dict() for step in self.steps],
        }


# --- building it from records ------------------------------------------------------------------


def _kind(record: Mapping[str, Any]) -> str:
    kind = record.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return str(record.get("name", "")).split(" ", 1)[0]


def as_number(value: Any, default: float = 0.0) -> float:
    """*value* as a float (numbers, numeric strings as Jaeger sends int64); *default* otherwise."""
    if isinstance(value, bool):
        return default
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return default
    return default


def _int(value: Any, default: int = 0) -> int:
    return int(as_number(value, default))


def _opt_num(value: Any) -> float | None:
    return None if value is None else as_number(value)


def _duration(record: Mapping[str, Any]) -> float:
    start, end = record.get("start_ns"), record.get("end_ns")
    if start is None or end is None:
        return 0.0
    return max(0, int(end) - int(start)) / 1e9


def _events(record: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    found = []
    for event in record.get("events") or ():
        if event.get("name") == name:
            found.append(dict(event.get("attributes") or {}))
    return found


def _breach_view(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "dimension": str(attrs.get(n.BUDGET_DIMENSION, "")),
        "limit": as_number(attrs.get(n.BUDGET_LIMIT)),
        "usage": as_number(attrs.get(n.BUDGET_USAGE)),
        "step_id": attrs.get(n.STEP_ID),
    }


def _attempt(record: Mapping[str, Any]) -> AttemptNode:
    attrs = record.get("attributes") or {}
    model = attrs.get(n.MODEL)
    return AttemptNode(
        number=_int(attrs.get(n.STEP_ATTEMPT_NUMBER), 1),
        ok=record.get("error_type") is None,
        duration_s=_duration(record),
        model=str(model) if model is not None else None,
        input_tokens=_int(attrs.get(n.USAGE_INPUT_TOKENS)),
        output_tokens=_int(attrs.get(n.USAGE_OUTPUT_TOKENS)),
        cost_usd=as_number(attrs.get(n.COST_AMOUNT)),
        unpriced=bool(attrs.get(n.COST_UNPRICED, False)),
        error_type=record.get("error_type"),
        failure_class=attrs.get(n.FAILURE_CLASS),
        retry_delay_s=as_number(attrs.get(n.STEP_RETRY_DELAY)),
        contract=attrs.get(n.CONTRACT_OUTCOME),
        calls=[_model_call(event) for event in _events(record, n.EVENT_MODEL_CALL)],
    )


def _model_call(attrs: Mapping[str, Any]) -> ModelCallNode:
    model = attrs.get("gen_ai.response.model")
    return ModelCallNode(
        model=str(model) if model is not None else None,
        input_tokens=_int(attrs.get("gen_ai.usage.input_tokens")),
        output_tokens=_int(attrs.get("gen_ai.usage.output_tokens")),
        cost_usd=as_number(attrs.get(n.COST_AMOUNT)),
        unpriced=bool(attrs.get(n.COST_UNPRICED, False)),
        error_type=str(attrs[n.ERROR_TYPE]) if n.ERROR_TYPE in attrs else None,
    )


def _step(record: Mapping[str, Any], children: Mapping[Any, list[Mapping[str, Any]]]) -> StepNode:
    attrs = record.get("attributes") or {}
    restored = bool(attrs.get(n.STEP_SKIPPED, False))
    status = "error" if record.get("error_type") is not None else ("restored" if restored else "ok")
    fallback = None
    if n.FALLBACK_TO_MODEL in attrs:
        fallback = {
            "from_model": attrs.get(n.FALLBACK_FROM_MODEL),
            "to_model": attrs.get(n.FALLBACK_TO_MODEL),
            "reason": attrs.get(n.FALLBACK_REASON),
            "threshold": _opt_num(attrs.get(n.FALLBACK_THRESHOLD)),
        }
    breaches = _events(record, n.EVENT_BUDGET_EXCEEDED)
    saved = _events(record, n.EVENT_CHECKPOINT_SAVED)
    model = attrs.get(n.MODEL)
    node = StepNode(
        step_id=str(attrs.get(n.STEP_ID) or str(record.get("name", "")).partition(" ")[2] or "?"),
        status=status,
        duration_s=_duration(record),
        start_ns=_int(record.get("start_ns")),
        model=str(model) if model is not None else None,
        input_tokens=_int(attrs.get(n.STEP_USAGE_INPUT_TOKENS)),
        output_tokens=_int(attrs.get(n.STEP_USAGE_OUTPUT_TOKENS)),
        cost_usd=as_number(attrs.get(n.STEP_COST_AMOUNT)),
        error_type=record.get("error_type"),
        failure_class=attrs.get(n.FAILURE_CLASS),
        fallback=fallback,
        breach=_breach_view(breaches[0]) if breaches else None,
        checkpoint=str(saved[-1].get(n.CHECKPOINT_STORE, "")) or "saved" if saved else None,
    )
    for child in children.get(record.get("id"), ()):
        kind = _kind(child)
        if kind == n.SPAN_ATTEMPT:
            node.attempts.append(_attempt(child))
            # Steps executed inside an attempt (a freestanding execute_step in a step's code).
            node.children.extend(_collect_steps(child.get("id"), children))
        elif kind == n.SPAN_STEP:
            node.children.append(_step(child, children))
    node.attempts.sort(key=lambda attempt: attempt.number)
    if node.model is None:
        models = [attempt.model for attempt in node.attempts if attempt.model]
        node.model = models[-1] if models else None
    return node


def _collect_steps(parent_id: Any, children: Mapping[Any, list[Mapping[str, Any]]]) -> list[StepNode]:
    """Steps directly under *parent_id*, looking through records of other kinds (app spans)."""
    steps: list[StepNode] = []
    for child in children.get(parent_id, ()):
        kind = _kind(child)
        if kind == n.SPAN_STEP:
            steps.append(_step(child, children))
        elif kind not in (n.SPAN_ATTEMPT, n.SPAN_RUN):
            steps.extend(_collect_steps(child.get("id"), children))
    return steps


def build_tree(
    records: Sequence[Mapping[str, Any]],
    *,
    run_id: str | None = None,
    summary: Mapping[str, Any] | None = None,
    source: str = "local",
) -> RunTree:
    """The :class:`RunTree` of one run's *records*.

    *summary* (a stored run's :meth:`~stroma.runstore.RunSummary.to_dict`) supplies what the
    records lack, e.g. for a run without a run span. Records whose parent is not among
    *records* are treated as top level.
    """
    summary = summary or {}
    run_record = next((record for record in records if _kind(record) == n.SPAN_RUN), None)
    run_attrs: Mapping[str, Any] = (run_record.get("attributes") or {}) if run_record is not None else {}
    steps = _top_level_steps(records, run_record)
    all_steps = _every_step(steps)
    started_at, duration_s = _run_timing(run_record, summary)
    cost, input_tokens, output_tokens = _run_totals(run_attrs, summary, all_steps)
    budget = _budget_view(run_attrs, summary, cost, input_tokens + output_tokens)

    breaches = [_breach_view(attrs) for attrs in _events(run_record, n.EVENT_BUDGET_EXCEEDED)] if run_record else []
    if not breaches:
        breaches = [step.breach for step in all_steps if step.breach is not None]

    trace_id = summary.get("trace_id") or (run_record.get("trace_id") if run_record else None)
    if not trace_id:
        trace_id = next((record.get("trace_id") for record in records if record.get("trace_id")), None)
    workflow = run_attrs.get(n.GEN_AI_WORKFLOW_NAME) or summary.get("workflow")
    return RunTree(
        run_id=str(run_attrs.get(n.RUN_ID) or summary.get("run_id") or run_id or "?"),
        workflow=str(workflow) if workflow is not None else None,
        status=str(run_attrs.get(n.RUN_STATUS) or summary.get("status") or "unknown"),
        started_at=started_at,
        duration_s=duration_s,
        cost_usd=cost,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        trace_id=str(trace_id) if trace_id else None,
        error=summary.get("error"),
        budget=budget,
        breaches=breaches,
        steps=steps,
        source=source,
        unpriced=any(attempt.unpriced for step in all_steps for attempt in step.attempts),
        resumed_from=str(run_attrs[n.RUN_RESUMED_FROM]) if n.RUN_RESUMED_FROM in run_attrs else None,
    )


def _top_level_steps(records: Sequence[Mapping[str, Any]], run_record: Mapping[str, Any] | None) -> list[StepNode]:
    """The run's steps (under the run span, or top level), by start time, each with its children."""
    ids = {record.get("id") for record in records}
    children: dict[Any, list[Mapping[str, Any]]] = {}
    for record in records:
        parent = record.get("parent")
        key = parent if parent in ids else None
        children.setdefault(key, []).append(record)
    for siblings in children.values():
        siblings.sort(key=lambda record: (_int(record.get("start_ns")), str(record.get("id"))))
    if run_record is not None:
        # Top-level records other than the run (steps of a context used without as_run()) still show.
        top = {**children, None: [c for c in children.get(None, []) if c is not run_record]}
        steps = _collect_steps(run_record.get("id"), top) + _collect_steps(None, top)
    else:
        steps = _collect_steps(None, children)
    steps.sort(key=lambda step: step.start_ns)
    return steps


def _every_step(steps: list[StepNode]) -> list[StepNode]:
    """*steps* and all their descendants."""
    found: list[StepNode] = []
    pending = list(steps)
    while pending:
        step = pending.pop()
        found.append(step)
        pending.extend(step.children)
    return found


def _run_timing(run_record: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> tuple[datetime | None, float]:
    """When the run started and how long it took: from the run span, else from the stored summary."""
    if run_record is not None and run_record.get("start_ns") is not None:
        started_at = datetime.fromtimestamp(int(run_record["start_ns"]) / 1e9, tz=timezone.utc)
        return started_at, _duration(run_record)
    raw_start = summary.get("started_at")
    started_at_or_none = datetime.fromisoformat(raw_start) if isinstance(raw_start, str) else None
    return started_at_or_none, as_number(summary.get("duration_s"))


def _run_totals(
    run_attrs: Mapping[str, Any], summary: Mapping[str, Any], all_steps: list[StepNode]
) -> tuple[float, int, int]:
    """Cost (USD), input and output tokens: the run span's totals, else the summary's, else the steps' sums."""
    if n.RUN_COST_AMOUNT in run_attrs:
        return (
            as_number(run_attrs.get(n.RUN_COST_AMOUNT)),
            _int(run_attrs.get(n.RUN_USAGE_INPUT_TOKENS)),
            _int(run_attrs.get(n.RUN_USAGE_OUTPUT_TOKENS)),
        )
    if summary:
        return (
            as_number(summary.get("cost_usd")),
            _int(summary.get("input_tokens")),
            _int(summary.get("output_tokens")),
        )
    return (
        sum(step.cost_usd for step in all_steps),
        sum(step.input_tokens for step in all_steps),
        sum(step.output_tokens for step in all_steps),
    )


def _budget_view(run_attrs: Mapping[str, Any], summary: Mapping[str, Any], cost: float, tokens: int) -> BudgetView:
    """The run's limits and use: the run span's ``stroma.budget.*`` attributes, else the stored budget."""
    stored_budget = summary.get("budget") or {}
    raw_tokens = run_attrs.get(n.BUDGET_TOKEN_LIMIT, stored_budget.get("max_tokens_total"))
    if n.BUDGET_DURATION_LIMIT in run_attrs:
        duration_limit_s = _opt_num(run_attrs.get(n.BUDGET_DURATION_LIMIT))
    elif stored_budget.get("max_latency_ms"):
        duration_limit_s = as_number(stored_budget["max_latency_ms"]) / 1000.0
    else:
        duration_limit_s = None
    budget = BudgetView(
        cost_limit=_opt_num(run_attrs.get(n.BUDGET_COST_LIMIT, stored_budget.get("max_cost_usd"))),
        cost_usage=_opt_num(run_attrs.get(n.BUDGET_COST_USAGE)),
        utilization=_opt_num(run_attrs.get(n.BUDGET_COST_UTILIZATION, summary.get("utilization"))),
        token_limit=None if raw_tokens is None else _int(raw_tokens),
        token_usage=None if n.BUDGET_TOKEN_USAGE not in run_attrs else _int(run_attrs[n.BUDGET_TOKEN_USAGE]),
        duration_limit_s=duration_limit_s,
        duration_usage_s=_opt_num(run_attrs.get(n.BUDGET_DURATION_USAGE)),
    )
    if budget.cost_limit is not None and budget.cost_usage is None:
        budget.cost_usage = cost
    if budget.token_limit is not None and budget.token_usage is None:
        budget.token_usage = tokens
    if budget.utilization is None and budget.cost_limit:
        budget.utilization = cost / budget.cost_limit
    return budget
