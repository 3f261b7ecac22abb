"""LangGraph: each call of a node is one Stroma step (issue 10, part 2).

Needs ``pip install 'stroma[langgraph]'`` (LangGraph 1.x). What a user writes::

    builder.add_node("draft", reliable_node(draft))          # or LangGraphAdapter().wrap(builder, nodes="all")
    graph = builder.compile(checkpointer=...)                # compiled once
    ctx = ReliabilityContext.for_run(RunConfig(budget=...), ContractRegistry(), None)   # one per run
    result = run_graph(graph, state, ctx)                    # or graph.invoke(state, stroma_config(ctx))

What the wrapper keeps (the rules of the issue):

* the node's return value is LangGraph's: a partial update goes back untouched (reducers such as
  ``operator.add`` and ``add_messages`` see exactly what the node returned), a ``Command``
  passes through;
* LangGraph's control flow (``GraphBubbleUp``: ``interrupt()``, ``Command(graph=PARENT)``) is
  re-raised as is, before any retry, fallback or failure record (the attempt ends as a success
  with no output; after a resume the node runs again as a new step, as LangGraph re-runs it);
* a sync node stays sync and an async node async; the signature is kept, so ``config``,
  ``runtime``, ``writer`` and ``store`` are still injected (``config`` and ``runtime`` are added
  as keyword-only parameters when the node does not take them, and not passed on to it);
* Stroma owns retries: wrapping a node that has a LangGraph ``RetryPolicy`` raises
  :class:`~stroma.errors.ConfigurationError` in :meth:`LangGraphAdapter.wrap`. A step that does
  not complete raises :class:`StepNotCompleted` (a ``RuntimeError``, which LangGraph's default
  ``retry_on`` does not retry) carrying the :class:`~stroma.trace.ExecutionResult`;
* usage comes from the node's GenAI model-call spans (:mod:`stroma.telemetry.genai_usage`) or,
  when the attempt saw none, from ``AIMessage.usage_metadata`` (else the provider's usage in
  ``response_metadata``) of the messages in the node's output, priced with the
  ``response_metadata`` model name; messages already in the input state are not counted again.

The run's :class:`~stroma.context.ReliabilityContext` reaches the node through the invoke
config (:func:`stroma_config`, key ``configurable.stroma_context``) or LangGraph's runtime
context (``context=ctx``, or a context object with a ``stroma`` attribute or key).

Sync nodes: their bookkeeping runs on one event loop thread of Stroma's own (so a run's totals
and budget gate are only ever touched from one thread), while the node function itself runs on
a worker thread with the caller's context copied (LangGraph's ``get_config()`` and
``get_stream_writer()`` still work). Parallel branches of a superstep run concurrently; under a
cost or token budget, Stroma's admission gate lets attempts overlap once one attempt's cost is
known (see "Budgets" in the README). A run's context should not be shared by sync and async
nodes running at the same time under a cost or token budget (the gate waits on one event loop).
"""

from __future__ import annotations

import asyncio
import copy as copy_module
import dataclasses
import functools
import inspect
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from langgraph._internal._runnable import coerce_to_runnable
from langgraph.errors import GraphBubbleUp
from langgraph.graph import StateGraph
from langgraph.types import Command
from pydantic import BaseModel

from stroma import execute_step, report_usage
from stroma.context import ReliabilityContext
from stroma.contracts import NodeContract
from stroma.errors import ConfigurationError, StromaError
from stroma.telemetry import genai_usage
from stroma.trace import ExecutionResult, RunStatus

__all__ = [
    "CONTEXT_KEY",
    "LangGraphAdapter",
    "StepNotCompleted",
    "arun_graph",
    "extract_state_dict",
    "reliable_graph",
    "reliable_node",
    "run_graph",
    "stroma_config",
    "stroma_langgraph_node",
]

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_KEY = "stroma_context"
"""Key of the run's context in ``config["configurable"]``."""

_INJECTED = ("config", "runtime")


class StepNotCompleted(StromaError, RuntimeError):
    """A node's step ended ``FAILED`` or ``PARTIAL``; ``result`` is its ExecutionResult.

    Raised out of the node, so ``graph.invoke`` raises it (LangGraph saves the graph's last good
    checkpoint as usual). A ``RuntimeError``: LangGraph's default retry predicate does not retry it.
    """

    def __init__(self, step_id: str, result: ExecutionResult) -> None:
        super().__init__(
            f"LangGraph node {step_id!r} did not complete ({result.status.value}): {result.error}; "
            "see .result for the run's totals and trace"
        )
        self.step_id = step_id
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step_id, self.result))


def stroma_config(ctx: ReliabilityContext, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The invoke config that hands *ctx* to every wrapped node of one graph run.

    ``thread_id`` is the run id unless *config* names one (then that thread continues under this
    run). Other entries of *config* are kept.
    """
    merged: dict[str, Any] = dict(config or {})
    configurable = dict(merged.get("configurable") or {})
    configurable.setdefault("thread_id", ctx.run_id)
    configurable[CONTEXT_KEY] = ctx
    merged["configurable"] = configurable
    return merged


def run_graph(
    graph: Any, graph_input: Any, ctx: ReliabilityContext, *, config: Mapping[str, Any] | None = None, **kwargs: Any
) -> ExecutionResult:
    """Invoke a compiled *graph* as one Stroma run and return its :class:`~stroma.trace.ExecutionResult`.

    Opens the run span (every node step nests under it), invokes with :func:`stroma_config`
    (*kwargs* go to ``graph.invoke``: ``context=``, ``durability=``...) and ends the run:
    ``COMPLETED`` with the graph's output; the step's status and error when a node did not
    complete; ``PARTIAL`` when the graph stopped at an ``interrupt()`` (resume by calling this
    again with ``Command(resume=...)`` and a new context on the same ``thread_id``). Other
    exceptions end the run as failed and propagate.
    """
    with ctx.as_run():
        try:
            output = graph.invoke(graph_input, stroma_config(ctx, config), **kwargs)
        except StepNotCompleted as stopped:
            return _stopped(ctx, stopped)
        return _finished(ctx, output)


async def arun_graph(
    graph: Any, graph_input: Any, ctx: ReliabilityContext, *, config: Mapping[str, Any] | None = None, **kwargs: Any
) -> ExecutionResult:
    """:func:`run_graph` with ``graph.ainvoke``."""
    with ctx.as_run():
        try:
            output = await graph.ainvoke(graph_input, stroma_config(ctx, config), **kwargs)
        except StepNotCompleted as stopped:
            return _stopped(ctx, stopped)
        return _finished(ctx, output)


def _stopped(ctx: ReliabilityContext, stopped: StepNotCompleted) -> ExecutionResult:
    result = stopped.result
    return ctx.build_result(result.status, result.final_state, error=result.error, failed_step=result.failed_step)


def _finished(ctx: ReliabilityContext, output: Any) -> ExecutionResult:
    if isinstance(output, Mapping) and output.get("__interrupt__"):
        return ctx.build_result(RunStatus.PARTIAL, output, error="the graph is waiting at an interrupt() to be resumed")
    return ctx.build_result(RunStatus.COMPLETED, output)


def extract_state_dict(state: Any) -> dict[str, Any]:
    """A graph state as a plain dict (dicts, pydantic models, objects with fields)."""
    if isinstance(state, Mapping):
        return dict(state)
    if isinstance(state, BaseModel):
        return state.model_dump()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    if hasattr(state, "__dict__"):
        return {key: value for key, value in vars(state).items() if not key.startswith("_")}
    raise TypeError(f"cannot read a LangGraph state of type {type(state).__name__} as a dict")


def _context_from(step_id: str, config: Any, runtime: Any) -> ReliabilityContext:
    configurable = config.get("configurable") if isinstance(config, Mapping) else None
    if isinstance(configurable, Mapping):
        found = configurable.get(CONTEXT_KEY)
        if isinstance(found, ReliabilityContext):
            return found
    context = getattr(runtime, "context", None)
    for candidate in (
        context,
        getattr(context, "stroma", None),
        context.get("stroma") if isinstance(context, Mapping) else None,
    ):
        if isinstance(candidate, ReliabilityContext):
            return candidate
    raise ConfigurationError(
        f"LangGraph node {step_id!r} is a Stroma step but the graph was invoked without a ReliabilityContext; "
        "pass config=stroma_config(ctx) to invoke/stream (or context=ctx with a context_schema)"
    )


# --- running async bookkeeping for sync nodes ---------------------------------------------------


class _LoopThread:
    """One event loop on a daemon thread, started on first use, replaced after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.loop is None:
                loop = asyncio.new_event_loop()
                loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="stroma-node"))
                thread = threading.Thread(target=loop.run_forever, name="stroma-langgraph-loop", daemon=True)
                thread.start()
                self.loop, self.thread = loop, thread
            return self.loop

    def run(self, work: Awaitable[ExecutionResult]) -> ExecutionResult:
        loop = self.loop or self._start()
        if threading.current_thread() is self.thread:
            raise RuntimeError("a sync LangGraph node wrapped by Stroma was called on Stroma's own loop thread")
        # run_coroutine_threadsafe copies this thread's contextvars into the task
        return asyncio.run_coroutine_threadsafe(_as_coroutine(work), loop).result()

    def forget(self) -> None:
        self._lock = threading.Lock()
        self.loop = None
        self.thread = None


async def _as_coroutine(work: Awaitable[ExecutionResult]) -> ExecutionResult:
    return await work


_loop_thread = _LoopThread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_loop_thread.forget)


# --- the wrapper -----------------------------------------------------------------------------------


class _BubbledUp:
    """Carries LangGraph's control-flow exception out of the loop as a successful attempt."""

    __slots__ = ("exc",)

    def __init__(self, exc: GraphBubbleUp) -> None:
        self.exc = exc


def _wants(func: Callable[..., Any]) -> tuple[inspect.Signature, set[str]]:
    signature = inspect.signature(func)
    return signature, set(signature.parameters)


def _node_signature(signature: inspect.Signature) -> inspect.Signature:
    """*signature* plus keyword-only ``config`` and ``runtime`` when it lacks them (LangGraph
    injects by parameter name)."""
    params = list(signature.parameters.values())
    names = {p.name for p in params}
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in _INJECTED if name not in names
    ]
    return signature.replace(parameters=[*head, *added, *var_kw])


def _messages(value: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 4:
        return
    if isinstance(value, Command):
        yield from _messages(value.update, depth + 1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _messages(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _messages(item, depth + 1)
    elif _message_usage(value) is not None:
        yield value


def _message_usage(message: Any) -> tuple[int, int] | None:
    """(input, output) tokens of a chat message: its ``usage_metadata``, else the provider's
    usage in ``response_metadata`` (``token_usage`` or ``usage``, with ``input_tokens`` /
    ``output_tokens`` or ``prompt_tokens`` / ``completion_tokens``); ``None`` when it has none."""
    usage = getattr(message, "usage_metadata", None)
    if not isinstance(usage, Mapping):
        metadata = getattr(message, "response_metadata", None)
        if not isinstance(metadata, Mapping):
            return None
        usage = metadata.get("token_usage") or metadata.get("usage")
        if not isinstance(usage, Mapping):
            return None
    input_tokens = usage.get("input_tokens", usage.get("prompt_tokens"))
    output_tokens = usage.get("output_tokens", usage.get("completion_tokens"))
    if input_tokens is None and output_tokens is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    if isinstance(input_tokens, bool) or isinstance(output_tokens, bool):
        return None
    if not isinstance(input_tokens, int) or not isinstance(output_tokens, int):
        return None
    return input_tokens, output_tokens


def _report_message_usage(output: Any, state: Any) -> None:
    """Charge the usage of new chat messages when no model-call span was seen."""
    if genai_usage.calls_in_current_attempt():
        return
    seen = {id(message) for message in _messages(state)}
    seen_ids = {getattr(message, "id", None) for message in _messages(state)} - {None}
    for message in _messages(output):
        if id(message) in seen or getattr(message, "id", None) in seen_ids:
            continue
        tokens = _message_usage(message)
        if tokens is None:
            continue
        metadata = getattr(message, "response_metadata", None) or {}
        model = (metadata.get("model_name") or metadata.get("model")) if isinstance(metadata, Mapping) else None
        report_usage(tokens[0], tokens[1], model if isinstance(model, str) else None)


def reliable_node(
    func: Callable[..., Any] | None = None,
    *,
    step_id: str | None = None,
    contract: NodeContract | None = None,
) -> Any:
    """Make a LangGraph node function a Stroma step: ``builder.add_node("id", reliable_node(fn))``.

    Also a decorator (``@reliable_node(step_id="draft")``). The step id defaults to the function's
    name (to the contract's ``node_id`` with a *contract*). With a *contract*, the node receives
    its input validated as ``contract.input_schema`` and its output is validated against
    ``contract.output_schema``; what it returned still goes back to LangGraph as it was (a
    pydantic model as the fields it set). See the module docstring for the rules kept.
    """
    if func is None:
        return functools.partial(reliable_node, step_id=step_id, contract=contract)
    if getattr(func, "_stroma_langgraph", False):
        return func
    target: Callable[..., Any] = func
    name: str = contract.node_id if contract is not None else str(step_id or getattr(func, "__name__", "node"))
    signature, accepted = _wants(target)
    is_async = inspect.iscoroutinefunction(target)

    def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[ReliabilityContext, Any, Callable[[Any], Any]]:
        config = kwargs.get("config")
        runtime = kwargs.get("runtime")
        for injected in _INJECTED:
            if injected not in accepted:
                kwargs.pop(injected, None)
        ctx = _context_from(name, config, runtime)
        if contract is not None:
            ctx.registry.ensure(contract)
        state, rest = args[0], args[1:]

        def call(step_state: Any) -> Any:
            return target(step_state, *rest, **kwargs)

        return ctx, state, call

    async def body_for(ctx: ReliabilityContext, state: Any, call: Callable[[Any], Any]) -> Any:
        step_input = ctx.registry.validate_input(name, state) if contract is not None else state
        try:
            if is_async:
                output = await call(step_input)
            else:
                output = await asyncio.to_thread(call, step_input)
        except GraphBubbleUp as exc:
            return _BubbledUp(exc)
        if contract is not None and not isinstance(output, Command):
            ctx.registry.validate_output(name, output)
            if isinstance(output, BaseModel):
                output = output.model_dump(exclude_unset=True)
        _report_message_usage(output, state)
        return output

    def finish(result: ExecutionResult) -> Any:
        if result.status is RunStatus.COMPLETED:
            output = result.final_state
            if isinstance(output, _BubbledUp):
                raise output.exc
            return output
        raise StepNotCompleted(name, result)

    if is_async:

        async def async_node(*args: Any, **kwargs: Any) -> Any:
            ctx, state, call = prepare(args, dict(kwargs))

            async def body(step_state: Any) -> Any:
                return await body_for(ctx, step_state, call)

            return finish(await execute_step(name, body, state, ctx))

        wrapper: Callable[..., Any] = async_node
    else:

        def sync_node(*args: Any, **kwargs: Any) -> Any:
            ctx, state, call = prepare(args, dict(kwargs))

            async def body(step_state: Any) -> Any:
                return await body_for(ctx, step_state, call)

            return finish(_loop_thread.run(execute_step(name, body, state, ctx)))

        wrapper = sync_node

    functools.update_wrapper(wrapper, target)
    wrapper.__signature__ = _node_signature(signature)  # type: ignore[attr-defined]
    wrapper._stroma_langgraph = True  # type: ignore[attr-defined]
    wrapper._stroma_node_id = name  # type: ignore[attr-defined]
    wrapper._stroma_contract = contract  # type: ignore[attr-defined]
    return wrapper


def stroma_langgraph_node(node_id: str, contract: NodeContract | None = None) -> Callable[[F], F]:
    """The established decorator: ``@stroma_langgraph_node("draft", contract)`` makes the function
    a Stroma step (:func:`reliable_node`) that can be passed to ``add_node`` as it is, and that
    :meth:`LangGraphAdapter.wrap` recognises."""

    def decorator(func: F) -> F:
        wrapped: F = reliable_node(func, step_id=node_id, contract=contract)
        return wrapped

    return decorator


class LangGraphAdapter:
    """Turns the nodes of a ``StateGraph`` (before ``compile()``) into Stroma steps.

    ``LangGraphAdapter(registry=None, runner=None)`` keeps the established signature: contracts
    of wrapped nodes are also registered in *registry*; *runner* is accepted and unused (the
    run's context comes from the invoke config, see :func:`stroma_config`).
    """

    def __init__(self, registry: Any = None, runner: Any = None) -> None:
        self.registry = registry
        self.runner = runner

    def node_decorator(self, node_id: str, contract: NodeContract) -> Callable[..., Any]:
        """:func:`stroma_langgraph_node` (the :class:`~stroma.adapters.FrameworkAdapter` method)."""
        return stroma_langgraph_node(node_id, contract)

    def wrap(self, graph: Any, *, nodes: str | list[str] = "marked") -> Any:
        """Wrap the nodes of *graph* (a ``StateGraph``) in place and return it.

        *nodes*: ``"marked"`` (default) wraps nodes made with :func:`stroma_langgraph_node` /
        :func:`reliable_node` (checking them); ``"all"`` wraps every function node under its node
        name; a list wraps those nodes. Raises :class:`~stroma.errors.ConfigurationError` for a
        compiled graph (wrap the builder, then compile), an unknown node name, or a wrapped node
        that also has a LangGraph ``RetryPolicy`` (Stroma owns retries: one attempt count).
        """
        if not isinstance(graph, StateGraph):
            raise ConfigurationError(
                f"LangGraphAdapter.wrap takes a StateGraph before compile(), got {type(graph).__name__}; "
                "wrap the builder and compile it afterwards"
            )
        specs = graph.nodes
        if isinstance(nodes, list):
            unknown = sorted(set(nodes) - set(specs))
            if unknown:
                raise ConfigurationError(f"LangGraphAdapter.wrap: no node named {', '.join(map(repr, unknown))}")
        for node_name, spec in list(specs.items()):
            func = _node_function(spec.runnable)
            if func is None:
                continue
            marked = bool(getattr(func, "_stroma_langgraph", False))
            selected = marked or nodes == "all" or (isinstance(nodes, list) and node_name in nodes)
            if not selected:
                continue
            if spec.retry_policy:
                raise ConfigurationError(
                    f"LangGraph node {node_name!r} has a RetryPolicy and is a Stroma step: Stroma retries it by "
                    "failure class, so remove the RetryPolicy (or do not wrap the node) to keep one attempt count"
                )
            contract = getattr(func, "_stroma_contract", None)
            if contract is not None and self.registry is not None and contract.node_id not in self.registry:
                self.registry.register(contract)
            if marked:
                continue
            wrapped = reliable_node(func, step_id=node_name)
            specs[node_name] = dataclasses.replace(spec, runnable=_coerce(wrapped, node_name))
        return graph


def reliable_graph(compiled: Any, *, nodes: str | list[str] = "all") -> Any:
    """A copy of an already compiled graph whose *nodes* are Stroma steps; *compiled* is unchanged.

    For graphs a library builds and compiles for you, such as a DeepAgents agent
    (``create_deep_agent(...)``) or a LangChain ``create_agent`` agent: each call of their
    ``"model"`` node is then one step (the run's budget is checked before every model call, and
    the call's usage is read from the ``AIMessage`` it returns or from its GenAI span), and each
    tool call sent to ``"tools"`` is one step. *nodes* is as in :meth:`LangGraphAdapter.wrap`
    (``"all"`` by default; pass e.g. ``["model", "tools"]`` to leave middleware nodes alone).
    The copy is compiled from the graph's builder with the same checkpointer, store, cache,
    interrupts, name and default config. Raises :class:`~stroma.errors.ConfigurationError` for
    anything that is not a compiled ``StateGraph``.
    """
    builder = getattr(compiled, "builder", None)
    if not isinstance(builder, StateGraph):
        raise ConfigurationError(
            f"reliable_graph takes a compiled StateGraph (e.g. a deep agent), got {type(compiled).__name__}; "
            "for a StateGraph before compile() use LangGraphAdapter().wrap(builder)"
        )
    copy = copy_module.copy(builder)
    copy.nodes = dict(builder.nodes)
    LangGraphAdapter().wrap(copy, nodes=nodes)
    recompiled = copy.compile(
        checkpointer=compiled.checkpointer,
        cache=compiled.cache,
        store=compiled.store,
        interrupt_before=compiled.interrupt_before_nodes or None,
        interrupt_after=compiled.interrupt_after_nodes or None,
        debug=compiled.debug,
        name=compiled.name,
        transformers=getattr(compiled, "stream_transformers", None) or None,
    )
    return recompiled.with_config(compiled.config) if compiled.config else recompiled


def _node_function(runnable: Any) -> Callable[..., Any] | None:
    """The plain function behind a node's runnable (``None`` for subgraphs and other runnables)."""
    func = getattr(runnable, "func", None)
    if func is not None:
        # a sync node (its afunc only runs func in an executor)
        return func if callable(func) and not isinstance(func, functools.partial) else None
    afunc = getattr(runnable, "afunc", None)
    return afunc if inspect.iscoroutinefunction(afunc) else None


def _coerce(func: Callable[..., Any], name: str) -> Any:
    # what StateGraph.add_node does with a function (langgraph 1.x keeps it in an internal module)
    return coerce_to_runnable(func, name=name, trace=False)
