"""A LangGraph node calling an instrumented LangChain model: usage from its spans, counted once
(not again from the AIMessage's usage_metadata), step and run totals equal the server's."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from genai_support import FakeAPI, Reply, run_ctx
from typing_extensions import TypedDict

from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytest.importorskip("langgraph")
langchain_openai = pytest.importorskip("langchain_openai")

from langgraph.graph import START, StateGraph  # noqa: E402
from langgraph.graph.message import add_messages  # noqa: E402

from stroma.adapters.langgraph import reliable_node, stroma_config  # noqa: E402


class State(TypedDict):
    messages: Annotated[list[Any], add_messages]


@pytest.mark.usefixtures("openai_instrumented", "langchain_instrumented")
def test_node_usage_comes_from_spans_once(api: FakeAPI, capture: TelemetryCapture) -> None:
    api.script(Reply(61, 7, model="gpt-4o-mini-2024-07-18"), Reply(20, 2, model="gpt-4o-mini-2024-07-18"))
    model = langchain_openai.ChatOpenAI(model="gpt-4o-mini", base_url=api.url + "/v1", api_key="k", max_retries=0)

    def chat(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    builder = StateGraph(State)
    builder.add_node("first", reliable_node(chat, step_id="first"))
    builder.add_node("second", reliable_node(chat, step_id="second"))
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    ctx = run_ctx(capture)
    out = builder.compile().invoke({"messages": [("user", "hi")]}, stroma_config(ctx))
    assert len(out["messages"]) == 3
    assert out["messages"][1].usage_metadata["input_tokens"] == 61  # the message has usage too
    assert (ctx.input_tokens, ctx.output_tokens) == (api.input_tokens, api.output_tokens) == (81, 9)
    by_step = {s.attributes[n.STEP_ID]: s.attributes[n.STEP_USAGE_INPUT_TOKENS] for s in capture.spans_named("step")}
    assert by_step == {"first": 61, "second": 20}
    assert {s.attributes.get(n.USAGE_SOURCE) for s in capture.spans_named("attempt")} == {"spans"}
    assert capture.metric_total(n.METRIC_INPUT_TOKENS) == 81
