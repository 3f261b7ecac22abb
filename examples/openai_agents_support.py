"""An OpenAI Agents SDK agent run as one Stroma step, offline (``pip install 'stroma[openai-agents]'``).

A scripted model stands in for the API (no network, the SDK's own tracing off): it calls a tool,
then answers. Stroma charges both model calls, checks the budget before each, and puts the tool
call on the attempt span. Prints the result.

Run: ``python examples/openai_agents_support.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agents import Agent, Model, ModelResponse, Usage, function_tool, set_tracing_disabled
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

from stroma import ContractRegistry, ExecutionBudget, ReliabilityContext, RunConfig
from stroma.adapters.openai_agents import run_agent


class ScriptedModel(Model):
    """Calls ``order_status`` once, then answers; 900 input and 80 output tokens per call."""

    model = "gpt-4o-mini"  # the name Stroma prices the calls with

    def __init__(self) -> None:
        self.calls = 0

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        self.calls += 1
        if self.calls == 1:
            item: Any = ResponseFunctionToolCall(
                arguments='{"order": "A-17"}', call_id="c1", name="order_status", type="function_call", id="f1"
            )
        else:
            item = ResponseOutputMessage(
                id="m1",
                content=[ResponseOutputText(text="Order A-17 ships tomorrow.", type="output_text", annotations=[])],
                role="assistant",
                status="completed",
                type="message",
            )
        return ModelResponse(
            output=[item], usage=Usage(requests=1, input_tokens=900, output_tokens=80), response_id=None
        )

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@function_tool
def order_status(order: str) -> str:
    """The shipping status of an order."""
    return f"{order}: packed, ships tomorrow"


async def main() -> Any:
    set_tracing_disabled(True)
    agent = Agent(name="support", model=ScriptedModel(), tools=[order_status])
    config = RunConfig(workflow_name="support-agent", budget=ExecutionBudget(max_cost_usd=0.01))
    ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
    with ctx.as_run():
        step = await run_agent(agent, "Where is order A-17?", ctx, step_id="support")
        return ctx.build_result(step.status, step.final_state, error=step.error, failed_step=step.failed_step)


if __name__ == "__main__":
    result = asyncio.run(main())
    print(f"{result.status.value} | {result.final_state} | {result.total_tokens} tokens, ${result.total_cost_usd:.6f}")
