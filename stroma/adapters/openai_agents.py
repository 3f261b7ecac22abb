"""OpenAI Agents SDK: an agent run as one Stroma step (issue 10, part 4). Needs ``openai-agents``.

What a user writes::

    result = await run_agent(agent, "Where is my refund?", ctx, step_id="support")
    result = await run_agent_streamed(agent, "Where is my refund?", ctx, step_id="support", on_event=show)

or, inside a step of their own, ``await Runner.run(agent, prompt, hooks=StromaRunHooks(ctx, "support"))``
(``Runner.run_streamed`` takes the same hooks).

The SDK has its own tracing, not OpenTelemetry, so Stroma joins through its run hooks:

* ``on_llm_start`` (before each model call): the run's budget with what this agent run used so
  far; a call that would start at or past a cost or token limit is not made and the step ends
  ``PARTIAL`` with the breach;
* ``on_llm_end``: the response's usage is reported to the running attempt
  (:func:`stroma.report_usage`) and priced with the agent's model name;
* ``on_tool_start`` / ``on_tool_end``: a ``stroma.tool_call`` event on the attempt span (tool
  name and whether it finished), so tool calls show in the trace.

A run that raises is classified and retried by Stroma like any step; the usage of its model
calls so far is charged. A streamed run (:func:`run_agent_streamed`) goes through the same hooks:
its events are handed to ``on_event`` as they arrive and the step ends when the stream does, so
every call of the run is charged to the step's attempt (a retried attempt streams again from
the start; ``on_event`` sees both).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from agents import Agent, RunHooks, Runner
from openai.types.responses import ResponseCompletedEvent
from opentelemetry import trace as trace_api

from stroma import execute_step, report_usage
from stroma.adapters.budget import check_call_budget
from stroma.context import ReliabilityContext
from stroma.pricing import cost_usd
from stroma.trace import ExecutionResult

__all__ = ["EVENT_TOOL_CALL", "StromaRunHooks", "run_agent", "run_agent_streamed"]

EVENT_TOOL_CALL = "stroma.tool_call"
"""Span event added to the attempt span for each tool call (attributes: tool name, phase)."""


def _model_name(agent: Any) -> str | None:
    model = getattr(agent, "model", None)
    if isinstance(model, str):
        return model
    name = getattr(model, "model", None) or getattr(model, "model_name", None)
    return name if isinstance(name, str) else None


class StromaRunHooks(RunHooks[Any]):
    """Run hooks that charge each model call to the running attempt and check the budget before
    each one. One instance per agent run (it keeps the run's usage so far)."""

    def __init__(self, ctx: ReliabilityContext, step_id: str) -> None:
        self.ctx = ctx
        self.step_id = step_id
        self.model_calls = 0
        self.tool_calls = 0
        self.pending_tokens = 0
        self.pending_cost = 0.0
        #: ids of the responses charged so far (a streamed run charges the others when cut short)
        self.charged: set[str] = set()

    async def on_llm_start(self, context: Any, agent: Any, system_prompt: Any, input_items: Any) -> None:
        self.check_budget()
        self.model_calls += 1

    async def on_llm_end(self, context: Any, agent: Any, response: Any) -> None:
        response_id = getattr(response, "response_id", None)
        if isinstance(response_id, str):
            if response_id in self.charged:
                return
            self.charged.add(response_id)
        self.charge(getattr(response, "usage", None), _model_name(agent))

    def charge(self, usage: Any, model: str | None) -> None:
        """Report one model call's *usage* (an object with ``input_tokens`` / ``output_tokens``)
        to the running attempt and add it to this run's pending usage."""
        input_tokens = int(getattr(usage, "input_tokens", 0) or 0)
        output_tokens = int(getattr(usage, "output_tokens", 0) or 0)
        report_usage(input_tokens, output_tokens, model)
        self.pending_tokens += input_tokens + output_tokens
        self.pending_cost += cost_usd(model, input_tokens, output_tokens)[0]

    async def on_tool_start(self, context: Any, agent: Any, tool: Any) -> None:
        self.tool_calls += 1
        _event({"gen_ai.tool.name": str(getattr(tool, "name", tool)), "stroma.tool_call.phase": "start"})

    async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: Any) -> None:
        _event({"gen_ai.tool.name": str(getattr(tool, "name", tool)), "stroma.tool_call.phase": "end"})

    def check_budget(self) -> None:
        """Raise :class:`~stroma.cost.BudgetExceeded` when the next model call may not start."""
        check_call_budget(self.ctx, self.step_id, pending_tokens=self.pending_tokens, pending_cost=self.pending_cost)


def _event(attributes: dict[str, str]) -> None:
    # the attempt span is the current one while the agent runs inside the step
    span = trace_api.get_current_span()
    if span.is_recording():
        span.add_event(EVENT_TOOL_CALL, attributes)


async def run_agent(
    agent: Agent[Any], user_input: Any, ctx: ReliabilityContext, *, step_id: str = "agent", **run_kwargs: Any
) -> ExecutionResult:
    """Run ``Runner.run(agent, user_input, **run_kwargs)`` as the step *step_id*; ``final_state``
    is the run's ``final_output``."""

    async def body(prompt: Any) -> Any:
        hooks = StromaRunHooks(ctx, step_id)
        result = await Runner.run(agent, prompt, hooks=hooks, **run_kwargs)
        return result.final_output

    return await execute_step(step_id, body, user_input, ctx)


async def run_agent_streamed(
    agent: Agent[Any],
    user_input: Any,
    ctx: ReliabilityContext,
    *,
    step_id: str = "agent",
    on_event: Callable[[Any], Any] | None = None,
    **run_kwargs: Any,
) -> ExecutionResult:
    """Run ``Runner.run_streamed(agent, user_input, **run_kwargs)`` as the step *step_id* and
    consume its events, passing each to *on_event* (a function or coroutine function);
    ``final_state`` is the run's ``final_output``.

    Usage, the budget before each model call and tool-call events are as in :func:`run_agent`.
    When the run or *on_event* raises (or the step is cancelled, e.g. by its timeout), the
    streamed run is cancelled and the attempt fails with that exception (a budget breach ends
    the step ``PARTIAL``). A response that had completed in the stream but not yet reached
    ``on_llm_end`` (the SDK streams a response's items before that hook runs) is still charged,
    from the stream's ``response.completed`` event.
    """

    async def body(prompt: Any) -> Any:
        hooks = StromaRunHooks(ctx, step_id)
        streamed = Runner.run_streamed(agent, prompt, hooks=hooks, **run_kwargs)
        completed: list[Any] = []
        try:
            async for event in streamed.stream_events():
                data = getattr(event, "data", None)
                if isinstance(data, ResponseCompletedEvent):
                    completed.append(data.response)
                if on_event is not None:
                    handled = on_event(event)
                    if inspect.isawaitable(handled):
                        await handled
        except BaseException:
            streamed.cancel()
            for response in completed:
                if response.id not in hooks.charged:
                    hooks.charged.add(response.id)
                    hooks.charge(response.usage, _model_name(streamed.current_agent) or response.model)
            raise
        return streamed.final_output

    return await execute_step(step_id, body, user_input, ctx)
