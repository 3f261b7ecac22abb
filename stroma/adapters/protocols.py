"""The shapes a framework integration takes (names kept from the established package).

Each protocol says where Stroma meets a framework; every implementation runs the one reliability
loop (:func:`stroma.execute_step`) at that point and never copies it. They are
``runtime_checkable``: ``isinstance(obj, StepInterceptor)`` checks the methods exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from stroma.context import ReliabilityContext
from stroma.contracts import NodeContract

__all__ = ["FrameworkAdapter", "LoopAdapter", "StepInterceptor", "TurnAdapter"]


@runtime_checkable
class FrameworkAdapter(Protocol):
    """A graph framework (LangGraph): every selected node of a graph becomes one Stroma step.

    ``wrap(graph)`` returns the graph with its nodes running through the loop (each call of a
    node is a ``step`` span with its attempts); ``node_decorator(node_id, contract)`` returns a
    decorator that makes one node function such a step.
    """

    def wrap(self, graph: Any) -> Any: ...

    def node_decorator(self, node_id: str, contract: NodeContract) -> Callable[..., Any]: ...


@runtime_checkable
class StepInterceptor(Protocol):
    """Wraps one function at a time so each call is a step (no graph object needed)."""

    def wrap_step(
        self, step_id: str, func: Callable[..., Any], contract: NodeContract | None = None
    ) -> Callable[..., Any]: ...


@runtime_checkable
class LoopAdapter(Protocol):
    """An agentic loop where the model picks tools (OpenAI Agents SDK, Claude Agent SDK): the
    adapter sees each tool call before it runs and its result after."""

    def on_tool_call(self, tool_name: str, args: dict[str, Any], ctx: ReliabilityContext) -> dict[str, Any]: ...

    def on_tool_result(self, tool_name: str, result: Any, ctx: ReliabilityContext) -> Any: ...


@runtime_checkable
class TurnAdapter(Protocol):
    """A conversation of agents taking turns (AutoGen-like): the adapter sees each turn start
    and end."""

    def on_turn_start(self, turn_id: str, message: Any, ctx: ReliabilityContext) -> Any: ...

    def on_turn_end(self, turn_id: str, result: Any, ctx: ReliabilityContext) -> Any: ...
