"""The OpenAI Agents SDK adapter with a scripted model (no network): usage per model call, the
budget checked before each call, tool calls as events on the attempt span."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from example_modules import example_module

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    pricing,
)
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytest.importorskip("agents")

from agents import Agent, Model, ModelResponse, Usage, function_tool, set_tracing_disabled
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseUsage,
)
from openai.types.responses.response_usage import InputTokensDetails, OutputTokensDetails

from stroma.adapters.openai_agents import EVENT_TOOL_CALL, run_agent, run_agent_streamed

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=1, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


@pytest.fixture(autouse=True)
def no_sdk_tracing() -> Iterator[None]:
    set_tracing_disabled(True)  # the SDK's own tracing would export to OpenAI
    yield


def text(value: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id="msg",
        content=[ResponseOutputText(text=value, type="output_text", annotations=[])],
        role="assistant",
        status="completed",
        type="message",
    )


def tool_call(name: str, n: int) -> ResponseFunctionToolCall:
    return ResponseFunctionToolCall(
        arguments='{"q": "x"}', call_id=f"call-{n}", name=name, type="function_call", id=f"fc-{n}", status="completed"
    )


class ScriptedModel(Model):
    """Answers from a script: each item is output items, or an exception to raise."""

    def __init__(self, *script: Any, tokens: tuple[int, int] = (100, 20), model: str | None = None) -> None:
        self.model = model  # the name Stroma prices with, as OpenAI's model classes carry it
        self.script = list(script)
        self.tokens = tokens
        self.calls = 0
        self.streamed = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        step = self.script.pop(0) if self.script else [text("done")]
        if isinstance(step, Exception):
            raise step
        usage = Usage(requests=1, input_tokens=self.tokens[0], output_tokens=self.tokens[1])
        usage.total_tokens = sum(self.tokens)
        return ModelResponse(output=step, usage=usage, response_id=None)

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """The same script as a stream: the output items as they finish, then the completed
        response with its usage (what the Responses API streams)."""
        self.calls += 1
        self.streamed += 1
        step = self.script.pop(0) if self.script else [text("done")]
        if isinstance(step, Exception):
            raise step
        for index, item in enumerate(step):
            yield ResponseOutputItemDoneEvent(
                item=item, output_index=index, sequence_number=index, type="response.output_item.done"
            )
        usage = ResponseUsage(
            input_tokens=self.tokens[0],
            output_tokens=self.tokens[1],
            total_tokens=sum(self.tokens),
            input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        )
        done = Response(
            id=f"resp-{self.calls}",
            created_at=0,
            model=self.model or "scripted",
            object="response",
            output=step,
            tool_choice="auto",
            tools=[],
            parallel_tool_calls=True,
            usage=usage,
        )
        yield ResponseCompletedEvent(response=done, sequence_number=len(step), type="response.completed")


@function_tool
def lookup(q: str) -> str:
    """Look something up."""
    return f"found {q}"


def new_ctx(capture: TelemetryCapture | None = None, **config: Any) -> ReliabilityContext:
    if capture is not None:
        config.setdefault("telemetry", capture.settings)
    config.setdefault("policy_map", FAST)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


async def test_usage_per_call_and_tool_calls_as_events(capture: TelemetryCapture) -> None:
    model = ScriptedModel([tool_call("lookup", 1)], [text("the answer")])
    agent = Agent(name="support", model=model, tools=[lookup])
    ctx = new_ctx(capture)
    result = await run_agent(agent, "question", ctx, step_id="support")
    assert result.status is RunStatus.COMPLETED and result.final_state == "the answer"
    assert model.calls == 2
    assert (result.input_tokens, result.output_tokens) == (200, 40)
    (attempt,) = capture.spans_named("attempt")
    phases = [dict(e.attributes or {}) for e in attempt.events if e.name == EVENT_TOOL_CALL]
    assert [(p["gen_ai.tool.name"], p["stroma.tool_call.phase"]) for p in phases] == [
        ("lookup", "start"),
        ("lookup", "end"),
    ]


async def test_priced_with_the_model_name_and_unpriced_without_one() -> None:
    named = Agent(name="a", model=ScriptedModel([text("hi")], tokens=(1000, 100), model="gpt-4o-mini"))
    result = await run_agent(named, "q", new_ctx(), step_id="a")
    assert result.total_tokens == 1100
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 1000, 100)[0])
    anonymous = Agent(name="b", model=ScriptedModel([text("hi")]))
    result = await run_agent(anonymous, "q", new_ctx(), step_id="b")
    assert result.total_tokens == 120
    assert result.unpriced_models  # never silently $0


async def test_budget_is_checked_before_each_model_call() -> None:
    model = ScriptedModel(*[[tool_call("lookup", i)] for i in range(10)])
    agent = Agent(name="loop", model=model, tools=[lookup])
    ctx = new_ctx(budget=ExecutionBudget(max_tokens_total=300))
    result = await run_agent(agent, "go", ctx, step_id="loop")
    assert model.calls == 3  # 120 tokens each: the fourth call would start at 360 >= 300
    assert result.status is RunStatus.PARTIAL
    assert result.total_tokens == 360
    assert ctx.breaches[0].dimension == "tokens"


async def test_a_failed_run_is_retried_and_its_usage_charged() -> None:
    model = ScriptedModel([tool_call("lookup", 1)], ConnectionError("api down"), [text("ok")])
    agent = Agent(name="flaky", model=model, tools=[lookup])
    ctx = new_ctx()
    result = await run_agent(agent, "go", ctx, step_id="flaky")
    assert result.status is RunStatus.COMPLETED and result.final_state == "ok"
    assert [e.attempt for e in result.trace] == [1, 2]
    assert result.total_tokens == 240  # the first run's call before it failed, and the retry's


async def test_streamed_run_usage_per_call_tool_events_and_events_handed_on(capture: TelemetryCapture) -> None:
    model = ScriptedModel([tool_call("lookup", 1)], [tool_call("lookup", 2)], [text("the answer")], model="gpt-4o-mini")
    agent = Agent(name="support", model=model, tools=[lookup])
    ctx = new_ctx(capture)
    seen: list[str] = []

    async def on_event(event: Any) -> None:
        seen.append(getattr(getattr(event, "item", None), "type", None) or event.type)

    result = await run_agent_streamed(agent, "question", ctx, step_id="support", on_event=on_event)
    assert result.status is RunStatus.COMPLETED and result.final_state == "the answer"
    assert model.streamed == 3  # every call went through stream_response
    assert (result.input_tokens, result.output_tokens) == (300, 60)
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 300, 60)[0])
    assert seen.count("tool_call_item") == 2 and seen.count("tool_call_output_item") == 2
    (attempt,) = capture.spans_named("attempt")
    phases = [dict(e.attributes or {})["stroma.tool_call.phase"] for e in attempt.events if e.name == EVENT_TOOL_CALL]
    assert phases == ["start", "end", "start", "end"]
    assert capture.metric_total(n.METRIC_INPUT_TOKENS, stroma_step_id="support") == 300


async def test_streamed_run_budget_is_checked_before_each_model_call() -> None:
    model = ScriptedModel(*[[tool_call("lookup", i)] for i in range(10)])
    agent = Agent(name="loop", model=model, tools=[lookup])
    ctx = new_ctx(budget=ExecutionBudget(max_tokens_total=300))
    result = await run_agent_streamed(agent, "go", ctx, step_id="loop")
    assert model.streamed == 3  # 120 tokens each: the fourth call would start at 360 >= 300
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "loop"
    assert result.total_tokens == 360
    assert ctx.breaches[0].dimension == "tokens"


async def test_streamed_run_that_fails_is_retried_and_charged() -> None:
    model = ScriptedModel([tool_call("lookup", 1)], ConnectionError("api down"), [text("ok")])
    agent = Agent(name="flaky", model=model, tools=[lookup])
    events = 0

    def count(event: Any) -> None:
        nonlocal events
        events += 1

    result = await run_agent_streamed(agent, "go", new_ctx(), step_id="flaky", on_event=count)
    assert result.status is RunStatus.COMPLETED and result.final_state == "ok"
    assert [e.attempt for e in result.trace] == [1, 2]
    assert result.total_tokens == 240
    assert events > 0


async def test_an_event_handler_that_raises_cancels_the_streamed_run() -> None:
    model = ScriptedModel(*[[tool_call("lookup", i)] for i in range(10)])
    agent = Agent(name="loop", model=model, tools=[lookup])

    def refuse(event: Any) -> None:
        if getattr(event, "name", None) == "tool_called":
            raise PermissionError("the UI refused the tool call")

    result = await run_agent_streamed(agent, "go", new_ctx(), step_id="loop", on_event=refuse)
    assert result.status is RunStatus.FAILED
    assert "PermissionError" in (result.error or "")
    assert model.streamed == 1  # cancelled: no further model call
    assert result.total_tokens == 120


async def test_the_offline_example() -> None:
    with example_module("openai_agents_support.py", "openai_agents_example") as module:
        result = await module.main()
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == "Order A-17 ships tomorrow."
    assert result.total_tokens == 2 * 980
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 1800, 160)[0])
