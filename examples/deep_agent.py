"""A DeepAgents agent run through Stroma's LangGraph adapter, offline (``pip install 'stroma[deepagents]'``).

``create_deep_agent`` returns a compiled LangGraph graph; :func:`stroma.adapters.langgraph.reliable_graph`
makes a copy of it whose model calls and tool calls are Stroma steps. The "model" is a scripted
chat model (no network, no API key): it plans with the deep agent's own ``write_todos`` tool,
looks up two orders in parallel with a tool of ours, then answers. Its replies carry token usage
as a provider's do, so each model call is charged, priced and budgeted (the run's budget is
checked before every model call). Prints the run's status and the tree ``stroma show`` prints.

Run: ``python examples/deep_agent.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepagents import create_deep_agent
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage

from stroma import ContractRegistry, ExecutionBudget, ExecutionResult, ReliabilityContext, RunConfig
from stroma.adapters.langgraph import reliable_graph, run_graph
from stroma.cli.render import Style, render_tree
from stroma.cli.tree import build_tree
from stroma.runstore import records_to_dicts
from stroma.telemetry import sinks

MODEL = "gpt-4o-mini"


class ScriptedChatModel(GenericFakeChatModel):
    """LangChain's scripted chat model, accepting the tools an agent binds (it ignores them)."""

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        return self


def reply(text: str, tokens: tuple[int, int], *calls: tuple[str, dict[str, Any]]) -> AIMessage:
    usage = {"input_tokens": tokens[0], "output_tokens": tokens[1], "total_tokens": sum(tokens)}
    tool_calls = [{"name": name, "args": args, "id": f"call-{name}-{i}"} for i, (name, args) in enumerate(calls)]
    return AIMessage(
        text,
        tool_calls=tool_calls,
        usage_metadata=usage,  # type: ignore[arg-type]
        response_metadata={"model_name": MODEL},
    )


def script() -> list[AIMessage]:
    """The model's replies, in order: plan, look up two orders at once, answer."""
    plan = [{"content": "look up both orders", "status": "in_progress"}]
    return [
        reply("", (900, 40), ("write_todos", {"todos": plan})),
        reply("", (1100, 30), ("order_status", {"order_id": "A-17"}), ("order_status", {"order_id": "B-22"})),
        reply("A-17 ships tomorrow; B-22 was delivered on Monday.", (1300, 20)),
    ]


ORDERS = {"A-17": "ships tomorrow", "B-22": "delivered on Monday"}


def order_status(order_id: str) -> str:
    """The shipping status of an order."""
    return ORDERS.get(order_id, "unknown order")


def build(replies: list[AIMessage] | None = None) -> Any:
    """The deep agent, compiled by DeepAgents, and its copy with Stroma steps."""
    model = ScriptedChatModel(messages=iter(replies if replies is not None else script()))
    agent = create_deep_agent(model=model, tools=[order_status], system_prompt="You answer order questions.")
    return reliable_graph(agent, nodes=["model", "tools"])


def main(budget: ExecutionBudget | None = None) -> tuple[ExecutionResult, str]:
    graph = build()
    finished: list[sinks.FinishedRun] = []
    sinks.add_run_sink(finished.append)  # what the local run store behind `stroma show` receives
    try:
        config = RunConfig(workflow_name="deep-agent", budget=budget or ExecutionBudget(max_cost_usd=0.01))
        ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
        result = run_graph(graph, {"messages": [("user", "Where are my orders A-17 and B-22?")]}, ctx)
    finally:
        sinks.remove_run_sink(finished.append)
    tree = build_tree(records_to_dicts(finished[-1].records), run_id=result.run_id)
    return result, render_tree(tree, Style(color=False))


if __name__ == "__main__":
    result, shown = main()
    answer = result.final_state["messages"][-1].content if result.final_state else result.error
    print(f"{result.status.value} | {answer}")
    print(shown)
