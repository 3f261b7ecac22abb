"""Pydantic AI: an agent run as one Stroma step (issue 10, part 3). Needs ``pydantic-ai-slim`` 2.x.

What a user writes::

    result = await run_agent(agent, "Where is my refund?", ctx, step_id="answer")

or, inside a step of their own, ``await agent.run(prompt, capabilities=[StromaCapability(ctx, "answer")])``.

What Stroma sees, through Pydantic AI's own extension point (a capability, no patching):

* every model response of the run, including responses whose output failed validation and was
  retried inside the agent, and those of a run that then failed: its usage is reported to the
  running attempt (:func:`stroma.report_usage`), priced and budgeted like any step usage. With
  the agent also instrumented, this reported usage wins over its spans for the attempt (the
  ``auto`` usage source), so nothing is counted twice;
* before every model request, the run's budget with what this agent run has used so far: a
  request that would start at or past a cost or token limit is not made; the step ends
  ``PARTIAL`` with the budget breach (one step can make many requests: the budget holds inside
  it, not only between steps).

Fallback is expressed once: either Stroma's :class:`~stroma.cost.FallbackPolicy` (run the agent
with ``model=stroma.current_model(...)`` resolved to your model) or Pydantic AI's
``FallbackModel`` / ``ModelFallback``, never both on one step: :func:`run_agent` refuses an agent
whose model is a ``FallbackModel`` when the run also has model fallbacks configured.
"""

from __future__ import annotations

from typing import Any

from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.models.fallback import FallbackModel

from stroma import execute_step, report_usage
from stroma.adapters.budget import check_call_budget
from stroma.context import ReliabilityContext
from stroma.errors import ConfigurationError
from stroma.pricing import cost_usd
from stroma.trace import ExecutionResult

__all__ = ["StromaCapability", "run_agent"]


class StromaCapability(AbstractCapability[Any]):
    """Charges an agent run's model responses to the running Stroma attempt and checks the run's
    budget before each model request. One instance per agent run (it keeps the run's usage so far)."""

    def __init__(self, ctx: ReliabilityContext, step_id: str) -> None:
        self.ctx = ctx
        self.step_id = step_id
        self.requests = 0
        self.pending_tokens = 0
        self.pending_cost = 0.0

    async def prepare_model_request(self, ctx: Any, request_context: Any) -> Any:
        self.check_budget()
        self.requests += 1
        return request_context

    async def after_model_request(self, ctx: Any, *, request_context: Any, response: Any) -> Any:
        usage = response.usage
        input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
        model = getattr(response, "model_name", None)
        report_usage(input_tokens, output_tokens, model)
        self.pending_tokens += input_tokens + output_tokens
        self.pending_cost += cost_usd(model, input_tokens, output_tokens)[0]
        return response

    def check_budget(self) -> None:
        """Raise :class:`~stroma.cost.BudgetExceeded` when the next request may not start."""
        check_call_budget(self.ctx, self.step_id, pending_tokens=self.pending_tokens, pending_cost=self.pending_cost)


async def run_agent(
    agent: Any, user_prompt: Any, ctx: ReliabilityContext, *, step_id: str = "agent", **run_kwargs: Any
) -> ExecutionResult:
    """Run ``agent.run(user_prompt, **run_kwargs)`` as the step *step_id*; ``final_state`` is the
    agent's output. Failures of the run are classified and retried by Stroma like any step's."""
    if isinstance(getattr(agent, "model", None), FallbackModel) and ctx.model_fallbacks:
        raise ConfigurationError(
            f"step {step_id!r}: the agent's model is a FallbackModel and the run has Stroma model fallbacks; "
            "express fallback once (remove one of them)"
        )
    extra = list(run_kwargs.pop("capabilities", None) or ())

    async def body(prompt: Any) -> Any:
        capability = StromaCapability(ctx, step_id)
        result = await agent.run(prompt, capabilities=[*extra, capability], **run_kwargs)
        return result.output

    return await execute_step(step_id, body, user_prompt, ctx)
