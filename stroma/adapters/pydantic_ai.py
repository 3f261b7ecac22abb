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

Fallback is expressed once, with one owner per run:

* Stroma's :class:`~stroma.cost.FallbackPolicy` (``RunConfig.model_fallbacks``): give
  :func:`run_agent` the models by the names the policies use,
  ``run_agent(agent, prompt, ctx, model="gpt-4o", models={"gpt-4o": primary, "gpt-4o-mini": backup})``;
  each attempt runs the agent with ``models[stroma.current_model(model)]``, so once a policy
  applies (its budget threshold is crossed, or an attempt failed with a class it names) the next
  attempt runs on the fallback model, and the step span records the switch;
* or Pydantic AI's ``FallbackModel``, which switches inside one attempt.

Never both: :func:`run_agent` raises :class:`~stroma.errors.ConfigurationError` when the run has
Stroma model fallbacks and the agent's model (or a model given to :func:`run_agent`) is a
``FallbackModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.models.fallback import FallbackModel

from stroma import current_model, execute_step, report_usage
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
    agent: Any,
    user_prompt: Any,
    ctx: ReliabilityContext,
    *,
    step_id: str = "agent",
    model: Any = None,
    models: Mapping[str, Any] | None = None,
    **run_kwargs: Any,
) -> ExecutionResult:
    """Run ``agent.run(user_prompt, **run_kwargs)`` as the step *step_id*; ``final_state`` is the
    agent's output. Failures of the run are classified and retried by Stroma like any step's.

    *model* is passed to ``agent.run`` (a Pydantic AI model or model name; ``None`` = the agent's
    own). With *models* (Stroma model names, as in ``FallbackPolicy``, to Pydantic AI models),
    *model* names the preferred one and each attempt runs on ``models[current_model(model)]``,
    so Stroma's fallback policies choose the model. Raises
    :class:`~stroma.errors.ConfigurationError` when *model* or a fallback of it is missing from
    *models*, or when a ``FallbackModel`` meets Stroma model fallbacks (fallback expressed twice).
    """
    if models is not None:
        _check_models(step_id, model, models, ctx)
    candidates = [getattr(agent, "model", None), model, *(models or {}).values()]
    if ctx.model_fallbacks and any(isinstance(candidate, FallbackModel) for candidate in candidates):
        raise ConfigurationError(
            f"step {step_id!r}: the agent's model is a FallbackModel and the run has Stroma model fallbacks "
            "(RunConfig.model_fallbacks); express fallback once: remove one of them"
        )
    extra = list(run_kwargs.pop("capabilities", None) or ())

    async def body(prompt: Any) -> Any:
        capability = StromaCapability(ctx, step_id)
        chosen = model
        if models is not None:
            chosen = models[current_model(model) or model]
        if chosen is not None:
            run_kwargs["model"] = chosen
        result = await agent.run(prompt, capabilities=[*extra, capability], **run_kwargs)
        return result.output

    return await execute_step(step_id, body, user_prompt, ctx)


def _check_models(step_id: str, model: Any, models: Mapping[str, Any], ctx: ReliabilityContext) -> None:
    if not isinstance(model, str) or model not in models:
        raise ConfigurationError(
            f"run_agent step {step_id!r}: with models=..., model= must name one of them "
            f"({', '.join(map(repr, models))}), got {model!r}"
        )
    for policy in ctx.model_fallbacks:
        if policy.preferred_model == model and policy.fallback_model not in models:
            raise ConfigurationError(
                f"run_agent step {step_id!r}: the run falls back from {model!r} to {policy.fallback_model!r}, "
                f"which is not in models= ({', '.join(map(repr, models))})"
            )
