"""Pydantic AI's own instrumentation, no Stroma capability: the agent's chat spans under the
attempt are charged to it (the issue's first report: 61 input tokens seen, 0 recorded), including
the requests of an output-validation retry; totals equal the agent's own usage."""

from __future__ import annotations

from typing import Any

import pytest
from genai_support import run_ctx

from stroma import RunStatus, execute_step
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytest.importorskip("pydantic_ai")

from pydantic import BaseModel
from pydantic_ai import Agent, ModelRetry
from pydantic_ai.capabilities.instrumentation import Instrumentation
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.usage import RequestUsage


class Rating(BaseModel):
    score: int


def rating_agent(capture: TelemetryCapture) -> Agent[None, Rating]:
    """An instrumented agent whose first answer fails output validation: two model calls,
    61 + 122 input tokens and 5 + 5 output tokens."""
    calls = 0

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        calls += 1
        args = {"score": -1 if calls == 1 else 4}
        return ModelResponse(
            parts=[ToolCallPart(info.output_tools[0].name, args)],
            usage=RequestUsage(input_tokens=61 * calls, output_tokens=5),
            model_name="gpt-4o-mini",
        )

    agent = Agent(
        FunctionModel(model, model_name="gpt-4o-mini"),
        output_type=Rating,
        capabilities=[Instrumentation(settings=InstrumentationSettings(tracer_provider=capture.tracer_provider))],
    )

    @agent.output_validator
    def positive(rating: Rating) -> Rating:
        if rating.score < 0:
            raise ModelRetry("positive please")
        return rating

    return agent


async def test_instrumented_agent_usage_comes_from_its_spans(capture: TelemetryCapture) -> None:
    agent = rating_agent(capture)

    ctx = run_ctx(capture)
    seen: list[Any] = []

    async def rate(prompt: str) -> Rating:
        result = await agent.run(prompt)
        seen.append(result.usage)
        return result.output

    result = await execute_step("rate", rate, "rate this", ctx)
    assert result.status is RunStatus.COMPLETED
    usage = seen[0]
    assert (result.input_tokens, result.output_tokens) == (usage.input_tokens, usage.output_tokens) == (183, 10)
    (attempt,) = capture.spans_named("attempt")
    assert attempt.attributes[n.USAGE_SOURCE] == "spans"
    assert len([e for e in attempt.events if e.name == n.EVENT_MODEL_CALL]) == 2
    assert capture.metric_total(n.METRIC_INPUT_TOKENS, stroma_step_id="rate") == 183


@pytest.mark.parametrize(
    ("usage_source", "counted_from"),
    [("auto", n.USAGE_SOURCE_EXPLICIT), ("explicit", n.USAGE_SOURCE_EXPLICIT), ("spans", n.USAGE_SOURCE_SPANS)],
)
async def test_capability_and_instrumentation_together_count_each_call_once(
    capture: TelemetryCapture, usage_source: str, counted_from: str
) -> None:
    """Stroma's capability reports each response and Pydantic AI's instrumentation makes a chat
    span for it: whichever source wins for the attempt, each model call is counted once."""
    import dataclasses

    from stroma.adapters.pydantic_ai import run_agent

    agent = rating_agent(capture)

    settings = dataclasses.replace(capture.settings, usage_source=usage_source)
    ctx = run_ctx(capture, telemetry=settings)
    result = await run_agent(agent, "rate this", ctx, step_id="rate")
    assert result.status is RunStatus.COMPLETED  # two calls: 61 + 122 input tokens
    assert (result.input_tokens, result.output_tokens) == (61 + 122, 10)
    (attempt,) = capture.spans_named("attempt")
    assert len([s for s in capture.spans() if s.name.startswith("chat")]) == 2  # the instrumentation ran
    assert attempt.attributes[n.USAGE_SOURCE] == counted_from
    assert capture.metric_total(n.METRIC_INPUT_TOKENS, stroma_step_id="rate") == 183
    assert capture.metric_total(n.METRIC_OUTPUT_TOKENS, stroma_step_id="rate") == 10
