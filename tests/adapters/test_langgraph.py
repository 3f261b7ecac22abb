"""The LangGraph adapter on real LangGraph 1.x graphs: every rule of issue 10, part 2."""

from __future__ import annotations

import asyncio
import inspect
import operator
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
)
from stroma.errors import ConfigurationError
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

langgraph = pytest.importorskip("langgraph")

from langchain_core.messages import AIMessage, HumanMessage  # noqa: E402
from langchain_core.runnables import RunnableConfig  # noqa: E402
from langgraph.checkpoint.memory import InMemorySaver  # noqa: E402
from langgraph.config import get_stream_writer  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from langgraph.graph.message import add_messages  # noqa: E402
from langgraph.runtime import Runtime  # noqa: E402
from langgraph.types import Command, RetryPolicy, StreamWriter, interrupt  # noqa: E402

from stroma.adapters.langgraph import (  # noqa: E402
    LangGraphAdapter,
    StepNotCompleted,
    reliable_node,
    stroma_config,
    stroma_langgraph_node,
)

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


class State(TypedDict, total=False):
    items: Annotated[list[str], operator.add]
    messages: Annotated[list[Any], add_messages]
    note: str


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def new_ctx(capture: TelemetryCapture | None = None, **config: Any) -> ReliabilityContext:
    if capture is not None:
        config.setdefault("telemetry", capture.settings)
    config.setdefault("policy_map", FAST)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


def steps_of(ctx: ReliabilityContext) -> list[str]:
    return [event.node_id for event in ctx.trace]


def test_partial_updates_reach_the_reducers_untouched(capture: TelemetryCapture) -> None:
    def first(state: State) -> dict[str, Any]:
        return {"items": ["a"], "messages": [AIMessage("one", id="m1")]}

    def second(state: State) -> dict[str, Any]:
        assert state["items"] == ["seed", "a"]
        return {"items": ["b"]}

    builder = StateGraph(State)
    builder.add_node("first", reliable_node(first))
    builder.add_node("second", reliable_node(second))
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    graph = builder.compile()
    ctx = new_ctx(capture)
    out = graph.invoke({"items": ["seed"], "messages": [HumanMessage("hi", id="h1")]}, stroma_config(ctx))
    assert out["items"] == ["seed", "a", "b"]  # not ["seed", "seed", "a", ...]: no full-state dump
    assert [m.id for m in out["messages"]] == ["h1", "m1"]
    assert steps_of(ctx) == ["first", "second"]
    assert {s.attributes[n.STEP_ID] for s in capture.spans_named("step")} == {"first", "second"}


def test_sync_stays_sync_and_async_stays_async() -> None:
    def sync_node(state: State) -> dict[str, Any]:
        return {}

    async def async_node(state: State) -> dict[str, Any]:
        return {}

    assert not inspect.iscoroutinefunction(reliable_node(sync_node))
    assert inspect.iscoroutinefunction(reliable_node(async_node))


async def test_async_graph_with_async_nodes() -> None:
    async def draft(state: State) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"note": "drafted"}

    builder = StateGraph(State)
    builder.add_node("draft", reliable_node(draft))
    builder.add_edge(START, "draft")
    ctx = new_ctx()
    out = await builder.compile().ainvoke({"items": []}, stroma_config(ctx))
    assert out["note"] == "drafted"
    assert steps_of(ctx) == ["draft"]


def test_command_goto_and_update_pass_through() -> None:
    def route(state: State) -> Command[Any]:
        return Command(goto="right", update={"items": ["routed"]})

    def left(state: State) -> dict[str, Any]:
        return {"items": ["left"]}

    def right(state: State) -> dict[str, Any]:
        return {"items": ["right"]}

    builder = StateGraph(State)
    builder.add_node("route", reliable_node(route), destinations=("left", "right"))
    builder.add_node("left", reliable_node(left))
    builder.add_node("right", reliable_node(right))
    builder.add_edge(START, "route")
    ctx = new_ctx()
    out = builder.compile().invoke({"items": []}, stroma_config(ctx))
    assert out["items"] == ["routed", "right"]
    assert steps_of(ctx) == ["route", "right"]


def test_interrupt_bubbles_up_without_retry_or_failure_and_resumes() -> None:
    calls = 0

    def approve(state: State) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        answer = interrupt("approve?")
        return {"note": f"approved: {answer}"}

    builder = StateGraph(State)
    builder.add_node("approve", reliable_node(approve))
    builder.add_edge(START, "approve")
    graph = builder.compile(checkpointer=InMemorySaver())
    ctx = new_ctx()
    config = stroma_config(ctx)
    first = graph.invoke({"items": []}, config)
    assert "__interrupt__" in first
    assert calls == 1  # not retried
    assert [(e.node_id, e.failure) for e in ctx.trace] == [("approve", None)]
    assert config["configurable"]["thread_id"] == ctx.run_id
    done = graph.invoke(Command(resume="yes"), config)
    assert done["note"] == "approved: yes"
    assert calls == 2


def test_parent_command_bubbles_up_from_a_subgraph() -> None:
    def jump(state: State) -> Command[Any]:
        return Command(graph=Command.PARENT, goto="after", update={"items": ["jumped"]})

    sub = StateGraph(State)
    sub.add_node("jump", reliable_node(jump))
    sub.add_edge(START, "jump")
    subgraph = sub.compile()

    def after(state: State) -> dict[str, Any]:
        return {"items": ["after"]}

    builder = StateGraph(State)
    builder.add_node("sub", subgraph, destinations=("after",))
    builder.add_node("after", reliable_node(after))
    builder.add_edge(START, "sub")
    ctx = new_ctx()
    out = builder.compile().invoke({"items": []}, stroma_config(ctx))
    assert out["items"] == ["jumped", "after"]
    assert all(e.failure is None for e in ctx.trace)


def test_custom_stream_writer_and_config_runtime_injection() -> None:
    @dataclass
    class AppContext:
        user: str
        stroma: ReliabilityContext

    def talk(
        state: State, config: RunnableConfig, runtime: Runtime[AppContext], writer: StreamWriter
    ) -> dict[str, Any]:
        writer({"progress": 1})
        get_stream_writer()({"progress": 2})
        return {"note": f"{runtime.context.user}:{config['configurable']['thread_id']}"}

    builder = StateGraph(State, context_schema=AppContext)
    builder.add_node("talk", reliable_node(talk))
    builder.add_edge(START, "talk")
    graph = builder.compile()
    ctx = new_ctx()
    chunks = list(
        graph.stream(
            {"items": []},
            {"configurable": {"thread_id": "t-1"}},
            context=AppContext(user="ada", stroma=ctx),
            stream_mode=["custom", "values"],
        )
    )
    custom = [data for mode, data in chunks if mode == "custom"]
    assert custom == [{"progress": 1}, {"progress": 2}]
    values = [data for mode, data in chunks if mode == "values"]
    assert values[-1]["note"] == "ada:t-1"
    assert steps_of(ctx) == ["talk"]


def test_store_injection_keeps_working() -> None:
    from langgraph.store.base import BaseStore
    from langgraph.store.memory import InMemoryStore

    def remember(state: State, store: BaseStore) -> dict[str, Any]:
        store.put(("notes",), "last", {"text": "seen"})
        return {"items": ["remembered"]}

    def recall(state: State, *, store: BaseStore) -> dict[str, Any]:
        item = store.get(("notes",), "last")
        return {"note": item.value["text"] if item is not None else "nothing"}

    builder = StateGraph(State)
    builder.add_node("remember", reliable_node(remember))
    builder.add_node("recall", reliable_node(recall))
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "recall")
    store = InMemoryStore()
    ctx = new_ctx()
    out = builder.compile(store=store).invoke({"items": []}, stroma_config(ctx))
    assert out["note"] == "seen" and out["items"] == ["remembered"]
    assert steps_of(ctx) == ["remember", "recall"]


def test_parallel_branches_run_concurrently() -> None:
    running: list[str] = []
    overlap = threading.Event()

    def branch(name: str) -> Any:
        def node(state: State) -> dict[str, Any]:
            running.append(name)
            if len(running) == 2:
                overlap.set()
            overlap.wait(2.0)
            return {"items": [name]}

        node.__name__ = name
        return node

    builder = StateGraph(State)
    for name in ("left", "right"):
        builder.add_node(name, reliable_node(branch(name)))
        builder.add_edge(START, name)
    ctx = new_ctx()
    started = time.perf_counter()
    out = builder.compile().invoke({"items": []}, stroma_config(ctx))
    assert overlap.is_set()  # both were running at the same time, on the first call
    assert time.perf_counter() - started < 1.5
    assert sorted(out["items"]) == ["left", "right"]


def test_failures_are_retried_by_stroma_and_a_failed_step_raises_with_its_result() -> None:
    calls = 0

    def flaky(state: State) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("down")
        return {"note": "ok"}

    def broken(state: State) -> dict[str, Any]:
        raise KeyError("missing")

    builder = StateGraph(State)
    builder.add_node("flaky", reliable_node(flaky))
    builder.add_node("broken", reliable_node(broken))
    builder.add_edge(START, "flaky")
    builder.add_edge("flaky", "broken")
    ctx = new_ctx()
    with pytest.raises(StepNotCompleted) as raised:
        builder.compile().invoke({"items": []}, stroma_config(ctx))
    assert calls == 2
    assert raised.value.step_id == "broken"
    assert raised.value.result.status in (RunStatus.FAILED, RunStatus.PARTIAL)
    assert raised.value.result.failed_step == "broken"
    assert isinstance(raised.value, RuntimeError)


def test_budget_breach_mid_graph_stops_before_the_next_node() -> None:
    ran: list[str] = []

    def think(state: State) -> dict[str, Any]:
        ran.append("think")
        usage = {"input_tokens": 400, "output_tokens": 300, "total_tokens": 700}
        return {
            "messages": [AIMessage("hmm", id="a1", usage_metadata=usage, response_metadata={"model_name": "gpt-4o"})]
        }

    def act(state: State) -> dict[str, Any]:
        ran.append("act")
        return {}

    builder = StateGraph(State)
    builder.add_node("think", reliable_node(think))
    builder.add_node("act", reliable_node(act))
    builder.add_edge(START, "think")
    builder.add_edge("think", "act")
    ctx = new_ctx(budget=ExecutionBudget(max_tokens_total=500))
    with pytest.raises(StepNotCompleted) as raised:
        builder.compile().invoke({"messages": [HumanMessage("go", id="h")]}, stroma_config(ctx))
    assert ran == ["think"]
    result = raised.value.result
    assert result.status is RunStatus.PARTIAL
    assert result.total_tokens == 700
    assert result.budget_exceeded is not None
    assert ctx.breaches[0].dimension == "tokens"


def test_usage_metadata_of_messages_already_in_the_state_is_not_counted_again() -> None:
    old = AIMessage("old", id="old", usage_metadata={"input_tokens": 50, "output_tokens": 5, "total_tokens": 55})

    def echo(state: State) -> dict[str, Any]:
        new = AIMessage("new", id="new", usage_metadata={"input_tokens": 7, "output_tokens": 3, "total_tokens": 10})
        return {"messages": [*state["messages"], new]}

    builder = StateGraph(State)
    builder.add_node("echo", reliable_node(echo))
    builder.add_edge(START, "echo")
    ctx = new_ctx()
    builder.compile().invoke({"messages": [old]}, stroma_config(ctx))
    assert (ctx.input_tokens, ctx.output_tokens) == (7, 3)


def test_usage_from_messages_without_instrumentation_is_priced_and_counted_once() -> None:
    from stroma import pricing

    def chat(state: State) -> dict[str, Any]:
        both = AIMessage(
            "a",
            id="m1",
            usage_metadata={"input_tokens": 120, "output_tokens": 30, "total_tokens": 150},
            response_metadata={"model_name": "gpt-4o", "token_usage": {"prompt_tokens": 120, "completion_tokens": 30}},
        )
        # an older integration: the provider's usage only in response_metadata
        legacy = AIMessage(
            "b",
            id="m2",
            response_metadata={"model_name": "gpt-4o", "token_usage": {"prompt_tokens": 80, "completion_tokens": 20}},
        )
        anthropic_like = AIMessage(
            "c", id="m3", response_metadata={"model": "gpt-4o", "usage": {"input_tokens": 10, "output_tokens": 5}}
        )
        return {"messages": [both, legacy, anthropic_like, AIMessage("no usage", id="m4")]}

    builder = StateGraph(State)
    builder.add_node("chat", reliable_node(chat))
    builder.add_edge(START, "chat")
    ctx = new_ctx()
    builder.compile().invoke({"messages": [HumanMessage("go", id="h")]}, stroma_config(ctx))
    assert (ctx.input_tokens, ctx.output_tokens) == (210, 55)  # each message once, usage_metadata first
    assert ctx.total_cost == pytest.approx(pricing.cost_usd("gpt-4o", 210, 55)[0])


def test_reliable_graph_on_a_langchain_agent_keeps_its_checkpointer() -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    from stroma.adapters.langgraph import reliable_graph, run_graph

    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    def usage(i: int, o: int) -> Any:
        return {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}

    def lookup(q: str) -> str:
        """Look something up."""
        return f"found {q}"

    replies = iter(
        [
            AIMessage("", tool_calls=[{"name": "lookup", "args": {"q": "x"}, "id": "c1"}], usage_metadata=usage(30, 3)),
            AIMessage("the answer", usage_metadata=usage(50, 5)),
            AIMessage("again", usage_metadata=usage(70, 7)),
        ]
    )
    saver = InMemorySaver()
    agent = create_agent(Scripted(messages=replies), tools=[lookup], checkpointer=saver)
    wrapped = reliable_graph(agent, nodes=["model", "tools"])
    assert wrapped.checkpointer is saver
    first = run_graph(wrapped, {"messages": [("user", "q")]}, new_ctx())
    assert first.status is RunStatus.COMPLETED and first.total_tokens == 88
    assert [e.node_id for e in first.trace] == ["model", "tools", "model"]
    # a second run continues the first one's thread from the checkpoint
    thread = {"configurable": {"thread_id": first.run_id}}
    second = run_graph(wrapped, {"messages": [("user", "more")]}, new_ctx(), config=thread)
    assert second.total_tokens == 77
    assert [m.content for m in second.final_state["messages"]][-1] == "again"
    assert len(second.final_state["messages"]) == 6  # the first run's four messages, the new question, the answer
    with pytest.raises(ConfigurationError, match="compiled StateGraph"):
        reliable_graph(StateGraph(State))


def test_retry_policy_on_a_wrapped_node_is_refused() -> None:
    def node(state: State) -> dict[str, Any]:
        return {}

    builder = StateGraph(State)
    builder.add_node("node", reliable_node(node), retry_policy=RetryPolicy(max_attempts=3))
    builder.add_edge(START, "node")
    with pytest.raises(ConfigurationError, match="RetryPolicy"):
        LangGraphAdapter().wrap(builder)


def test_established_names_work_on_a_real_graph() -> None:
    class In(BaseModel):
        x: int

    class Out(BaseModel):
        y: int

    contract = NodeContract(node_id="add_one", input_schema=In, output_schema=Out)
    registry = ContractRegistry()

    @stroma_langgraph_node("add_one", contract)
    def add_one(state: In) -> dict[str, int]:
        assert isinstance(state, In)
        return {"y": state.x + 1}

    def plain(state: dict[str, Any]) -> dict[str, Any]:
        return {"z": state["y"] * 10}

    class Full(TypedDict, total=False):
        x: int
        y: int
        z: int

    builder = StateGraph(Full)
    builder.add_node("add_one", add_one)
    builder.add_node("plain", plain)
    builder.add_edge(START, "add_one")
    builder.add_edge("add_one", "plain")
    builder.add_edge("plain", END)
    adapter = LangGraphAdapter(registry, None)
    assert adapter.wrap(builder, nodes="all") is builder
    assert "add_one" in registry
    ctx = new_ctx()
    out = builder.compile().invoke({"x": 1}, stroma_config(ctx))
    assert out == {"x": 1, "y": 2, "z": 20}
    assert steps_of(ctx) == ["add_one", "plain"]


def test_contract_violation_fails_the_step() -> None:
    class In(BaseModel):
        x: int

    class Out(BaseModel):
        y: int

    @stroma_langgraph_node("bad", NodeContract(node_id="bad", input_schema=In, output_schema=Out))
    def bad(state: In) -> dict[str, Any]:
        return {"y": "not a number"}

    class Full(TypedDict, total=False):
        x: int
        y: Any

    builder = StateGraph(Full)
    builder.add_node("bad", bad)
    builder.add_edge(START, "bad")
    with pytest.raises(StepNotCompleted, match="bad"):
        builder.compile().invoke({"x": 1}, stroma_config(new_ctx()))


def test_a_compiled_graph_or_a_missing_context_is_explained() -> None:
    def node(state: State) -> dict[str, Any]:
        return {}

    builder = StateGraph(State)
    builder.add_node("node", reliable_node(node))
    builder.add_edge(START, "node")
    graph = builder.compile()
    with pytest.raises(ConfigurationError, match="before compile"):
        LangGraphAdapter().wrap(graph)
    with pytest.raises(ConfigurationError, match="stroma_config"):
        graph.invoke({"items": []})


def test_importing_stroma_does_not_import_langgraph() -> None:
    code = (
        "import sys, stroma, stroma.adapters\n"
        "from stroma.adapters import FrameworkAdapter, StepInterceptor, LoopAdapter, TurnAdapter\n"
        "assert not {'langgraph', 'pydantic_ai', 'agents'} & set(sys.modules), 'a framework was imported'\n"
        "from stroma.adapters import LangGraphAdapter\n"
        "assert isinstance(LangGraphAdapter(), FrameworkAdapter)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_run_graph_returns_the_run_result_and_nests_steps_under_the_run_span(capture: TelemetryCapture) -> None:
    from stroma.adapters.langgraph import run_graph

    def ok(state: State) -> dict[str, Any]:
        return {"note": "ok"}

    def wait(state: State) -> dict[str, Any]:
        return {"note": interrupt("continue?")}

    def broken(state: State) -> dict[str, Any]:
        raise KeyError("x")

    def graph_of(node: Any, **compile_kwargs: Any) -> Any:
        builder = StateGraph(State)
        builder.add_node("node", reliable_node(node, step_id="node"))
        builder.add_edge(START, "node")
        return builder.compile(**compile_kwargs)

    done = run_graph(graph_of(ok), {"items": []}, new_ctx(capture))
    assert done.status is RunStatus.COMPLETED and done.final_state["note"] == "ok"
    (run,) = capture.spans_named("run")
    (step,) = capture.spans_named("step")
    assert step.parent is not None and step.parent.span_id == run.context.span_id

    waiting = run_graph(graph_of(wait, checkpointer=InMemorySaver()), {"items": []}, new_ctx())
    assert waiting.status is RunStatus.PARTIAL and "interrupt" in (waiting.error or "")

    failed = run_graph(graph_of(broken), {"items": []}, new_ctx())
    assert failed.status is not RunStatus.COMPLETED and failed.failed_step == "node"
    assert "KeyError" in (failed.error or "")
