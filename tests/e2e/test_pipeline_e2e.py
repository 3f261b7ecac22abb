"""A real pipeline through the real stack: the same truth in the result, Jaeger, Prometheus and
the alert (issue "The observability stack", Show).

One module-scoped workload exports over OTLP/HTTP the way a user configures it (the standard
``OTEL_*`` variables, Stroma's private providers): run 1 has retries, a budget-threshold
fallback, an unpriced model and a budget breach; run 2 has a contract violation. Then:

* Jaeger returns run 1's trace with the run -> step -> attempt structure and the design §4
  attributes, equal to the ExecutionResult;
* Prometheus holds cost and tokens per step equal to the results (after two export cycles);
* the breach reaches the test's Alertmanager webhook within 30 s of the run's end, naming the
  workflow and the breached dimension;
* every metric name the alert rules and dashboard use exists, and every dashboard query
  returns data.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import AlertWebhook, E2EStack, span_attributes, spans_of, wait_until
from pydantic import BaseModel

import stroma.telemetry
from stroma import (
    ContractRegistry,
    ExecutionBudget,
    ExecutionResult,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
)
from stroma.pricing import price_for
from stroma.telemetry import names as n
from stroma.testing import FakeModel, FakeReply, no_retry_sleep
from tests.stack.queries import dashboard_queries, metric_names, rule_expressions

pytestmark = pytest.mark.e2e

WORKFLOW = "e2e-support"


class Ticket(BaseModel):
    text: str


class Note(BaseModel):
    text: str


def contract(step_id: str) -> NodeContract:
    return NodeContract(node_id=step_id, input_schema=Ticket, output_schema=Note)


@dataclass
class Workload:
    service: str
    breach_run: ExecutionResult
    invalid_run: ExecutionResult
    finished_at: float


def _model_step(model: FakeModel) -> Any:
    async def call(ticket: Ticket) -> Any:
        reply = await model.complete(ticket.text)
        return {"text": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    return call


async def _run_with_breach() -> ExecutionResult:
    big = price_for("gpt-4o")
    assert big is not None
    draft_cost = big.cost(20_000, 4_000)
    config = RunConfig(
        workflow_name=WORKFLOW,
        budget=ExecutionBudget(max_cost_usd=draft_cost / 0.7),  # the draft alone uses 70 %
        model_fallbacks=[FallbackPolicy(preferred_model="gpt-4o", fallback_model="gpt-4o-mini", at_budget_pct=0.5)],
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=0.01)},
    )
    ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
    retrieve = FakeModel(
        [
            FakeReply(error=TimeoutError("vector store timed out"), input_tokens=300, model="gpt-4o-mini"),
            FakeReply(error=TimeoutError("vector store timed out"), input_tokens=300, model="gpt-4o-mini"),
            FakeReply("3 documents", input_tokens=300, output_tokens=40, model="gpt-4o-mini"),
        ]
    )
    draft = FakeModel([FakeReply("a long draft", input_tokens=20_000, output_tokens=4_000, model="gpt-4o")])
    check = FakeModel([FakeReply("looks fine", input_tokens=6_000, output_tokens=300)], default_model="gpt-4o")
    classify = FakeModel([FakeReply("billing", input_tokens=500, output_tokens=5, model="acme-local-7b")])
    polish = FakeModel([FakeReply("polished", input_tokens=30_000, output_tokens=2_000, model="claude-sonnet-4-5")])
    state: Any = Ticket(text="my invoice is wrong")
    with ctx.as_run(), no_retry_sleep():
        for step_id, model in (
            ("retrieve", retrieve),
            ("draft", draft),
            ("check", check),
            ("classify", classify),
            ("polish", polish),
        ):
            result = await execute_step(step_id, _model_step(model), state, ctx, contract=contract(step_id))
            if result.status is not RunStatus.COMPLETED:
                return ctx.build_result(
                    result.status, result.final_state, error=result.error, failed_step=result.failed_step
                )
            state = Ticket(text=result.final_state.text)
        return ctx.build_result(RunStatus.COMPLETED, state)


async def _run_with_violation() -> ExecutionResult:
    ctx = ReliabilityContext.for_run(RunConfig(workflow_name=WORKFLOW), ContractRegistry(), None)

    async def broken(ticket: Ticket) -> Any:
        return {"txt": "wrong field"}, 100, 10, "gpt-4o-mini"

    with ctx.as_run():
        result = await execute_step("validate", broken, Ticket(text="x"), ctx, contract=contract("validate"))
        return ctx.build_result(result.status, result.final_state, error=result.error, failed_step=result.failed_step)


@pytest.fixture(scope="module")
def workload(stack: E2EStack) -> Iterator[Workload]:
    import asyncio

    service = f"stroma-e2e-{uuid.uuid4().hex[:8]}"
    patch = pytest.MonkeyPatch()
    patch.setenv("OTEL_SERVICE_NAME", service)
    patch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    patch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "1000")
    try:
        stroma.telemetry.configure_otlp(stack.otlp_http_endpoint)
        breach_run = asyncio.run(_run_with_breach())
        invalid_run = asyncio.run(_run_with_violation())
        finished_at = time.monotonic()
        assert stroma.telemetry.flush(10.0)
        yield Workload(service, breach_run, invalid_run, finished_at)
    finally:
        stroma.telemetry.shutdown(10.0)
        patch.undo()
        stroma.telemetry.reset()


def test_the_workload_did_what_it_should(workload: Workload) -> None:
    run = workload.breach_run
    assert run.status is RunStatus.PARTIAL
    assert run.budget_exceeded is not None and run.budget_exceeded.dimension == "cost"
    assert run.failed_step == "polish"
    assert run.unpriced_models == ("acme-local-7b",)
    assert [e.attempt for e in run.trace.events_for("retrieve")] == [1, 2, 3]
    assert workload.invalid_run.status is RunStatus.FAILED


def _by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        found.setdefault(span["name"], []).append(span)
    return found


def test_jaeger_has_the_run_step_attempt_tree_equal_to_the_result(stack: E2EStack, workload: Workload) -> None:
    run = workload.breach_run
    assert run.trace_id is not None
    attempts_expected = len(run.trace)
    trace = stack.wait_for_trace(run.trace_id, min_spans=1 + 5 + attempts_expected)
    spans = spans_of(trace)
    by_name = _by_name(spans)
    [run_span] = by_name[f"run {WORKFLOW}"]
    run_attrs = span_attributes(run_span)
    assert run_attrs[n.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    assert run_attrs[n.GEN_AI_WORKFLOW_NAME] == WORKFLOW
    assert run_attrs[n.RUN_ID] == run.run_id
    assert run_attrs[n.RUN_STATUS] == "partial"
    assert float(run_attrs[n.RUN_COST_AMOUNT]) == pytest.approx(run.total_cost_usd, rel=1e-9)
    assert int(run_attrs[n.RUN_USAGE_INPUT_TOKENS]) == run.input_tokens
    assert int(run_attrs[n.RUN_USAGE_OUTPUT_TOKENS]) == run.output_tokens
    assert float(run_attrs[n.BUDGET_COST_UTILIZATION]) > 1.0
    assert n.EVENT_BUDGET_EXCEEDED in [e["name"] for e in run_span.get("events", [])]

    steps = [s for s in spans if s["name"].startswith("step ")]
    attempts = [s for s in spans if s["name"].startswith("attempt ")]
    assert sorted(s["name"] for s in steps) == sorted(
        f"step {sid}" for sid in ("retrieve", "draft", "check", "classify", "polish")
    )
    assert len(attempts) == attempts_expected
    step_ids = {s["spanId"] for s in steps}
    for step in steps:
        assert step["parentSpanId"] == run_span["spanId"]
    for attempt in attempts:
        assert attempt["parentSpanId"] in step_ids

    total = math.fsum(float(span_attributes(a).get(n.COST_AMOUNT, 0.0)) for a in attempts)
    assert total == pytest.approx(run.total_cost_usd, rel=1e-9)
    for step in steps:
        attrs = span_attributes(step)
        assert float(attrs[n.STEP_COST_AMOUNT]) == pytest.approx(run.cost_by_step[attrs[n.STEP_ID]], rel=1e-9)

    retrieve_attempts = [span_attributes(a) for a in by_name["attempt retrieve"]]
    failed = [a for a in retrieve_attempts if a.get(n.ERROR_TYPE)]
    assert len(failed) == 2 and all(a[n.FAILURE_CLASS] == "recoverable" for a in failed)
    [check_step] = by_name["step check"]
    check_attrs = span_attributes(check_step)
    assert check_attrs[n.FALLBACK_TO_MODEL] == "gpt-4o-mini"
    assert check_attrs[n.FALLBACK_REASON] == "budget_threshold"
    [classify_attempt] = by_name["attempt classify"]
    assert span_attributes(classify_attempt)[n.COST_UNPRICED] is True
    [polish_step] = by_name["step polish"]
    assert n.EVENT_BUDGET_EXCEEDED in [e["name"] for e in polish_step.get("events", [])]


def _sum(stack: E2EStack, promql: str) -> float:
    result = stack.query(promql)
    return math.fsum(float(series["value"][1]) for series in result)


def test_prometheus_cost_and_tokens_equal_the_results(stack: E2EStack, workload: Workload) -> None:
    runs = (workload.breach_run, workload.invalid_run)
    selector = f'job="{workload.service}",stroma_workflow_name="{WORKFLOW}"'
    expected_cost = math.fsum(r.total_cost_usd for r in runs)
    expected_in = sum(r.input_tokens for r in runs)
    expected_out = sum(r.output_tokens for r in runs)

    def settled() -> bool:
        return _sum(stack, f"sum(stroma_cost_total{{{selector}}})") == pytest.approx(expected_cost, rel=1e-9)

    wait_until(settled, 30.0, "the run's cost in Prometheus")
    time.sleep(2.5)  # two more export (1 s) and scrape (1 s) cycles: the value must hold
    assert _sum(stack, f"sum(stroma_cost_total{{{selector}}})") == pytest.approx(expected_cost, rel=1e-9)
    assert _sum(stack, f"sum(stroma_usage_input_tokens_total{{{selector}}})") == expected_in
    assert _sum(stack, f"sum(stroma_usage_output_tokens_total{{{selector}}})") == expected_out
    for step_id, cost in workload.breach_run.cost_by_step.items():
        got = _sum(stack, f'sum(stroma_cost_total{{{selector},stroma_step_id="{step_id}"}})')
        assert got == pytest.approx(cost, rel=1e-9, abs=1e-15), step_id
    assert _sum(stack, f"sum(stroma_budget_breaches_total{{{selector}}})") == 1
    assert _sum(stack, f'sum(stroma_step_retries_total{{{selector},stroma_step_id="retrieve"}})') == 2
    # only "check" asked for the preferred model once the threshold was crossed
    assert _sum(stack, f'sum(stroma_fallbacks_total{{{selector},stroma_fallback_reason="budget_threshold"}})') == 1
    assert _sum(stack, f'sum(stroma_cost_unpriced_total{{{selector},stroma_model="acme-local-7b"}})') == 1
    assert _sum(stack, f'sum(stroma_contract_violations_total{{{selector},stroma_contract_direction="output"}})') == 1
    assert _sum(stack, f"sum(stroma_runs_total{{{selector}}})") == 2


def test_budget_breach_reaches_the_webhook(alert_webhook: AlertWebhook, workload: Workload) -> None:
    def ours(alert: dict[str, Any]) -> bool:
        labels = alert.get("labels", {})
        return (
            labels.get("alertname") == "StromaBudgetBreached"
            and labels.get("stroma_workflow_name") == WORKFLOW
            and labels.get("job") == workload.service
        )

    remaining = 30.0 - (time.monotonic() - workload.finished_at)
    alert = alert_webhook.wait_for_alert(ours, timeout=max(remaining, 0.5))
    assert alert["status"] == "firing"
    assert alert["labels"]["stroma_budget_dimension"] == "cost"
    assert WORKFLOW in " ".join(alert.get("annotations", {}).values())


def test_every_metric_name_used_by_rules_and_dashboards_exists(stack: E2EStack, workload: Workload) -> None:
    wait_until(lambda: stack.query(f'stroma_runs_total{{job="{workload.service}"}}'), 30.0, "the workload's metrics")
    known = stack.series_names("stroma_")
    used: set[str] = set()
    for _, expr in rule_expressions():
        used |= metric_names(expr)
    for query in dashboard_queries():
        used |= metric_names(query.expr)
    used = {name for name in used if name.startswith("stroma_")}
    assert used, "no metric names found in rules and dashboards"
    assert used <= known, f"names used but not in Prometheus: {sorted(used - known)}"


def test_every_dashboard_query_returns_data(stack: E2EStack, alert_webhook: AlertWebhook, workload: Workload) -> None:
    wait_until(
        lambda: any(a.get("labels", {}).get("alertname") == "StromaBudgetBreached" for a in alert_webhook.alerts()),
        30.0,
        "the breach alert (the firing-alerts panel needs one)",
    )
    empty = []
    for query in dashboard_queries():
        if not stack.query(query.expr):
            empty.append(f"{query.title}: {query.expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
