"""Which GenAI spans count: leaf inference spans only, wrappers never; Anthropic (an
instrumentation span around the SDK's own span) and LangChain over OpenAI count each call once."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from genai_support import run_ctx
from opentelemetry.trace import SpanKind

from stroma import execute_step, pricing
from stroma.telemetry import names as n
from stroma.telemetry.runtime import faults
from stroma.testing import TelemetryCapture


def call_attributes(model: str, inp: int, out: int, operation: str = "chat", **extra: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": inp,
        "gen_ai.usage.output_tokens": out,
    }
    attributes.update(extra)
    return attributes


async def test_only_leaf_inference_spans_count(capture: TelemetryCapture) -> None:
    """Spans made with the real SDK tracer the way agent frameworks nest them."""
    tracer = capture.tracer_provider.get_tracer("framework")
    ctx = run_ctx(capture)

    def agent(state: dict[str, Any]) -> str:
        aggregated = {"gen_ai.operation.name": "invoke_agent", "gen_ai.aggregated_usage.input_tokens": 999}
        with tracer.start_as_current_span("invoke_agent a", kind=SpanKind.INTERNAL, attributes=aggregated):
            # a framework's chat span wrapping the client's chat span: one call
            with (
                tracer.start_as_current_span(
                    "chat outer", kind=SpanKind.CLIENT, attributes=call_attributes("gpt-4o", 100, 10)
                ),
                tracer.start_as_current_span("http", kind=SpanKind.CLIENT),
                tracer.start_as_current_span(
                    "chat inner", kind=SpanKind.CLIENT, attributes=call_attributes("gpt-4o", 100, 10)
                ),
            ):
                pass
            # a model call made by a tool counts, its tool span does not
            with (
                tracer.start_as_current_span("execute_tool t", attributes={"gen_ai.operation.name": "execute_tool"}),
                tracer.start_as_current_span(
                    "embeddings",
                    kind=SpanKind.CLIENT,
                    attributes=call_attributes("text-embedding-3-small", 7, 0, "embeddings"),
                ),
            ):
                pass
            # an INTERNAL span with usage attributes is not a model call
            with tracer.start_as_current_span("chat internal", attributes=call_attributes("gpt-4o", 50, 5)):
                pass
        return "done"

    result = await execute_step("agent", agent, {}, ctx)
    assert (result.input_tokens, result.output_tokens) == (107, 10)
    (attempt,) = capture.spans_named("attempt")
    calls = [e for e in attempt.events if e.name == n.EVENT_MODEL_CALL]
    inner = next(s for s in capture.spans() if s.name == "chat inner")
    assert next(c.attributes[n.MODEL_CALL_SPAN_ID] for c in calls) == format(inner.context.span_id, "016x")
    expected = (
        pricing.cost_usd("openai:gpt-4o", 100, 10)[0] + pricing.cost_usd("openai:text-embedding-3-small", 7, 0)[0]
    )
    assert result.total_cost_usd == pytest.approx(expected)


async def test_model_and_provider_fallbacks_and_vendor_cost(capture: TelemetryCapture) -> None:
    tracer = capture.tracer_provider.get_tracer("framework")
    ctx = run_ctx(capture)

    def step(state: dict[str, Any]) -> None:
        # response model wins over the request model; gen_ai.system stands in for the provider
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.response.model": "gpt-4o-mini",
            "gen_ai.usage.input_tokens": 1000,
            "gen_ai.usage.output_tokens": 100,
            "gen_ai.usage.cost": 0.5,
        }
        with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes=attrs):
            pass
        # "unknown" is no model: the usage is unpriced, its tokens still count
        unknown = call_attributes("unknown", 3, 1)
        with tracer.start_as_current_span("chat", kind=SpanKind.CLIENT, attributes=unknown):
            pass

    result = await execute_step("s", step, None, ctx)
    assert (result.input_tokens, result.output_tokens) == (1003, 101)
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("openai:gpt-4o-mini", 1000, 100)[0])
    (attempt,) = capture.spans_named("attempt")
    assert attempt.attributes[n.COST_UNPRICED] is True
    first, second = (e.attributes for e in attempt.events if e.name == n.EVENT_MODEL_CALL)
    assert first["gen_ai.response.model"] == "gpt-4o-mini"
    assert first["gen_ai.provider.name"] == "openai"
    assert first[n.MODEL_CALL_VENDOR_COST] == 0.5
    assert "gen_ai.response.model" not in second
    assert second[n.COST_UNPRICED] is True


async def test_a_span_ending_after_its_attempt_is_not_charged_and_is_reported(
    capture: TelemetryCapture, caplog: pytest.LogCaptureFixture
) -> None:
    tracer = capture.tracer_provider.get_tracer("framework")
    ctx = run_ctx(capture)
    open_spans: list[Any] = []

    def streams(state: None) -> None:
        open_spans.append(tracer.start_span("chat", kind=SpanKind.CLIENT, attributes=call_attributes("gpt-4o", 9, 9)))

    before = faults.counts.get("genai late span", 0)
    with caplog.at_level(logging.WARNING, logger="stroma.telemetry"):
        result = await execute_step("late_step", streams, None, ctx)
        open_spans[0].end()  # the stream is consumed after the step returned
    assert result.total_tokens == 0
    assert faults.counts.get("genai late span", 0) == before + 1
    assert any("late_step" in record.getMessage() for record in caplog.records)


async def test_parallel_steps_get_their_own_calls(capture: TelemetryCapture) -> None:
    import asyncio

    tracer = capture.tracer_provider.get_tracer("framework")
    ctx = run_ctx(capture)

    def step_using(tokens: int) -> Any:
        async def step(state: None) -> None:
            for _ in range(3):
                with tracer.start_as_current_span(
                    "chat", kind=SpanKind.CLIENT, attributes=call_attributes("gpt-4o", tokens, 1)
                ):
                    await asyncio.sleep(0)

        return step

    await asyncio.gather(*(execute_step(f"s{t}", step_using(t), None, ctx) for t in (10, 20)))
    by_step = {s.attributes[n.STEP_ID]: s.attributes[n.USAGE_INPUT_TOKENS] for s in capture.spans_named("attempt")}
    assert by_step == {"s10": 30, "s20": 60}
