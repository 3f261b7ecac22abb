"""What a pipeline is made of: marked step functions, parallel stages, and the run plan.

A *node* is a callable marked with a step id and a :class:`~stroma.contracts.NodeContract`
(``stroma_node``, ``StromaRunner.node``); :func:`parallel` groups nodes into one *stage* whose
children run concurrently. :func:`build_plan` turns the list a user passes to
``StromaRunner.run`` into :class:`Plan`: validated once per run, before anything runs.

Merging a parallel stage's outputs (the documented rule): each child's output is validated
against its own contract first; then the validated outputs are combined field by field in
*argument order* (not completion order, so the result is deterministic). When two children set
the same field, ``on_conflict="last"`` (the default, as in the established API) keeps the value
of the child listed later; ``on_conflict="error"`` fails the stage when the values differ (equal
values are fine). The merged state is an instance of a model whose fields are the union of the
children's output schemas, so the next step validates it like any other state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, RootModel, create_model
from pydantic.fields import FieldInfo

from stroma._ids import RESERVED_PREFIX
from stroma.checkpoint import manifest_entry
from stroma.contracts import ContractRegistry, NodeContract
from stroma.errors import ConfigurationError

ConflictRule = Literal["last", "error"]

_NODE_ID_ATTR = "_stroma_node_id"
_CONTRACT_ATTR = "_stroma_contract"


def mark_node(func: Callable[..., Any], node_id: str, contract: NodeContract) -> Callable[..., Any]:
    """Attach *node_id* and *contract* to *func* and return it (or a thin wrapper).

    The function itself is returned unchanged when it accepts attributes; callables that do not
    (bound methods, builtins) are wrapped in a pass-through function that keeps their signature
    visible to ``inspect.signature`` (so a second "context" parameter is still detected).
    """
    if not callable(func):
        raise TypeError(f"step {node_id!r}: expected a function, got {type(func).__name__}")
    try:
        setattr(func, _NODE_ID_ATTR, node_id)
        setattr(func, _CONTRACT_ATTR, contract)
    except (AttributeError, TypeError):
        target = func

        @functools.wraps(target)
        def passthrough(*args: Any) -> Any:
            return target(*args)

        setattr(passthrough, _NODE_ID_ATTR, node_id)
        setattr(passthrough, _CONTRACT_ATTR, contract)
        return passthrough
    return func


@dataclass(frozen=True)
class StepSpec:
    """One step of a plan: its id, the user's function and the contract it is validated against."""

    step_id: str
    func: Callable[..., Any]
    contract: NodeContract


class ParallelGroup:
    """A stage whose children run concurrently; create it with :func:`parallel`.

    Keeps the attributes the established API exposed (``_stroma_node_id`` =
    ``"parallel(a, b)"``, ``_stroma_is_parallel``, ``_stroma_child_nodes``). It is not callable:
    only a runner executes it, each child as a step of its own. Groups are values: two groups
    of the same nodes and options are equal.
    """

    __slots__ = ("max_concurrency", "nodes", "on_conflict")

    _stroma_is_parallel = True

    def __init__(
        self, nodes: tuple[Callable[..., Any], ...], max_concurrency: int | None, on_conflict: ConflictRule
    ) -> None:
        self.nodes = nodes
        self.max_concurrency = max_concurrency
        self.on_conflict: ConflictRule = on_conflict

    @property
    def _stroma_child_nodes(self) -> tuple[Callable[..., Any], ...]:
        return self.nodes

    @property
    def _stroma_node_id(self) -> str:
        ids = ", ".join(str(getattr(node, _NODE_ID_ATTR, "?")) for node in self.nodes)
        return f"parallel({ids})"

    def _key(self) -> tuple[Any, ...]:
        return (self.nodes, self.max_concurrency, self.on_conflict)

    def __eq__(self, other: object) -> bool:
        # A value: `parallel(b, c)` written inline in every run() call is the same stage each time.
        return isinstance(other, ParallelGroup) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        extra = f", max_concurrency={self.max_concurrency}" if self.max_concurrency is not None else ""
        return f"{self._stroma_node_id[:-1]}{extra}, on_conflict={self.on_conflict!r})"


def parallel(
    *nodes: Callable[..., Any],
    max_concurrency: int | None = None,
    on_conflict: ConflictRule = "last",
) -> ParallelGroup:
    """A pipeline stage that runs *nodes* concurrently on the same input state.

    Each child is a step of its own (its own ``step`` span, contract check, retries, cost and
    budget accounting and checkpoint). When a child fails terminally (status ``FAILED``), its
    running siblings are cancelled (their spans end as interrupted) and the stage fails; a child
    that stops otherwise (retries exhausted, budget reached) lets its siblings finish, so their
    checkpoints are kept and a resume re-runs only what did not complete. When every child
    completed, their validated outputs are merged (see the module docs: argument order,
    *on_conflict* ``"last"`` or ``"error"``).

    *max_concurrency* bounds how many children run at once (``None``: all). Raises
    :class:`~stroma.errors.ConfigurationError` for no nodes, a nested ``parallel``, a
    non-callable node, ``max_concurrency < 1`` or an unknown *on_conflict*.
    """
    if not nodes:
        raise ConfigurationError("parallel() needs at least one node")
    for index, node in enumerate(nodes):
        if isinstance(node, ParallelGroup):
            raise ConfigurationError(
                f"parallel(): argument {index} is itself a parallel stage; nesting is not supported, "
                "list its nodes in one parallel() instead"
            )
        if not callable(node):
            raise ConfigurationError(f"parallel(): argument {index} is not a step function: {node!r}")
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
    ):
        raise ConfigurationError(
            f"parallel(max_concurrency=...) must be an integer >= 1 or None, got {max_concurrency!r}"
        )
    if on_conflict not in ("last", "error"):
        raise ConfigurationError(f"parallel(on_conflict=...) must be 'last' or 'error', got {on_conflict!r}")
    return ParallelGroup(tuple(nodes), max_concurrency, on_conflict)


@dataclass(frozen=True)
class Stage:
    """One position of the pipeline: a single step, or a parallel group of steps."""

    index: int
    steps: tuple[StepSpec, ...]
    group: ParallelGroup | None
    output_schema: type[BaseModel]

    @property
    def is_parallel(self) -> bool:
        return self.group is not None


@dataclass(frozen=True)
class Plan:
    """A validated pipeline: stages in order and every step id (children included)."""

    stages: tuple[Stage, ...]
    step_ids: tuple[str, ...]

    @functools.cached_property
    def identity(self) -> tuple[dict[str, Any], ...]:
        """What identifies this pipeline in a run manifest: per step, in order, its id, output
        schema (name and fingerprint), stage and position in the stage. Computed once per plan;
        the dicts must not be modified."""
        return tuple(
            {**manifest_entry(step.step_id, step.contract.output_schema), "stage": stage.index, "position": position}
            for stage in self.stages
            for position, step in enumerate(stage.steps)
        )

    @functools.cached_property
    def feed_problems(self) -> tuple[tuple[int, str], ...]:
        """``(stage index, message)`` for each stage whose input the stage before cannot supply.

        See :func:`feed_problem` for the rule; computed once per plan.
        """
        found = []
        for before, stage in zip(self.stages, self.stages[1:], strict=False):
            for step in stage.steps:
                problem = feed_problem(before, step)
                if problem is not None:
                    found.append((stage.index, problem))
        return tuple(found)

    def check_feeds(self, first_stage: int = 0) -> None:
        """Raise :class:`~stroma.errors.ConfigurationError` when a stage after *first_stage* needs
        an input field that the stage before it never outputs (issue 8 C14).

        Called before anything runs, so a pipeline that cannot work is refused before its
        first step is paid for. The message names both steps and the field.
        """
        problems = [message for index, message in self.feed_problems if index > first_stage]
        if problems:
            raise ConfigurationError(
                "; ".join(problems) + ". A step's input is the validated output of the stage before it (the "
                "initial state feeds only the first stage, and the context dict is passed beside the input, "
                "never merged into it). Nothing was run: add the field to the earlier output schema, or give "
                "it a default in the input schema"
            )

    def stage_of(self, step_id: str) -> Stage:
        for stage in self.stages:
            if any(step.step_id == step_id for step in stage.steps):
                return stage
        raise KeyError(step_id)


def _output_keys(schema: type[BaseModel]) -> set[str] | None:
    """The keys ``schema(...).model_dump()`` always has, or ``None`` when that cannot be known
    (extra fields allowed, a custom serializer, a root model)."""
    if schema.model_config.get("extra") == "allow" or issubclass(schema, RootModel):
        return None
    if schema.__pydantic_decorators__.model_serializers:
        return None
    keys: set[str] = set()
    for name, info in schema.model_fields.items():
        if not info.exclude:
            keys.add(name)  # and its aliases: a model may serialize by alias
            keys.update(a for a in (info.alias, info.serialization_alias) if isinstance(a, str))
    keys.update(schema.model_computed_fields)
    return keys


def _input_names(name: str, info: FieldInfo) -> set[str] | None:
    """The keys that can supply input field *name*, or ``None`` when that cannot be known."""
    names = {name}
    for alias in (info.alias, info.validation_alias):
        if isinstance(alias, str):
            names.add(alias)
        elif alias is not None:  # AliasChoices / AliasPath
            return None
    return names


def feed_problem(before: Stage, step: StepSpec) -> str | None:
    """Why *before*'s output cannot be *step*'s input, or ``None`` when it can (or may).

    The rule, from how the runner passes state: *step* gets the previous stage's validated
    output (a parallel stage: the union of its children's outputs), dumped with ``model_dump()``
    and validated against *step*'s input schema. A required input field (no default) that none
    of those outputs has, under its name or alias, would fail the input contract on every run.
    Only certain failures are reported: an output that allows extra fields, custom serializers,
    ``model_validator(mode="before"/"wrap")`` on the input, or alias choices skip the check.
    """
    schema = step.contract.input_schema
    if any(issubclass(s.contract.output_schema, schema) for s in before.steps):
        return None  # an instance of the input schema is passed as is
    if issubclass(schema, RootModel) or any(
        d.info.mode in ("before", "wrap") for d in schema.__pydantic_decorators__.model_validators.values()
    ):
        return None
    provided: set[str] = set()
    for earlier in before.steps:
        keys = _output_keys(earlier.contract.output_schema)
        if keys is None:
            return None
        provided |= keys
    missing = []
    for name, info in schema.model_fields.items():
        if not info.is_required():
            continue
        names = _input_names(name, info)
        if names is not None and not names & provided:
            missing.append(name)
    if not missing:
        return None
    if before.group is None:
        source = f"the output of step {before.steps[0].step_id!r} ({before.output_schema.__name__})"
    else:
        ids = ", ".join(repr(s.step_id) for s in before.steps)
        schemas = ", ".join(s.contract.output_schema.__name__ for s in before.steps)
        source = f"the merged output of parallel steps {ids} ({schemas})"
    fields = ", ".join(repr(m) for m in missing)
    noun = "field" if len(missing) == 1 else "fields"
    return f"step {step.step_id!r} needs input {noun} {fields} ({schema.__name__}), which {source} does not have"


def _resolve_step(node: Any, registry: ContractRegistry, where: str) -> StepSpec:
    if not callable(node):
        raise ConfigurationError(f"{where} is not a step function: {node!r}")
    node_id = getattr(node, _NODE_ID_ATTR, None)
    if getattr(node, "_stroma_runs_step", False):
        raise ConfigurationError(
            f"{where} ({node_id}) was wrapped by StromaStep.wrap, which already runs execute_step; pass the "
            "function itself (its __wrapped__), decorated with @runner.node or @stroma_node"
        )
    if not isinstance(node_id, str) or not node_id:
        name = getattr(node, "__qualname__", None) or repr(node)
        raise ConfigurationError(
            f"{where} ({name}) has no step id; decorate it with @runner.node(id, input=..., output=...) "
            "or @stroma_node(id, NodeContract(...))"
        )
    if node_id.startswith(RESERVED_PREFIX):
        raise ConfigurationError(f"{where}: step ids starting with {RESERVED_PREFIX!r} are reserved")
    contract = getattr(node, _CONTRACT_ATTR, None)
    if contract is None and node_id in registry:
        contract = registry.get(node_id)
    if not isinstance(contract, NodeContract):
        raise ConfigurationError(
            f"step {node_id!r} has no contract; decorate it with @runner.node({node_id!r}, input=..., "
            "output=...) or register a NodeContract for it in the runner's registry"
        )
    if contract.node_id != node_id:
        raise ConfigurationError(
            f"step {node_id!r} carries the contract of step {contract.node_id!r}; a step's contract must "
            "have the same node_id"
        )
    return StepSpec(node_id, node, contract)


class PlanCache:
    """Plans of pipelines already run, so a runner validates a pipeline once, not on every run.

    A cached plan is reused only while every node still carries the id and contract it had
    (plans whose contracts came from the registry are not cached). Bounded: at most
    *max_plans* pipelines are kept.
    """

    def __init__(self, max_plans: int = 64) -> None:
        self._plans: dict[tuple[Any, ...], tuple[Plan, tuple[tuple[Any, Any], ...]]] = {}
        self._max = max_plans

    @staticmethod
    def _marks(plan: Plan) -> tuple[tuple[Any, Any], ...]:
        return tuple(
            (getattr(step.func, _NODE_ID_ATTR, None), getattr(step.func, _CONTRACT_ATTR, None))
            for stage in plan.stages
            for step in stage.steps
        )

    def plan(self, nodes: Sequence[Any] | Iterable[Any], registry: ContractRegistry) -> Plan:
        """The plan of *nodes* (see :func:`build_plan`), from the cache when still valid."""
        try:
            key = tuple(nodes)
            cached = self._plans.get(key)
        except TypeError:  # not iterable, or an unhashable node: let build_plan report it
            return build_plan(nodes, registry)
        if cached is not None and self._marks(cached[0]) == cached[1]:
            return cached[0]
        plan = build_plan(key, registry)
        marks = self._marks(plan)
        if all(contract is step.contract for (_, contract), step in zip(marks, _steps(plan), strict=True)):
            if len(self._plans) >= self._max:
                self._plans.clear()
            self._plans[key] = (plan, marks)
        return plan


def _steps(plan: Plan) -> Iterable[StepSpec]:
    for stage in plan.stages:
        yield from stage.steps


def build_plan(nodes: Sequence[Any] | Iterable[Any], registry: ContractRegistry) -> Plan:
    """Resolve *nodes* into a :class:`Plan`.

    Raises :class:`~stroma.errors.ConfigurationError` naming the position for a node without a
    step id or contract, and for a step id used twice (checkpoints and per-step settings are
    keyed by step id, so ids must be unique within a pipeline).
    """
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
        raise ConfigurationError(f"run() expects a list of nodes, got {type(nodes).__name__}")
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    for index, node in enumerate(nodes):
        if isinstance(node, ParallelGroup):
            steps = tuple(
                _resolve_step(child, registry, f"node {index}, parallel child {position}")
                for position, child in enumerate(node.nodes)
            )
            stage = Stage(index, steps, node, merged_schema(tuple(s.contract.output_schema for s in steps)))
        else:
            step = _resolve_step(node, registry, f"node {index}")
            stage = Stage(index, (step,), None, step.contract.output_schema)
        for step in stage.steps:
            if step.step_id in seen:
                raise ConfigurationError(
                    f"step id {step.step_id!r} appears twice in the pipeline (nodes {seen[step.step_id]} and "
                    f"{index}); step ids must be unique within a pipeline"
                )
            seen[step.step_id] = index
        stages.append(stage)
    return Plan(tuple(stages), tuple(seen))


# --- merging parallel outputs -------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def merged_schema(schemas: tuple[type[BaseModel], ...]) -> type[BaseModel]:
    """The model of a parallel stage's merged output: the union of *schemas*' fields.

    A field defined by several schemas takes the definition of the one listed last (matching
    the ``"last"`` merge rule). Extra fields of ``extra="allow"`` outputs are kept. The class is
    built once per combination of schemas (bounded cache).
    """
    if len(schemas) == 1:
        return schemas[0]
    fields: dict[str, Any] = {}
    for schema in schemas:
        for name, info in schema.model_fields.items():
            fields[name] = (info.annotation, info)
    name = "Parallel[" + ",".join(schema.__name__ for schema in schemas) + "]"
    model: type[BaseModel] = create_model(name, __config__=ConfigDict(extra="allow"), **fields)
    return model
