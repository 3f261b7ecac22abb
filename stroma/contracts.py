"""Step contracts: the pydantic schemas a step's input and output must satisfy.

A :class:`NodeContract` binds a step id to an input and an output schema. The
:class:`BoundaryValidator` checks a raw value against one side of a contract and raises
:class:`ContractViolation` when it does not fit; :class:`ContractRegistry` keeps the contracts of
a pipeline by step id.

Two rules shape this module:

* **No content in messages.** ``str(ContractViolation)`` names the step, the direction and the
  failing field paths with pydantic's message for each, never the values: messages end up in
  logs and span status, and step data may hold secrets. The offending value stays available to
  the caller on ``.raw``.
* **Malformed data is a violation, never a crash.** A value that is not a mapping or a model, a
  payload nested deeper than the validator's ``max_depth``, non-finite floats (NaN, ±inf) and
  pydantic's own recursion limit all raise :class:`ContractViolation`; a ``RecursionError`` never
  escapes. Non-finite floats are rejected by default because they cannot be written to a JSON
  checkpoint and read back through the same schema (design §3, improvement 9).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, RootModel, ValidationError

from stroma.errors import ConfigurationError, StromaError, validation_errors

__all__ = [
    "BoundaryValidator",
    "ContractRegistry",
    "ContractViolation",
    "Direction",
    "NodeContract",
    "StepContract",
    "StepViolation",
]

Direction = Literal["input", "output"]

_MAX_LISTED_ERRORS = 5
_MAX_MSG_CHARS = 200
_MAX_PATH_CHARS = 160
_MAX_PATH_PART_CHARS = 64
_MAX_LISTED_IDS = 20


@dataclass(frozen=True)
class NodeContract:
    """The schemas a step's input and output must satisfy.

    Args:
        node_id: the step id (non-empty).
        input_schema: a pydantic model class the step's input must validate against.
        output_schema: a pydantic model class the step's output must validate against.

    Raises:
        ConfigurationError: when ``node_id`` is empty or a schema is not a ``BaseModel`` subclass.

    Contracts are immutable and compare by value (the schema classes by identity), so
    :meth:`ContractRegistry.ensure` can tell whether a step's contract changed. Both
    ``NodeContract("search", Query, Result)`` and the keyword form work.
    """

    node_id: str
    input_schema: type[BaseModel]
    output_schema: type[BaseModel]

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id.strip():
            raise ConfigurationError(f"NodeContract.node_id must be a non-empty string, got {self.node_id!r}")
        for name in ("input_schema", "output_schema"):
            schema = getattr(self, name)
            if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
                raise ConfigurationError(
                    f"NodeContract.{name} for step {self.node_id!r} must be a pydantic BaseModel "
                    f"subclass, got {schema!r}"
                )

    def schema_for(self, direction: Direction) -> type[BaseModel]:
        """The schema of one side of the contract (``"input"`` or ``"output"``)."""
        if direction == "input":
            return self.input_schema
        if direction == "output":
            return self.output_schema
        raise ConfigurationError(f"contract direction must be 'input' or 'output', got {direction!r}")


StepContract = NodeContract


class ContractViolation(StromaError):
    """A step's input or output does not satisfy its contract.

    Attributes:
        node_id: the step whose boundary was crossed.
        direction: ``"input"`` or ``"output"``.
        raw: the value that failed, kept for the caller (never part of the message).
        errors: one dict per failing field with ``type``, ``loc`` (the field path) and ``msg``.
            Errors produced by :class:`BoundaryValidator` carry no input values either.

    ``str()`` lists the first five failing field paths with their messages, then
    ``"... and N more"``; paths and messages are clipped so the text stays short. A path is
    made of field names, list indexes and, inside ``dict`` fields, the data's own keys. The
    classifier treats a violation as ``TERMINAL``: the same input fails the same way on every
    attempt.
    """

    def __init__(self, node_id: str, direction: Direction, raw: Any, errors: list[Any]) -> None:
        self.node_id = node_id
        self.direction = direction
        self.raw = raw
        self.errors = list(errors)
        super().__init__(self._render())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.node_id, self.direction, self.raw, self.errors))

    def __str__(self) -> str:
        return self._render()

    def _render(self) -> str:
        count = len(self.errors)
        head = f"Contract violation in step {self.node_id!r} ({self.direction})"
        if count == 0:
            return f"{head}: the value does not satisfy the {self.direction} schema"
        parts = [_describe_error(error) for error in self.errors[:_MAX_LISTED_ERRORS]]
        text = "; ".join(parts)
        if count > _MAX_LISTED_ERRORS:
            text += f"; ... and {count - _MAX_LISTED_ERRORS} more"
        noun = "error" if count == 1 else "errors"
        return f"{head}: {count} {noun}: {text}"


StepViolation = ContractViolation


def _describe_error(error: Any) -> str:
    """``"path.to.field: message"`` for one error, bounded in size, without the input value."""
    if isinstance(error, Mapping):
        loc = error.get("loc", ())
        msg = error.get("msg", "invalid")
    else:
        loc, msg = (), type(error).__name__
    if isinstance(loc, (str, int)):
        loc = (loc,)
    try:
        path = ".".join(_clip(str(part), _MAX_PATH_PART_CHARS) for part in loc) or "<root>"
    except TypeError:
        path = "<root>"
    return f"{_clip_middle(path, _MAX_PATH_CHARS)}: {_clip(str(msg), _MAX_MSG_CHARS)}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip_middle(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return text[:keep] + "…" + text[-keep:]


def _error(kind: str, msg: str, loc: tuple[str | int, ...] = ()) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg}


class BoundaryValidator:
    """Validates a value against one side of a :class:`NodeContract`.

    Args:
        max_depth: deepest nesting accepted in a validated value (containers inside
            containers); deeper values are a violation. Bounds what later JSON encoding,
            checkpointing and telemetry must walk. Default 200.
        allow_non_finite: accept NaN and ±inf floats (and non-finite ``Decimal``). Off by
            default: such values survive pydantic's float validation but not a JSON round trip.

    Calling the validator returns the schema instance, or raises :class:`ContractViolation`.
    It holds no per-call state and is safe to share between tasks and threads.
    """

    __slots__ = ("allow_non_finite", "max_depth")

    def __init__(self, *, max_depth: int = 200, allow_non_finite: bool = False) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ConfigurationError(f"BoundaryValidator.max_depth must be an integer >= 1, got {max_depth!r}")
        self.max_depth = max_depth
        self.allow_non_finite = bool(allow_non_finite)

    def __call__(self, contract: NodeContract, direction: Direction, raw: Any) -> BaseModel:
        """Validate *raw* against ``contract``'s *direction* schema.

        *raw* may be:

        * an instance of the schema (or a subclass): revalidated against its own class, as
          pydantic's ``revalidate_instances="always"`` does (its fields are validated again,
          without a dump round trip), so an instance made invalid by ``model_construct()`` or by
          assignment without ``validate_assignment`` is a violation here, not a checkpoint that
          can never be read back. The instance itself is returned when validation changed
          nothing, else the validated copy (same class, fields set and private attributes kept);
        * another pydantic model: its ``model_dump()`` is validated;
        * a mapping: validated with ``schema.model_validate``.

        Anything else, and every validation failure, raises :class:`ContractViolation` (chained
        from pydantic's ``ValidationError`` or the ``RecursionError`` when there is one).
        """
        schema = contract.schema_for(direction)
        node_id = contract.node_id
        try:
            if isinstance(raw, schema):
                model = _revalidate_instance(raw)
                if model.__dict__ == raw.__dict__ and model.__pydantic_extra__ == raw.__pydantic_extra__:
                    model = raw  # nothing was coerced: keep the caller's object
                self._check_values(node_id, direction, raw, model)
                return model
            if isinstance(raw, BaseModel):
                data: Any = raw.model_dump()
            elif isinstance(raw, dict):
                data = raw
            elif isinstance(raw, Mapping):
                data = dict(raw)
            else:
                msg = f"expected a mapping or a {schema.__name__} instance, got {type(raw).__name__}"
                raise ContractViolation(node_id, direction, raw, [_error("model_type", msg)])
            validated: BaseModel = schema.__pydantic_validator__.validate_python(data)  # = model_validate(data)
            model = validated
        except ValidationError as exc:
            raise ContractViolation(node_id, direction, raw, validation_errors(exc)) from exc
        except RecursionError as exc:
            msg = "the value is nested too deeply to validate"
            raise ContractViolation(node_id, direction, raw, [_error("recursion", msg)]) from exc
        self._check_values(node_id, direction, raw, model)
        return model

    def _check_values(self, node_id: str, direction: Direction, raw: Any, model: BaseModel) -> None:
        plan = _scan_plan(type(model))
        if plan is not None:
            # The schema bounds the shape: only its float fields can hold NaN/inf, and nothing
            # nests beyond the schema's own (non-recursive) structure.
            if self.allow_non_finite or not plan:
                return
            values = model.__dict__
            for name in plan:
                value = values.get(name)
                if type(value) is float and not math.isfinite(value):
                    break
            else:
                return
        elif _scan_ok(model, self.max_depth, self.allow_non_finite):
            return
        errors = _scan_errors(model, self.max_depth, self.allow_non_finite)
        raise ContractViolation(node_id, direction, raw, errors)


_VALIDATE_BY_NAME = "by_name" in inspect.signature(BaseModel.model_validate).parameters  # pydantic >= 2.11


def _revalidate_instance(raw: BaseModel) -> BaseModel:
    """Validate the fields of *raw* again with its own class; return the validated copy.

    The field values are validated directly (no serialisation). Should that fail for an
    instance whose dump does validate (a model whose ``mode="before"`` validator expects its
    own input shape), the dump's validation decides, so a valid instance is never refused.
    Raises pydantic's ``ValidationError`` for an invalid instance.
    """
    cls = type(raw)
    if isinstance(raw, RootModel):
        return cls.model_validate(raw.root)
    data = dict(raw.__dict__)
    extra = raw.__pydantic_extra__
    if extra:
        data.update(extra)
    try:
        if _VALIDATE_BY_NAME:
            model: BaseModel = cls.__pydantic_validator__.validate_python(data, by_name=True)
        else:
            model = cls.model_validate(_keyed_by_alias(cls, data))
    except ValidationError as invalid:
        try:
            dumped = raw.model_dump(warnings=False)
        except Exception:
            raise invalid from None
        model = cls.model_validate(dumped)
    object.__setattr__(model, "__pydantic_fields_set__", set(raw.__pydantic_fields_set__))
    private = raw.__pydantic_private__
    if private:
        object.__setattr__(model, "__pydantic_private__", dict(private))
    return model


def _keyed_by_alias(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """*data* with each field's value under the name validation expects (its alias, if any)."""
    keyed = dict(data)
    for name, info in cls.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        if alias and alias != name and name in keyed and not cls.model_config.get("populate_by_name"):
            keyed[alias] = keyed.pop(name)
    return keyed


_LEAF_TYPES: frozenset[type] = frozenset({str, int, bool, type(None), bytes})
_plans: dict[type[BaseModel], tuple[str, ...] | None] = {}


def _leaf_annotation(annotation: Any) -> bool:
    """Whether values of *annotation* are leaves or flat containers of leaves (no float inside)."""
    if annotation in _LEAF_TYPES:
        return True
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, frozenset, dict, typing.Union, types.UnionType, Literal):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        if origin is Literal:
            return all(type(a) in _LEAF_TYPES for a in args)
        return all(a in _LEAF_TYPES for a in args)
    return False


def _scan_plan(schema: type[BaseModel]) -> tuple[str, ...] | None:
    """Per schema, once: the names of its ``float`` fields when every other field is a leaf or a
    flat container of leaves (so only those fields need the finiteness check); ``None`` when the
    schema can hold arbitrary nesting (nested models, ``Any``, ``dict[str, Any]``, extras, ...),
    which then gets the full scan."""
    try:
        return _plans[schema]
    except KeyError:
        pass
    floats: list[str] = []
    plan: tuple[str, ...] | None
    if schema.model_config.get("extra") == "allow":
        plan = None
    else:
        plan = ()
        for name, info in schema.model_fields.items():
            annotation = info.annotation
            if annotation is float:
                floats.append(name)
            elif not _leaf_annotation(annotation):
                plan = None
                break
        if plan is not None:
            plan = tuple(floats)
    if len(_plans) < 4096:
        _plans[schema] = plan
    return plan


def _child_items(value: Any) -> list[tuple[str | int, Any]] | None:
    """The (key, child) pairs of a container, or ``None`` for a leaf (slow path only)."""
    if isinstance(value, BaseModel):
        items: list[tuple[str | int, Any]] = list(value.__dict__.items())
        if value.__pydantic_extra__:
            items.extend(value.__pydantic_extra__.items())
        return items
    if isinstance(value, Mapping):
        return [(str(key), child) for key, child in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(enumerate(value))
    return None


def _is_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Decimal):
        return not value.is_finite()
    return False


def _scan_ok(root: Any, max_depth: int, allow_non_finite: bool) -> bool:
    """Fast check, no paths: fewer than *max_depth* nested containers and no non-finite number.

    Walks level by level (no Python recursion, so depth costs no stack); a container reached
    twice (shared or cyclic references) is walked once. This runs on every validation, so the
    common leaf types are skipped by an exact type test before anything slower.
    """
    level: list[Any] = [root]
    seen: set[int] = set()
    depth = 0
    while level:
        following: list[Any] = []
        for value in level:
            kind = type(value)
            if kind in _LEAF_TYPES:
                continue
            if kind is float:
                if not allow_non_finite and not math.isfinite(value):
                    return False
                continue
            if id(value) in seen:
                continue
            if kind is dict:
                children: Any = value.values()
            elif kind is list or kind is tuple:
                children = value
            elif isinstance(value, BaseModel):
                children = value.__dict__.values()
                if value.__pydantic_extra__:
                    following.extend(value.__pydantic_extra__.values())
            elif isinstance(value, Mapping):
                children = value.values()
            elif isinstance(value, (list, tuple, set, frozenset)):
                children = value
            else:
                if not allow_non_finite and _is_non_finite(value):
                    return False
                continue
            if depth >= max_depth:
                return False
            seen.add(id(value))
            following.extend(children)
        level = following
        depth += 1
    return True


def _scan_errors(root: Any, max_depth: int, allow_non_finite: bool) -> list[dict[str, Any]]:
    """Slow path of :func:`_scan_ok`, same walk: the errors with their field paths (a few)."""
    errors: list[dict[str, Any]] = []
    level: list[tuple[Any, tuple[str | int, ...]]] = [(root, ())]
    seen: set[int] = set()
    depth = 0
    while level and len(errors) <= _MAX_LISTED_ERRORS * 4:
        following: list[tuple[Any, tuple[str | int, ...]]] = []
        for value, path in level:
            items = _child_items(value)
            if items is None:
                if not allow_non_finite and _is_non_finite(value):
                    errors.append(_error("finite_number", "Input should be a finite number", path))
                continue
            if id(value) in seen:
                continue
            if depth >= max_depth:
                msg = f"the value is nested more than {max_depth} levels deep"
                errors.append(_error("too_deep", msg, (*path[:8], "…")))
                continue
            seen.add(id(value))
            following.extend((child, (*path, key)) for key, child in items)
        level = following
        depth += 1
    return errors or [_error("invalid", "the value failed the boundary checks")]


class ContractRegistry:
    """The contracts of a pipeline, by step id.

    Args:
        contracts: contracts to register up front.
        validator: the :class:`BoundaryValidator` used by :meth:`validate_input` and
            :meth:`validate_output` (default: one with default settings).

    Registering is a dict assignment, so a registry may be shared between tasks. It grows with
    the number of distinct step ids, not with the number of steps run.
    """

    def __init__(self, contracts: Iterable[NodeContract] = (), *, validator: BoundaryValidator | None = None) -> None:
        self._contracts: dict[str, NodeContract] = {}
        self._validator = validator if validator is not None else BoundaryValidator()
        for contract in contracts:
            self.register(contract)

    @property
    def validator(self) -> BoundaryValidator:
        """The validator this registry applies."""
        return self._validator

    def register(self, contract: NodeContract) -> None:
        """Register *contract*, replacing any contract registered under the same step id.

        Raises ``TypeError`` when *contract* is not a :class:`NodeContract`.
        """
        if not isinstance(contract, NodeContract):
            raise TypeError(f"ContractRegistry.register expects a NodeContract, got {type(contract).__name__}")
        self._contracts[contract.node_id] = contract

    def ensure(self, contract: NodeContract) -> NodeContract:
        """Register *contract* unless an equal one is already registered; return *contract*.

        A different contract under the same step id is replaced: the contract a caller passes
        to ``execute_step`` is the one its data is validated against (design §3, improvement 3).
        """
        registered = self._contracts.get(contract.node_id)
        if registered is not contract and registered != contract:
            self.register(contract)
        return contract

    def get(self, node_id: str) -> NodeContract:
        """The contract of *node_id*.

        Raises ``KeyError`` naming the step and listing the registered step ids.
        """
        try:
            return self._contracts[node_id]
        except KeyError:
            known = sorted(self._contracts)
            listed = ", ".join(repr(k) for k in known[:_MAX_LISTED_IDS]) or "none"
            if len(known) > _MAX_LISTED_IDS:
                listed += f", ... and {len(known) - _MAX_LISTED_IDS} more"
            raise KeyError(
                f"no contract registered for step {node_id!r}; registered steps: {listed}. "
                "Register it with ContractRegistry.register(NodeContract(...))."
            ) from None

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._contracts

    def __len__(self) -> int:
        return len(self._contracts)

    def __iter__(self) -> Iterator[NodeContract]:
        return iter(list(self._contracts.values()))

    def node_ids(self) -> list[str]:
        """The registered step ids, in registration order."""
        return list(self._contracts)

    def validate_input(self, node_id: str, raw: Any) -> BaseModel:
        """Validate *raw* against the input schema of *node_id* (see :class:`BoundaryValidator`)."""
        return self._validator(self.get(node_id), "input", raw)

    def validate_output(self, node_id: str, raw: Any) -> BaseModel:
        """Validate *raw* against the output schema of *node_id* (see :class:`BoundaryValidator`)."""
        return self._validator(self.get(node_id), "output", raw)
