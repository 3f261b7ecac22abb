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


async def test_instrumented_agent_usage_comes_from_its_spans(capture: TelemetryCapture) -> None:
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
