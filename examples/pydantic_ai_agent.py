"""A Pydantic AI agent run as one Stroma step, offline (``pip install 'stroma[pydantic-ai]'``).

The scripted model first answers with an output that fails the agent's own validation (the
agent asks again), then keeps calling a tool. Stroma charges every response, and the run's
$0.0005 budget stops the agent before a model request it could no longer pay for, inside the
step. Prints the result.

Run: ``python examples/pydantic_ai_agent.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel
from pydantic_ai import Agent, ModelRetry
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from stroma import ContractRegistry, ExecutionBudget, ReliabilityContext, RunConfig
from stroma.adapters.pydantic_ai import run_agent


class Verdict(BaseModel):
    refund: bool
    reason: str


REQUESTS: list[int] = []


def scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    REQUESTS.append(len(messages))
    usage = RequestUsage(input_tokens=800, output_tokens=120)
    if len(REQUESTS) == 1:  # an answer the validator rejects
        part = ToolCallPart(info.output_tools[0].name, {"refund": True, "reason": ""})
    else:  # then the model keeps looking things up
        part = ToolCallPart("order_history", {"customer": "c-42"})
    return ModelResponse(parts=[part], usage=usage, model_name="gpt-4o-mini")


agent = Agent(FunctionModel(scripted, model_name="gpt-4o-mini"), output_type=Verdict)


@agent.tool_plain
def order_history(customer: str) -> str:
    return f"{customer}: two charges on 2026-11-28"


@agent.output_validator
def has_reason(verdict: Verdict) -> Verdict:
    if not verdict.reason:
        raise ModelRetry("give a reason")
    return verdict


async def main() -> Any:
    config = RunConfig(workflow_name="refund-agent", budget=ExecutionBudget(max_cost_usd=0.0005))
    ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
    with ctx.as_run():
        step = await run_agent(agent, "Should c-42 get a refund?", ctx, step_id="decide")
        return ctx.build_result(step.status, step.final_state, error=step.error, failed_step=step.failed_step)


if __name__ == "__main__":
    result = asyncio.run(main())
    print(f"{result.status.value}: {len(REQUESTS)} model requests, {result.total_tokens} tokens")
    print(result.error)
