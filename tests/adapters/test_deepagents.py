"""A real DeepAgents agent (a compiled LangGraph graph) through Stroma's LangGraph adapter, with a
scripted chat model: each model call and each tool call is a step, usage and cost are counted
once per model call, the budget stops the agent before a model call, the span tree is
run → step → attempt, and the agent DeepAgents compiled is left as it was."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from example_modules import example_module

from stroma import ContractRegistry, ExecutionBudget, ReliabilityContext, RunConfig, RunStatus, pricing
from stroma.errors import ConfigurationError
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytest.importorskip("deepagents")

from stroma.adapters.langgraph import arun_graph, reliable_graph, run_graph

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "deep_agent.py"
QUESTION = {"messages": [("user", "Where are my orders A-17 and B-22?")]}
ANSWER = "A-17 ships tomorrow; B-22 was delivered on Monday."


@pytest.fixture(scope="module")
def example() -> Iterator[Any]:
    with example_module("deep_agent.py", "deep_agent_example") as module:
        yield module


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def new_ctx(capture: TelemetryCapture | None = None, **config: Any) -> ReliabilityContext:
    if capture is not None:
        config.setdefault("telemetry", capture.settings)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


def test_each_model_call_is_a_step_charged_once(example: Any, capture: TelemetryCapture) -> None:
    ctx = new_ctx(capture)
    result = run_graph(example.build(), QUESTION, ctx)
    assert result.status is RunStatus.COMPLETED
    assert result.final_state["messages"][-1].content == ANSWER
    # every scripted reply once: (900+1100+1300) in, (40+30+20) out
    assert (result.input_tokens, result.output_tokens) == (3300, 90)
    assert result.total_cost_usd == pytest.approx(pricing.cost_usd("gpt-4o-mini", 3300, 90)[0])
    assert [e.node_id for e in result.trace] == ["model", "tools", "model", "tools", "tools", "model"]
    # the two order lookups of one model reply are two tool steps, the plan tool is one
    tool_messages = [m for m in result.final_state["messages"] if type(m).__name__ == "ToolMessage"]
    assert sorted(str(m.content) for m in tool_messages if m.name == "order_status") == [
        "delivered on Monday",
        "ships tomorrow",
    ]
    # the span tree: run → six steps → one attempt each; tokens on the model steps only
    (run,) = capture.spans_named("run")
    steps = capture.spans_named("step")
    assert len(steps) == 6
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in steps)
    for step in steps:
        (attempt,) = capture.children(step)
        assert attempt.name.startswith("attempt")
    model_tokens = sorted(
        s.attributes.get(n.STEP_USAGE_INPUT_TOKENS, 0) for s in steps if s.attributes[n.STEP_ID] == "model"
    )
    assert model_tokens == [900, 1100, 1300]
    assert capture.metric_total(n.METRIC_INPUT_TOKENS) == 3300
    assert capture.metric_total(n.METRIC_OUTPUT_TOKENS) == 90


def test_budget_stops_the_agent_before_a_model_call(example: Any) -> None:
    ctx = new_ctx(budget=ExecutionBudget(max_tokens_total=2000))
    result = run_graph(example.build(), QUESTION, ctx)
    # 940 then 1,130 tokens: the third model call would start at 2,070 >= 2,000 and is not made
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "model"
    assert result.total_tokens == 2070
    assert ctx.breaches and ctx.breaches[0].dimension == "tokens"


async def test_async_invoke(example: Any) -> None:
    result = await arun_graph(example.build(), QUESTION, new_ctx())
    assert result.status is RunStatus.COMPLETED
    assert result.total_tokens == 3390


def test_human_approval_interrupt_then_resume_charges_each_model_call_once(example: Any) -> None:
    from deepagents import create_deep_agent
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    model = example.ScriptedChatModel(messages=iter(example.script()))
    agent = create_deep_agent(
        model=model, tools=[example.order_status], interrupt_on={"order_status": True}, checkpointer=InMemorySaver()
    )
    graph = reliable_graph(agent)  # every node, the approval middleware's too
    waiting = run_graph(graph, QUESTION, new_ctx())
    assert waiting.status is RunStatus.PARTIAL and "interrupt" in (waiting.error or "")
    (pending,) = waiting.final_state["__interrupt__"]
    assert [a["args"]["order_id"] for a in pending.value["action_requests"]] == ["A-17", "B-22"]
    assert waiting.total_tokens == 940 + 1130  # the two model calls before the approval
    approve = Command(resume={"decisions": [{"type": "approve"}, {"type": "approve"}]})
    thread = {"configurable": {"thread_id": waiting.run_id}}
    resumed = run_graph(graph, approve, new_ctx(), config=thread)
    assert resumed.status is RunStatus.COMPLETED
    assert resumed.final_state["messages"][-1].content == ANSWER
    assert resumed.total_tokens == 1320  # only the answer: no model call is charged twice
    assert [e.node_id for e in resumed.trace].count("tools") == 2


def test_the_compiled_agent_is_left_unchanged(example: Any) -> None:
    from deepagents import create_deep_agent

    model = example.ScriptedChatModel(messages=iter(example.script()))
    agent = create_deep_agent(model=model, tools=[example.order_status])
    wrapped = reliable_graph(agent, nodes=["model", "tools"])
    assert wrapped is not agent and wrapped.config["recursion_limit"] == agent.config["recursion_limit"]
    # the original still runs as plain LangGraph, with no Stroma context
    out = agent.invoke(QUESTION)
    assert out["messages"][-1].content == ANSWER
    with pytest.raises(ConfigurationError, match="compiled StateGraph"):
        reliable_graph(agent.builder)


def test_the_example_prints_its_tree() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STROMA_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, _, shown = done.stdout.partition("\n")
    assert first == f"COMPLETED | {ANSWER}"
    assert re.search(r"usage\s+\$0\.00055, 3,390 tokens \(3,300 in, 90 out\)", shown)
    assert len(re.findall(r"✓ model ", shown)) == 3 and len(re.findall(r"✓ tools ", shown)) == 3
