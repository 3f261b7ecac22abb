"""Usage from the official OpenAI instrumentation's spans, against a local fake OpenAI API.

The real ``openai`` client and ``opentelemetry-instrumentation-genai-openai`` run unchanged; the
only stand-in is the HTTP server on 127.0.0.1. Every test compares Stroma's totals with what the
server reported (what a provider would bill).
"""

from __future__ import annotations

import asyncio
from typing import Any

import genai_prices
import pytest
from genai_support import FAST, FakeAPI, Reply, run_ctx

from stroma import ExecutionBudget, RunStatus, execute_step, report_usage
from stroma.telemetry import TelemetrySettings
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("openai_instrumented")

MODEL = "gpt-4o-mini"
SERVED_MODEL = "gpt-4o-mini-2024-07-18"


def client(api: FakeAPI) -> Any:
    return api.client(openai.OpenAI, base_url=api.url + "/v1", api_key="test-key", max_retries=0)


def aclient(api: FakeAPI) -> Any:
    return openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="test-key", max_retries=0)


def ask(api: FakeAPI, text: str = "hi") -> str:
    reply = client(api).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
    return str(reply.choices[0].message.content)


def billed(api: FakeAPI) -> float:
    """What genai-prices says the served calls cost, call by call, with their cache split."""
    total = 0.0
    for served in api.served:
        usage = genai_prices.Usage(
            input_tokens=served.input_tokens,
            output_tokens=served.output_tokens,
            cache_read_tokens=served.cache_read,
        )
        total += float(genai_prices.calc_price(usage, served.model, provider_id="openai").total_price)
    return total


def attempt_events(capture: TelemetryCapture) -> list[list[dict[str, Any]]]:
    return [
        [dict(e.attributes or {}) for e in span.events if e.name == n.EVENT_MODEL_CALL]
        for span in capture.spans_named("attempt")
    ]


async def test_calls_inside_a_step_are_charged_to_it(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(61, 7, model=SERVED_MODEL), Reply(30, 12, model=SERVED_MODEL))
    ctx = run_ctx(capture, workflow_name="wf")

    def summarize(state: dict[str, Any]) -> dict[str, Any]:
        return {"a": ask(api), "b": ask(api)}

    result = await execute_step("summarize", summarize, {}, ctx)
    assert result.status is RunStatus.COMPLETED
    assert (result.input_tokens, result.output_tokens) == (api.input_tokens, api.output_tokens) == (91, 19)
    assert result.total_cost_usd == pytest.approx(billed(api), rel=1e-9)
    assert result.total_cost_usd > 0
    # the step span and the metrics agree with the server
    (step,) = capture.spans_named("step")
    assert step.attributes[n.STEP_USAGE_INPUT_TOKENS] == 91
    assert step.attributes[n.STEP_USAGE_OUTPUT_TOKENS] == 19
    assert capture.metric_total(n.METRIC_INPUT_TOKENS, stroma_step_id="summarize") == 91
    assert capture.metric_total(n.METRIC_OUTPUT_TOKENS, stroma_step_id="summarize") == 19
    assert capture.metric_total(n.METRIC_COST, stroma_step_id="summarize") == pytest.approx(billed(api))
    # the chat spans are children of the attempt span, and listed on it
    (attempt,) = capture.spans_named("attempt")
    chats = [s for s in capture.children(attempt) if s.name.startswith("chat")]
    assert len(chats) == 2
    assert attempt.attributes[n.USAGE_SOURCE] == "spans"
    assert attempt.attributes[n.MODEL] == SERVED_MODEL
    events = attempt_events(capture)[0]
    assert [e["gen_ai.usage.input_tokens"] for e in events] == [61, 30]
    assert {e[n.MODEL_CALL_SPAN_ID] for e in events} == {format(c.context.span_id, "016x") for c in chats}


async def test_async_client_in_an_async_step(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(40, 4, model=SERVED_MODEL), Reply(50, 5, model=SERVED_MODEL))
    ctx = run_ctx(capture)
    llm = aclient(api)

    async def fan_out(state: dict[str, Any]) -> dict[str, Any]:
        replies = await asyncio.gather(
            *(llm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}]) for q in "ab")
        )
        return {"n": len(replies)}

    result = await execute_step("fan_out", fan_out, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (90, 9)
    await llm.close()


async def test_cached_input_is_not_added_and_is_priced_at_the_cache_rate(
    api: FakeAPI, capture: TelemetryCapture
) -> None:
    api.script(Reply(1000, 100, cache_read=800, model=SERVED_MODEL))
    ctx = run_ctx(capture)
    result = await execute_step("s", lambda state: ask(api), {}, ctx)
    assert result.input_tokens == 1000  # not 1800: input already includes the cached tokens
    expected = billed(api)
    uncached = float(
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1000, output_tokens=100), SERVED_MODEL, provider_id="openai"
        ).total_price
    )
    assert expected < uncached  # the cache split matters for this model
    assert result.total_cost_usd == pytest.approx(expected, rel=1e-9)
    (event,) = attempt_events(capture)[0]
    assert event["gen_ai.usage.cache_read.input_tokens"] == 800


async def test_calls_in_failed_attempts_are_charged(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(20, 2, model=SERVED_MODEL), Reply(status=500), Reply(25, 3, model=SERVED_MODEL))
    ctx = run_ctx(capture)
    calls = 0

    def flaky(state: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        first = ask(api)  # attempt 1: billed, then the second call fails with HTTP 500
        if calls == 1:
            ask(api)
        return {"text": first}

    result = await execute_step("flaky", flaky, {}, ctx)
    assert result.status is RunStatus.COMPLETED
    assert calls == 2
    assert (result.input_tokens, result.output_tokens) == (45, 5) == (api.input_tokens, api.output_tokens)
    first, second = capture.spans_named("attempt")
    assert first.attributes[n.USAGE_INPUT_TOKENS] == 20
    assert first.attributes[n.FAILURE_CLASS]
    assert second.attributes[n.USAGE_INPUT_TOKENS] == 25
    assert result.total_cost_usd == pytest.approx(billed(api), rel=1e-9)


async def test_usage_the_step_reports_wins_by_default(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(61, 7, model=SERVED_MODEL))
    ctx = run_ctx(capture)

    def reports(state: dict[str, Any]) -> Any:
        ask(api)
        return {"ok": True}, 61, 7, MODEL

    result = await execute_step("s", reports, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (61, 7)  # once, not twice
    (attempt,) = capture.spans_named("attempt")
    assert attempt.attributes[n.USAGE_SOURCE] == "explicit"
    assert len(attempt_events(capture)[0]) == 1  # the call is still listed


@pytest.mark.parametrize(
    ("source", "expected"),
    [("auto", (5, 1)), ("explicit", (5, 1)), ("spans", (61, 7))],
)
async def test_usage_source_setting(
    api: FakeAPI, capture: TelemetryCapture, source: str, expected: tuple[int, int]
) -> None:
    api.script(Reply(61, 7, model=SERVED_MODEL))
    settings = TelemetrySettings(
        enabled=True,
        tracer_provider=capture.tracer_provider,
        meter_provider=capture.meter_provider,
        usage_source=source,
    )
    ctx = run_ctx(capture, telemetry=settings)

    def partial_report(state: dict[str, Any]) -> Any:
        ask(api)
        report_usage(5, 1, MODEL)  # a hand count that missed most of the call
        return {"ok": True}

    result = await execute_step("s", partial_report, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == expected


async def test_explicit_source_never_charges_spans(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(61, 7, model=SERVED_MODEL))
    settings = TelemetrySettings(
        enabled=True,
        tracer_provider=capture.tracer_provider,
        meter_provider=capture.meter_provider,
        usage_source="explicit",
    )
    ctx = run_ctx(capture, telemetry=settings)
    result = await execute_step("s", lambda state: ask(api), {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (0, 0)


async def test_budget_sees_calls_inside_a_step_before_the_next_step(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(400, 100, model=SERVED_MODEL), Reply(400, 100, model=SERVED_MODEL))
    ctx = run_ctx(capture, budget=ExecutionBudget(max_tokens_total=600))
    result = await execute_step("first", lambda state: [ask(api), ask(api)], {}, ctx)
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "first"
    assert result.total_tokens == 1000
    assert ctx.breaches and ctx.breaches[0].dimension == "tokens"
    requests = api.requests
    after = await execute_step("second", lambda state: ask(api), {}, ctx)
    assert after.status is RunStatus.PARTIAL  # blocked before it calls the model
    assert api.requests == requests


async def test_embeddings_are_counted(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(12, 0, model="text-embedding-3-small"))
    ctx = run_ctx(capture)

    def embed(state: dict[str, Any]) -> int:
        client(api).embeddings.create(model="text-embedding-3-small", input="hello")
        return 1

    result = await execute_step("embed", embed, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (12, 0)
    assert result.total_cost_usd > 0


async def test_calls_outside_a_step_are_not_charged(api: FakeAPI, capture: TelemetryCapture) -> None:
    ctx = run_ctx(capture)
    ask(api)  # before the step: no attempt is running
    result = await execute_step("s", lambda state: state, {"x": 1}, ctx)
    assert result.total_tokens == 0


async def test_to_thread_copies_the_context(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(33, 3, model=SERVED_MODEL))
    ctx = run_ctx(capture)

    async def threaded(state: dict[str, Any]) -> str:
        return await asyncio.to_thread(ask, api)

    result = await execute_step("s", threaded, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (33, 3)


async def test_stroma_show_lists_the_model_calls_under_their_attempt(api: FakeAPI, capture: TelemetryCapture) -> None:
    from pydantic import BaseModel

    from stroma import StromaRunner
    from stroma.cli.render import Style, render_tree
    from stroma.cli.tree import build_tree
    from stroma.runstore import records_to_dicts
    from stroma.telemetry import sinks

    class Q(BaseModel):
        text: str

    api.script(Reply(61, 7, model=SERVED_MODEL), Reply(status=500), Reply(30, 3, model=SERVED_MODEL))
    finished: list[sinks.FinishedRun] = []
    sinks.add_run_sink(finished.append)
    try:
        runner = StromaRunner.quick(telemetry=capture.settings, policy_map=FAST)
        calls = 0

        @runner.node("answer", input=Q, output=Q)
        def answer(q: Q) -> Q:
            nonlocal calls
            calls += 1
            text = ask(api)
            if calls == 1:
                ask(api)  # HTTP 500: the attempt fails after one billed call
            return Q(text=text)

        result = await runner.run([answer], Q(text="hi"))
    finally:
        sinks.remove_run_sink(finished.append)
    assert result.status is RunStatus.COMPLETED
    assert result.total_tokens == api.input_tokens + api.output_tokens == 101
    tree = build_tree(records_to_dicts(finished[-1].records), run_id=result.run_id)
    text = render_tree(tree, Style(color=False, unicode=False))
    lines = [line for line in text.splitlines() if "model call" in line]
    assert len(lines) == 3, text  # attempt 1: a billed call and a failed one; attempt 2: one call
    assert SERVED_MODEL in lines[0] and "68 tok" in lines[0]
    assert "InternalServerError" in lines[1]
    assert SERVED_MODEL in lines[2] and "33 tok" in lines[2]
    attempt_lines = [line for line in text.splitlines() if "attempt 1" in line]
    assert SERVED_MODEL in attempt_lines[0]
