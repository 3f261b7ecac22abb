"""The run tree and its rendering: one model whether the run comes from the local store or Jaeger."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from pydantic import BaseModel

from stroma import runstore
from stroma.cli.jaeger import otlp_json_to_records
from stroma.cli.progress import ProgressPrinter
from stroma.cli.render import (
    Style,
    build_tree,
    format_budget,
    format_cost,
    format_duration,
    format_usd,
    render_runs_table,
    render_tree,
)
from stroma.contracts import ContractRegistry
from stroma.middleware import ReliabilityContext, execute_step
from stroma.runner import StromaRunner, parallel
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import FakeModel, FakeReply, TelemetryCapture, no_retry_sleep
from stroma.trace import RunStatus


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    text: str


class Tags(BaseModel):
    tags: list[str]


class Flaky(Exception):
    status_code = 503


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture(service_name="render-test")
    yield cap
    cap.shutdown()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[runstore.LocalRunStore]:
    yield runstore.enable_local_store(tmp_path / "runs.sqlite3")
    runstore.disable_local_store()


async def _pipeline(settings: TelemetrySettings, *, budget: float = 1.0) -> Any:
    """fetch (retried once) -> parallel(summarise on a fallback model, tag) under a cost budget."""
    big = FakeModel([FakeReply("s", input_tokens=10_000, output_tokens=500)], default_model="gpt-4o")
    fetch_model = FakeModel(
        [FakeReply(error=Flaky("busy")), FakeReply("d", input_tokens=30_000, output_tokens=200)], default_model="gpt-4o"
    )
    runner = StromaRunner.quick(telemetry=settings, workflow_name="render")
    runner.with_budget(cost_usd=budget).with_model_fallback("gpt-4o", to="gpt-4o-mini", at_budget_pct=0.05)

    @runner.node("fetch", input=Doc, output=Doc)
    async def fetch(doc: Doc) -> Any:
        reply = await fetch_model.complete(doc.text)
        return {"text": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("summarise", input=Doc, output=Summary)
    async def summarise(doc: Doc) -> Any:
        reply = await big.complete(doc.text)
        return {"text": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("tag", input=Doc, output=Tags)
    async def tag(doc: Doc) -> Any:
        return {"tags": ["a"]}

    with no_retry_sleep():
        return await runner.run([fetch, parallel(summarise, tag)], Doc(text="x"), run_id="render-run")


def _otlp_json(capture: TelemetryCapture) -> dict[str, Any]:
    """The captured spans as OTLP JSON, as Jaeger's /api/v3/traces returns them (ids in hex)."""
    document = MessageToDict(encode_spans(capture.spans()))

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(document)
    return {"result": document}


def _comparable(tree: Any) -> dict[str, Any]:
    data = tree.to_dict()
    data.pop("source")
    data.pop("error")
    return data


async def test_local_store_and_jaeger_give_the_same_tree(
    capture: TelemetryCapture, store: runstore.LocalRunStore
) -> None:
    result = await _pipeline(capture.settings)
    assert result.status.value == "COMPLETED"

    stored = store.get_run("render-run")
    local = build_tree(stored.records, summary=stored.summary.to_dict())
    remote = build_tree(otlp_json_to_records(_otlp_json(capture)), source="jaeger")
    assert remote.source == "jaeger"
    assert _comparable(local) == _comparable(remote)

    # And the tree says what happened.
    assert [step.step_id for step in local.steps] == ["fetch", "summarise", "tag"]
    fetch, summarise, tag = local.steps
    assert [a.ok for a in fetch.attempts] == [False, True]
    assert fetch.attempts[0].failure_class == "recoverable" and fetch.attempts[0].error_type
    assert summarise.fallback is not None and summarise.fallback["to_model"] == "gpt-4o-mini"
    assert summarise.model == "gpt-4o-mini"
    assert tag.cost_usd == 0 and tag.total_tokens == 0
    assert local.cost_usd == pytest.approx(result.total_cost_usd)
    assert local.budget.cost_limit == 1.0
    assert local.budget.utilization == pytest.approx(result.total_cost_usd)


async def test_a_breach_shows_in_the_header_and_on_its_step(
    capture: TelemetryCapture, store: runstore.LocalRunStore
) -> None:
    await _pipeline(capture.settings, budget=0.05)
    stored = store.get_run("render-run")
    tree = build_tree(stored.records, summary=stored.summary.to_dict())
    assert tree.status == "partial"
    assert tree.breaches and tree.breaches[0]["dimension"] == "cost"
    text = render_tree(tree, Style(color=False))
    assert "status       PARTIAL — cost budget exceeded at step 'fetch'" in text
    assert "of $0.05 (" in text
    [fetch] = tree.steps
    assert fetch.status == "error" and fetch.breach is not None


async def test_steps_of_a_context_used_without_a_run_span(store: runstore.LocalRunStore) -> None:
    from stroma.config import RunConfig

    ctx = ReliabilityContext.for_run(
        RunConfig(run_id="loose", telemetry=TelemetrySettings(enabled=False)), ContractRegistry(), None
    )

    async def outer(state: dict[str, Any]) -> dict[str, Any]:
        await execute_step("inner", lambda s: {"x": 2}, state, ctx)
        return {"x": 1}

    await execute_step("outer", outer, {"x": 0}, ctx)
    ctx.build_result(RunStatus.COMPLETED, None)

    stored = store.get_run("loose")
    tree = build_tree(stored.records, summary=stored.summary.to_dict())
    # No run span: the steps are top level, in the order they started.
    assert [step.step_id for step in tree.steps] == ["outer", "inner"]
    assert tree.run_id == "loose" and tree.status == "completed"
    assert "└─ ✓ inner" in render_tree(tree)


def test_render_is_plain_unless_colour_is_asked_for() -> None:
    records = [
        {
            "kind": "run",
            "name": "run wf",
            "attributes": {"stroma.run.id": "r", "stroma.run.status": "completed"},
            "events": [],
            "error_type": None,
            "start_ns": 0,
            "end_ns": 2_000_000_000,
            "id": 0,
            "parent": None,
        },
        {
            "kind": "step",
            "name": "step a",
            "attributes": {"stroma.step.id": "a"},
            "events": [],
            "error_type": "X",
            "start_ns": 1,
            "end_ns": 5,
            "id": 1,
            "parent": 0,
        },
        {
            "kind": "attempt",
            "name": "attempt a",
            "attributes": {"stroma.step.attempt.number": 1, "stroma.failure.class": "terminal"},
            "events": [],
            "error_type": "X",
            "start_ns": 1,
            "end_ns": 5,
            "id": 2,
            "parent": 1,
        },
    ]
    tree = build_tree(records)
    plain = render_tree(tree, Style(color=False))
    assert "\x1b[" not in plain
    assert "└─ ✗ a" in plain and "└─ ✗ attempt 1  0 ms  terminal: X" in plain
    coloured = render_tree(tree, Style(color=True))
    assert "\x1b[31m" in coloured and "\x1b[0m" in coloured
    ascii_only = render_tree(tree, Style(color=False, unicode=False))
    assert ascii_only.isascii() and "`- x a" in ascii_only


def test_style_for_a_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert Style.for_stream(Tty()).color is True
    assert Style.for_stream(io.StringIO()).color is False
    assert Style.for_stream(io.StringIO(), "always").color is True
    assert Style.for_stream(Tty(), "never").color is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert Style.for_stream(Tty()).color is False
    latin = io.TextIOWrapper(io.BytesIO(), encoding="latin-1")
    assert Style.for_stream(latin).unicode is False


def test_formats() -> None:
    assert format_cost(0) == "$0"
    assert format_cost(0.0123456) == "$0.0123"
    assert format_cost(0.0000123) == "$0.000012"
    assert format_cost(2.7e-05) == "$0.000027"
    assert format_cost(1234.5) == "$1,234.50"
    assert format_budget(0.12) == "$0.12" and format_budget(0.005) == "$0.005" and format_budget(25) == "$25.00"
    assert format_duration(0.0123) == "12 ms" and format_duration(1.234) == "1.23 s"
    assert format_duration(125) == "2 m 05 s"


@pytest.mark.parametrize("exponent", range(-11, 8))
@pytest.mark.parametrize("mantissa", [1.0, 2.7, 9.99])
def test_money_is_fixed_point_with_two_significant_digits(exponent: int, mantissa: float) -> None:
    usd = mantissa * 10.0**exponent
    text = format_usd(usd)
    assert re.fullmatch(r"\$[0-9]{1,3}(,[0-9]{3})*\.[0-9]{2,12}", text), text  # never 2.7e-05
    assert abs(float(text[1:].replace(",", "")) - usd) <= max(usd * 0.05, 0.005 if usd >= 100 else 0.0)
    # a cost and a limit of the same amount print the same (a run once showed $0.0010 and $0.001)
    assert format_cost(usd) == format_budget(usd) == text


def test_money_edge_cases() -> None:
    assert format_usd(0) == "$0"
    assert format_usd(0.001) == "$0.001" and format_usd(0.0010000000000000002) == "$0.001"
    assert format_usd(1e-13) == "<$0.000000000001"
    assert format_usd(-0.5) == "-$0.50"
    assert format_usd(float("inf")) == "$inf"


async def test_one_limit_prints_one_way_in_a_run(capture: TelemetryCapture, store: runstore.LocalRunStore) -> None:
    await _pipeline(capture.settings, budget=0.001)
    stored = store.get_run("render-run")
    tree = build_tree(stored.records, summary=stored.summary.to_dict())
    assert tree.breaches and tree.breaches[0]["dimension"] == "cost"
    text = render_tree(tree, Style(color=False))
    # the header's breach, the budget line and the step's note all give the limit as $0.001
    assert text.count(" of $0.001") >= 3, text
    assert "$0.0010" not in text
    assert not re.search(r"\$[0-9.,]*e", text), text


def test_runs_table_shortens_only_long_ids(tmp_path: Path) -> None:
    from stroma.telemetry import sinks

    store = runstore.LocalRunStore(tmp_path / "runs.sqlite3")
    for run_id in ("short-id", "0123456789abcdef0123456789abcdef"):
        store(sinks.FinishedRun(run_id, "wf", "completed", 0.5, 10, 5, None, (), {"max_cost_usd": None}))
    table = render_runs_table(store.list_runs())
    lines = table.splitlines()
    assert lines[1].startswith("0123456789ab  ") and lines[2].startswith("short-id  ")
    assert "COMPLETED" in lines[1] and lines[1].rstrip().endswith("15")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_plain_and_live() -> None:
    from stroma.failures import FailureClass

    plain = io.StringIO()
    printer = ProgressPrinter(plain, Style(color=False))
    printer.on_start("r", "draft", {})
    printer.on_failure("r", "draft", Flaky("busy"), FailureClass.RECOVERABLE)
    printer.on_start("r", "draft", {})
    printer.on_success("r", "draft", {}, 1234)
    printer.on_start("r", "check", {})
    printer.finish_open_steps("r", "stopped: cost budget exceeded")
    text = plain.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert "✗ draft" in lines[0] and "Flaky (recoverable)" in lines[0]
    assert "✓ draft" in lines[1] and "1,234 tok" in lines[1]
    assert "✗ check" in lines[2] and "stopped: cost budget exceeded" in lines[2]

    live = _Tty()
    printer = ProgressPrinter(live, Style(color=False))
    assert printer.live
    printer.on_start("r", "draft", {})
    assert live.getvalue().endswith("draft ...")
    printer.on_success("r", "draft", {}, 10)
    assert "\r\x1b[K" in live.getvalue() and live.getvalue().endswith("\n")
