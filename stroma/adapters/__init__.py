"""Framework adapters: where Stroma meets LangGraph, Pydantic AI and the OpenAI Agents SDK.

``stroma.adapters.langgraph`` (nodes as steps), ``stroma.adapters.pydantic_ai`` (an agent run as
a step, a capability) and ``stroma.adapters.openai_agents`` (an agent run as a step, run hooks)
each import their framework; install the matching extra.

The protocols (:class:`FrameworkAdapter`, :class:`StepInterceptor`, :class:`LoopAdapter`,
:class:`TurnAdapter`) import with no framework installed. The LangGraph names
(``LangGraphAdapter``, ``stroma_langgraph_node``, ``reliable_node``, ``reliable_graph``,
``stroma_config``) load ``stroma.adapters.langgraph`` on first access, which needs
``pip install 'stroma[langgraph]'``; ``import stroma`` itself never imports a framework.
"""

from __future__ import annotations

import importlib
from typing import Any

from stroma.adapters.protocols import FrameworkAdapter, LoopAdapter, StepInterceptor, TurnAdapter

__all__ = [
    "FrameworkAdapter",
    "LangGraphAdapter",
    "LoopAdapter",
    "StepInterceptor",
    "TurnAdapter",
    "reliable_graph",
    "reliable_node",
    "stroma_config",
    "stroma_langgraph_node",
]

_LANGGRAPH_NAMES = frozenset(
    {
        "LangGraphAdapter",
        "StepNotCompleted",
        "arun_graph",
        "reliable_node",
        "reliable_graph",
        "run_graph",
        "stroma_config",
        "stroma_langgraph_node",
    }
)


def __getattr__(name: str) -> Any:
    if name in _LANGGRAPH_NAMES:
        module = importlib.import_module("stroma.adapters.langgraph")
        return getattr(module, name)
    raise AttributeError(f"module 'stroma.adapters' has no attribute {name!r}")
