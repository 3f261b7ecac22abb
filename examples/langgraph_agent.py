"""A LangGraph graph whose nodes are Stroma steps, offline (``pip install 'stroma[langgraph]'``).

A triage node routes a question to two research branches that run in parallel, then a writer
answers. The "model" is LangChain's scripted chat model, so it runs with no network; its
replies carry token usage the way a real provider's do, and Stroma charges each node for it
(with an instrumented client, the GenAI spans would be used instead). The researcher fails
once with a connection error and is retried by Stroma. Prints the run's status and the tree
``stroma show`` prints for it.

Run: ``python examples/langgraph_agent.py``.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from stroma import ContractRegistry, ExecutionBudget, ReliabilityContext, RunConfig
from stroma.adapters.langgraph import reliable_node, run_graph
from stroma.cli.render import Style, render_tree
from stroma.cli.tree import build_tree
from stroma.runstore import records_to_dicts
from stroma.telemetry import sinks


def reply(text: str, prompt_tokens: int, completion_tokens: int) -> AIMessage:
    usage = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens}
    usage["total_tokens"] = prompt_tokens + completion_tokens
    return AIMessage(text, usage_metadata=usage, response_metadata={"model_name": "gpt-4o-mini"})  # type: ignore[arg-type]


def model(*replies: AIMessage) -> GenericFakeChatModel:
    return GenericFakeChatModel(messages=iter(replies))


TRIAGE = model(reply("billing", 120, 4))
POLICY = model(reply("Refunds take 5 days.", 300, 40))
ACCOUNT = model(reply("The customer paid twice.", 280, 35))
WRITER = model(reply("You were charged twice; a refund is on its way within 5 days.", 500, 60))


class State(TypedDict, total=False):
    question: str
    topic: str
    notes: Annotated[list[str], operator.add]  # both branches add to it
    answer: str


def triage(state: State) -> dict[str, Any]:
    message = TRIAGE.invoke(state["question"])
    # usage is read from the messages a node returns (or from GenAI spans when instrumented)
    return {"topic": str(message.content), "messages": [message]}


_failed_once = False


def policy_research(state: State) -> dict[str, Any]:
    global _failed_once
    if not _failed_once:
        _failed_once = True
        raise ConnectionError("knowledge base unreachable")  # recoverable: Stroma retries it
    message = POLICY.invoke(f"policy for {state['topic']}")
    return {"notes": [str(message.content)], "messages": [message]}


def account_research(state: State) -> dict[str, Any]:
    message = ACCOUNT.invoke(f"account history, {state['topic']}")
    return {"notes": [str(message.content)], "messages": [message]}


def write(state: State) -> dict[str, Any]:
    message = WRITER.invoke(" ".join(sorted(state["notes"])))
    return {"answer": str(message.content), "messages": [message]}


class GraphState(State, total=False):
    messages: Annotated[list[Any], operator.add]


def build() -> Any:
    builder = StateGraph(GraphState)
    for name, node in (
        ("triage", triage),
        ("policy", policy_research),
        ("account", account_research),
        ("write", write),
    ):
        builder.add_node(name, reliable_node(node, step_id=name))
    builder.add_edge(START, "triage")
    builder.add_edge("triage", "policy")
    builder.add_edge("triage", "account")
    builder.add_edge(["policy", "account"], "write")
    builder.add_edge("write", END)
    return builder.compile()


def main() -> tuple[Any, str]:
    graph = build()
    finished: list[sinks.FinishedRun] = []
    sinks.add_run_sink(finished.append)  # what the local run store behind `stroma show` receives
    try:
        config = RunConfig(workflow_name="support-graph", budget=ExecutionBudget(max_cost_usd=0.01))
        ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
        result = run_graph(graph, {"question": "Why was I charged twice?"}, ctx)
    finally:
        sinks.remove_run_sink(finished.append)
    tree = build_tree(records_to_dicts(finished[-1].records), run_id=result.run_id)
    return result, render_tree(tree, Style(color=False))


if __name__ == "__main__":
    result, shown = main()
    print(f"{result.status.value} | {result.final_state['answer']}")
    print(shown)
