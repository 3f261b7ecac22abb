"""The Pydantic AI adapter with FunctionModel / TestModel: usage of every response (retried
ones too), the budget checked before each model request, fallback expressed once."""

from __future__ import annotations

from typing import Any

import pytest
from example_modules import example_module

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    pricing,
)
from stroma.errors import ConfigurationError

pytest.importorskip("pydantic_ai")

from pydantic import BaseModel
from pydantic_ai import Agent, ModelRetry
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

from stroma.adapters.pydantic_ai import StromaCapability, run_agent

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


def new_ctx(**config: Any) -> ReliabilityContext:
    config.setdefault("policy_map", FAST)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


def response(*parts: Any, tokens: tuple[int, int] = (60, 40)) -> ModelResponse:
    return ModelResponse(
        parts=list(parts),
        usage=RequestUsage(input_tokens=tokens[0], output_tokens=tokens[1]),
        model_name="gpt-4o-mini",
    )


async def test_budget_stops_the_agent_before_its_fourth_request() -> None:
    requests = 0

    def always_tool(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal requests
        requests += 1
        return response(ToolCallPart("lookup", {"q": str(requests)}))  # never finishes on its own

    agent = Agent(FunctionModel(always_tool))

    @agent.tool_plain
    def lookup(q: str) -> str:
        return f"result {q}"

    ctx = new_ctx(budget=ExecutionBudget(max_tokens_total=250))
    result = await run_agent(agent, "find it", ctx, step_id="research")
    assert requests == 3  # 100 tokens each: the fourth would start at 300 >= 250
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "research"
    assert result.total_tokens == 300  # the three responses, charged
    assert ctx.breaches and ctx.breaches[0].dimension == "tokens"


class Answer(BaseModel):
    score: int


async def test_output_validation_retries_inside_the_agent_are_charged() -> None:
    calls = 0

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal calls
        calls += 1
        score = -1 if calls == 1 else 7
        tool = info.output_tools[0].name
        return response(ToolCallPart(tool, {"score": score}), tokens=(100 * calls, 10))

    agent = Agent(FunctionModel(model, model_name="gpt-4o-mini"), output_type=Answer)

    @agent.output_validator
    def positive(output: Answer) -> Answer:
        if output.score < 0:
            raise ModelRetry("score must be positive")
        return output

    ctx = new_ctx()
    result = await run_agent(agent, "rate", ctx, step_id="rate")
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Answer(score=7)
    assert calls == 2
    assert (result.input_tokens, result.output_tokens) == (300, 20)
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 300, 20)[0])


async def test_a_failed_run_is_retried_by_stroma_and_both_runs_are_charged() -> None:
    runs = 0

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return response(TextPart("ok"), tokens=(30, 3))

    agent = Agent(FunctionModel(model))

    @agent.output_validator
    def flaky_backend(output: str) -> str:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectionError("downstream store unreachable")
        return output

    ctx = new_ctx()
    result = await run_agent(agent, "go", ctx, step_id="go")
    assert result.status is RunStatus.COMPLETED
    assert [e.attempt for e in result.trace] == [1, 2]
    assert result.total_tokens == 66  # the failed run's response is paid for too


async def test_pydantic_ai_fallback_model_is_one_step_and_stroma_fallback_is_refused_with_it() -> None:
    from pydantic_ai.exceptions import ModelAPIError

    def down(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelAPIError("primary", "unavailable")

    def backup(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return response(TextPart("from backup"), tokens=(20, 2))

    agent = Agent(FallbackModel(FunctionModel(down), FunctionModel(backup)))
    ctx = new_ctx()
    result = await run_agent(agent, "hi", ctx, step_id="ask")
    assert result.status is RunStatus.COMPLETED and result.final_state == "from backup"
    assert result.total_tokens == 22
    assert len(result.trace) == 1  # Pydantic AI's fallback, inside one attempt

    both = new_ctx(
        model_fallbacks=[
            FallbackPolicy(preferred_model="gpt-4o", fallback_model="gpt-4o-mini", on_failure=["recoverable"])
        ]
    )
    with pytest.raises(ConfigurationError, match="once"):
        await run_agent(agent, "hi", both, step_id="ask")


def two_models(primary: Any, backup: Any) -> dict[str, FunctionModel]:
    return {
        "gpt-4o": FunctionModel(primary, model_name="gpt-4o"),
        "gpt-4o-mini": FunctionModel(backup, model_name="gpt-4o-mini"),
    }


async def test_stroma_fallback_policy_switches_the_agents_model_after_a_failure() -> None:
    from pydantic_ai.exceptions import ModelHTTPError

    from stroma.telemetry import names as n
    from stroma.testing import TelemetryCapture

    asked: list[str] = []

    def primary(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked.append("gpt-4o")
        raise ModelHTTPError(503, "gpt-4o", "overloaded")

    def backup(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        asked.append("gpt-4o-mini")
        return response(TextPart("from backup"), tokens=(400, 40))

    capture = TelemetryCapture()
    try:
        policy = FallbackPolicy("gpt-4o", "gpt-4o-mini", on_failure=["recoverable"])
        ctx = new_ctx(model_fallbacks=[policy], telemetry=capture.settings)
        agent = Agent(name="support")  # the model comes from Stroma's choice, per attempt
        result = await run_agent(agent, "hi", ctx, step_id="ask", model="gpt-4o", models=two_models(primary, backup))
        assert result.status is RunStatus.COMPLETED and result.final_state == "from backup"
        assert asked == ["gpt-4o", "gpt-4o-mini"]  # attempt 1 on the preferred model, attempt 2 on the fallback
        assert [e.attempt for e in result.trace] == [1, 2]
        assert result.total_tokens == 440
        assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 400, 40)[0])
        (step,) = capture.spans_named("step")
        assert step.attributes[n.FALLBACK_FROM_MODEL] == "gpt-4o"
        assert step.attributes[n.FALLBACK_TO_MODEL] == "gpt-4o-mini"
        assert step.attributes[n.FALLBACK_REASON] == n.FALLBACK_REASON_ERROR
    finally:
        capture.shutdown()


async def test_stroma_budget_threshold_fallback_moves_the_next_agent_step_to_the_cheaper_model() -> None:
    used: list[str] = []

    def answering_as(name: str) -> Any:
        def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            used.append(name)
            return ModelResponse(parts=[TextPart("ok")], usage=RequestUsage(input_tokens=1000, output_tokens=100))

        return answer

    models = {name: FunctionModel(answering_as(name), model_name=name) for name in ("gpt-4o", "gpt-4o-mini")}
    # gpt-4o for (1000, 100) costs about $0.0035: more than half of $0.006
    policy = FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.5)
    ctx = new_ctx(model_fallbacks=[policy], budget=ExecutionBudget(max_cost_usd=0.006))
    agent = Agent(name="writer")
    with ctx.as_run():
        first = await run_agent(agent, "draft", ctx, step_id="draft", model="gpt-4o", models=models)
        second = await run_agent(agent, "polish", ctx, step_id="polish", model="gpt-4o", models=models)
    assert first.status is RunStatus.COMPLETED and second.status is RunStatus.COMPLETED
    assert used == ["gpt-4o", "gpt-4o-mini"]
    assert ctx.total_cost == pytest.approx(
        pricing.cost_usd("gpt-4o", 1000, 100)[0] + pricing.cost_usd("gpt-4o-mini", 1000, 100)[0]
    )


async def test_fallback_expressed_twice_or_incompletely_is_refused() -> None:
    def ok(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return response(TextPart("ok"))

    policy = FallbackPolicy("gpt-4o", "gpt-4o-mini", on_failure=["recoverable"])
    agent = Agent(name="a")
    with pytest.raises(ConfigurationError, match="once"):
        await run_agent(
            agent,
            "hi",
            new_ctx(model_fallbacks=[policy]),
            model="gpt-4o",
            models={"gpt-4o": FallbackModel(FunctionModel(ok), FunctionModel(ok)), "gpt-4o-mini": FunctionModel(ok)},
        )
    with pytest.raises(ConfigurationError, match="'gpt-4o-mini', which is not in models"):
        await run_agent(
            agent, "hi", new_ctx(model_fallbacks=[policy]), model="gpt-4o", models={"gpt-4o": FunctionModel(ok)}
        )
    with pytest.raises(ConfigurationError, match="must name one of them"):
        await run_agent(agent, "hi", new_ctx(), model="claude", models={"gpt-4o": FunctionModel(ok)})


async def test_capability_in_a_step_of_ones_own_with_test_model() -> None:
    from stroma import execute_step

    agent = Agent(TestModel(custom_output_text="done"))
    ctx = new_ctx()

    async def step(prompt: str) -> str:
        result = await agent.run(prompt, capabilities=[StromaCapability(ctx, "own")])
        return result.output

    result = await execute_step("own", step, "hello", ctx)
    assert result.final_state == "done"
    assert result.total_tokens > 0  # TestModel reports usage; it reached the attempt


async def test_the_offline_example() -> None:
    with example_module("pydantic_ai_agent.py", "pydantic_ai_agent_example") as module:
        result = await module.main()
    assert result.status is RunStatus.PARTIAL
    assert len(module.REQUESTS) == 3  # a rejected answer, then tool calls until the budget stops it
    assert result.total_tokens == 3 * 920
    assert result.budget_exceeded is not None and result.budget_exceeded.dimension == "cost"
