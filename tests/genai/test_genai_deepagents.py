"""A deep agent whose sub-agent (started by the ``task`` tool) calls an instrumented OpenAI chat
model: the sub-agent's call is charged to the ``tools`` step from its GenAI span, the parent's
scripted model calls from their messages, each call once, and the totals equal the server's plus
the script's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from example_modules import example_module
from genai_support import FakeAPI, Reply, run_ctx

from stroma import RunStatus
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytest.importorskip("deepagents")
langchain_openai = pytest.importorskip("langchain_openai")

from deepagents import create_deep_agent  # noqa: E402

from stroma.adapters.langgraph import reliable_graph, run_graph  # noqa: E402


@pytest.fixture
def example() -> Iterator[Any]:
    with example_module("deep_agent.py", "deep_agent_example_genai") as module:
        yield module


@pytest.mark.usefixtures("openai_instrumented")
def test_sub_agent_calls_are_charged_to_the_tool_step_from_their_spans(
    api: FakeAPI, capture: TelemetryCapture, example: Any
) -> None:
    api.script(Reply(333, 11, model="gpt-4o-mini-2024-07-18", text="A-17 ships tomorrow."))
    sub_model = langchain_openai.ChatOpenAI(model="gpt-4o-mini", base_url=api.url + "/v1", api_key="k", max_retries=0)
    parent = example.ScriptedChatModel(
        messages=iter(
            [
                example.reply("", (500, 10), ("task", {"description": "find A-17", "subagent_type": "researcher"})),
                example.reply("Your order A-17 ships tomorrow.", (700, 12)),
            ]
        )
    )
    researcher = {
        "name": "researcher",
        "description": "Looks orders up.",
        "system_prompt": "Be brief.",
        "model": sub_model,
    }
    agent = reliable_graph(create_deep_agent(model=parent, subagents=[researcher]), nodes=["model", "tools"])
    ctx = run_ctx(capture)
    result = run_graph(agent, {"messages": [("user", "Where is A-17?")]}, ctx)
    assert result.status is RunStatus.COMPLETED, result.error
    assert api.requests == 1
    assert [e.node_id for e in result.trace] == ["model", "tools", "model"]
    assert (result.input_tokens, result.output_tokens) == (500 + 333 + 700, 10 + 11 + 12)
    tools_step = next(s for s in capture.spans_named("step") if s.attributes[n.STEP_ID] == "tools")
    assert tools_step.attributes[n.STEP_USAGE_INPUT_TOKENS] == 333
    sources = {s.attributes[n.STEP_ID]: s.attributes.get(n.USAGE_SOURCE) for s in capture.spans_named("attempt")}
    assert sources["tools"] == n.USAGE_SOURCE_SPANS
