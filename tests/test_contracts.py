"""Contracts: NodeContract validation, BoundaryValidator behaviour on good and hostile data,
ContractViolation messages (never the values), and the ContractRegistry."""

from __future__ import annotations

import math
import pickle
import time
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stroma.contracts import (
    BoundaryValidator,
    ContractRegistry,
    ContractViolation,
    NodeContract,
    StepContract,
    StepViolation,
)
from stroma.errors import ConfigurationError, StromaError

CANARY = "CANARY-7f3a9c-SECRET"


class Doc(BaseModel):
    text: str
    lang: str = "en"


class Item(BaseModel):
    name: str
    score: float


class Summary(BaseModel):
    title: str
    words: int
    items: list[Item] = Field(default_factory=list)


class Bag(BaseModel):
    data: Any = None


class Node(BaseModel):
    child: Node | None = None


class Other(BaseModel):
    title: str
    words: int


@pytest.fixture
def contract() -> NodeContract:
    return NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary)


@pytest.fixture
def validator() -> BoundaryValidator:
    return BoundaryValidator()


# --- NodeContract ------------------------------------------------------------------------------


def test_contract_keyword_and_positional_construction_are_equal() -> None:
    by_keyword = NodeContract(node_id="a", input_schema=Doc, output_schema=Summary)
    by_position = NodeContract("a", Doc, Summary)
    assert by_keyword == by_position
    assert hash(by_keyword) == hash(by_position)
    assert StepContract is NodeContract
    assert StepViolation is ContractViolation


def test_contract_is_immutable() -> None:
    contract = NodeContract("a", Doc, Summary)
    with pytest.raises(AttributeError):
        contract.node_id = "b"  # type: ignore[misc]


@pytest.mark.parametrize("node_id", ["", "   ", None, 3])
def test_contract_rejects_empty_node_id(node_id: Any) -> None:
    with pytest.raises(ConfigurationError, match="node_id") as info:
        NodeContract(node_id, Doc, Summary)
    assert isinstance(info.value, ValueError)
    assert repr(node_id) in str(info.value)


@pytest.mark.parametrize(
    ("field", "bad"),
    [("input_schema", dict), ("output_schema", Summary(title="t", words=1)), ("input_schema", "Doc")],
)
def test_contract_rejects_non_model_schemas(field: str, bad: Any) -> None:
    kwargs: dict[str, Any] = {"node_id": "a", "input_schema": Doc, "output_schema": Summary, field: bad}
    with pytest.raises(ConfigurationError, match=field) as info:
        NodeContract(**kwargs)
    assert "'a'" in str(info.value)


# --- BoundaryValidator: accepted values --------------------------------------------------------


def test_valid_dict_returns_schema_instance(contract: NodeContract, validator: BoundaryValidator) -> None:
    result = validator(contract, "output", {"title": "T", "words": 3})
    assert isinstance(result, Summary)
    assert result.words == 3


def test_instance_of_schema_is_returned_as_is(contract: NodeContract, validator: BoundaryValidator) -> None:
    instance = Summary(title="T", words=3)
    assert validator(contract, "output", instance) is instance


def test_other_model_is_validated_through_its_dump(contract: NodeContract, validator: BoundaryValidator) -> None:
    result = validator(contract, "output", Other(title="T", words=2))
    assert isinstance(result, Summary)
    assert (result.title, result.words) == ("T", 2)
    with pytest.raises(ContractViolation, match="words"):
        validator(contract, "output", Doc(text="hello"))


def test_non_dict_mapping_is_accepted(contract: NodeContract, validator: BoundaryValidator) -> None:
    result = validator(contract, "input", MappingProxyType({"text": "hi"}))
    assert isinstance(result, Doc)


@pytest.mark.parametrize("raw", [None, 42, "a string", ["title", "words"], (1, 2), object()])
def test_non_mapping_is_a_violation_not_a_crash(contract: NodeContract, validator: BoundaryValidator, raw: Any) -> None:
    with pytest.raises(ContractViolation) as info:
        validator(contract, "output", raw)
    violation = info.value
    assert violation.raw is raw
    assert violation.errors[0]["type"] == "model_type"
    message = str(violation)
    assert "'summarize'" in message and "output" in message
    assert f"got {type(raw).__name__}" in message


def test_bad_direction_is_a_configuration_error(contract: NodeContract, validator: BoundaryValidator) -> None:
    with pytest.raises(ConfigurationError, match="direction"):
        validator(contract, "sideways", {})  # type: ignore[arg-type]


# --- ContractViolation messages ----------------------------------------------------------------


def test_malformed_output_names_step_direction_and_field_paths(
    contract: NodeContract, validator: BoundaryValidator
) -> None:
    raw = {"title": 123, "words": CANARY, "items": [{"name": "x", "score": CANARY}]}
    with pytest.raises(ContractViolation) as info:
        validator(contract, "output", raw)
    violation = info.value
    message = str(violation)
    assert message.startswith("Contract violation in step 'summarize' (output)")
    assert "title:" in message
    assert "words:" in message
    assert "items.0.score:" in message
    assert CANARY not in message
    assert CANARY not in repr(violation)
    assert all("input" not in error for error in violation.errors)
    assert violation.raw is raw
    assert violation.node_id == "summarize" and violation.direction == "output"
    assert isinstance(violation, StromaError)
    assert isinstance(violation.__cause__, Exception)


def test_missing_fields_are_named(contract: NodeContract, validator: BoundaryValidator) -> None:
    with pytest.raises(ContractViolation) as info:
        validator(contract, "input", {"lang": CANARY})
    assert "text: Field required" in str(info.value)
    assert CANARY not in str(info.value)


def test_custom_validator_context_is_picklable_text() -> None:
    class Positive(BaseModel):
        n: int

        @field_validator("n")
        @classmethod
        def _positive(cls, value: int) -> int:
            if value <= 0:
                raise ValueError("must be positive")
            return value

    contract = NodeContract("p", Positive, Positive)
    with pytest.raises(ContractViolation) as info:
        BoundaryValidator()(contract, "output", {"n": -5})
    error = info.value.errors[0]
    assert error["ctx"] == {"error": "must be positive"}
    clone = pickle.loads(pickle.dumps(info.value))
    assert str(clone) == str(info.value)


def test_many_errors_are_capped_at_five_with_a_count() -> None:
    class Wide(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int
        f: int
        g: int

    contract = NodeContract("wide", Wide, Wide)
    with pytest.raises(ContractViolation) as info:
        BoundaryValidator()(contract, "output", {})
    message = str(info.value)
    assert "7 errors" in message
    assert "... and 2 more" in message
    assert message.count("Field required") == 5


def test_violation_message_is_bounded_for_huge_payloads() -> None:
    class Numbers(BaseModel):
        values: list[int]

    contract = NodeContract("numbers", Numbers, Numbers)
    raw = {"values": [CANARY * 10] * 100_000}
    with pytest.raises(ContractViolation) as info:
        BoundaryValidator()(contract, "output", raw)
    message = str(info.value)
    assert len(info.value.errors) == 100_000
    assert "... and 99995 more" in message
    assert len(message) < 2_000
    assert CANARY not in message


def test_violation_pickles_with_its_data() -> None:
    violation = ContractViolation("s", "input", {"a": 1}, [{"type": "missing", "loc": ("a",), "msg": "Field required"}])
    clone = pickle.loads(pickle.dumps(violation))
    assert type(clone) is ContractViolation
    assert (clone.node_id, clone.direction, clone.raw, clone.errors) == (
        "s",
        "input",
        {"a": 1},
        violation.errors,
    )
    assert str(clone) == str(violation)


def test_violation_str_tolerates_odd_error_items() -> None:
    violation = ContractViolation("s", "output", None, ["not a dict", {"loc": "field"}, {"msg": "m"}])
    message = str(violation)
    assert "3 errors" in message
    assert "field: invalid" in message
    assert "<root>: m" in message
    assert "no errors" not in str(ContractViolation("s", "output", None, []))


# --- hostile values: NaN, depth, recursion -----------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "nan", "-Infinity"])
def test_non_finite_floats_are_violations_naming_the_field(
    contract: NodeContract, validator: BoundaryValidator, bad: Any
) -> None:
    raw = {"title": "t", "words": 1, "items": [{"name": "a", "score": 1.0}, {"name": "b", "score": bad}]}
    with pytest.raises(ContractViolation) as info:
        validator(contract, "output", raw)
    assert "items.1.score: Input should be a finite number" in str(info.value)


def test_non_finite_float_in_a_model_instance_is_caught(contract: NodeContract) -> None:
    instance = Summary(title="t", words=1, items=[Item(name="a", score=math.nan)])
    with pytest.raises(ContractViolation, match=r"items\.0\.score"):
        BoundaryValidator()(contract, "output", instance)


def test_non_finite_floats_can_be_allowed(contract: NodeContract) -> None:
    raw = {"title": "t", "words": 1, "items": [{"name": "a", "score": math.nan}]}
    result = BoundaryValidator(allow_non_finite=True)(contract, "output", raw)
    assert isinstance(result, Summary)
    assert math.isnan(result.items[0].score)


def test_deep_recursive_model_is_a_violation_not_a_recursion_error(validator: BoundaryValidator) -> None:
    raw: dict[str, Any] | None = None
    for _ in range(5_000):
        raw = {"child": raw}
    with pytest.raises(ContractViolation) as info:
        validator(NodeContract("tree", Node, Node), "output", raw)
    assert len(str(info.value)) < 1_000


def test_deep_nesting_in_an_any_field_is_a_violation(validator: BoundaryValidator) -> None:
    outer: list[Any] = []
    inner = outer
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ContractViolation) as info:
        validator(NodeContract("bag", Bag, Bag), "output", {"data": outer})
    message = str(info.value)
    assert "nested more than 200 levels deep" in message
    assert "data.0.0" in message


def test_max_depth_is_configurable() -> None:
    contract = NodeContract("bag", Bag, Bag)
    nested = {"data": {"a": {"b": {"c": 1}}}}
    assert BoundaryValidator(max_depth=4)(contract, "output", nested)
    with pytest.raises(ContractViolation, match="nested more than 3 levels"):
        BoundaryValidator(max_depth=3)(contract, "output", nested)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_invalid_max_depth_is_rejected(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="max_depth"):
        BoundaryValidator(max_depth=bad)


def test_recursion_error_from_a_validator_becomes_a_violation() -> None:
    class Recursive(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def _explode(cls, value: int) -> int:
            raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(ContractViolation, match="nested too deeply") as info:
        BoundaryValidator()(NodeContract("r", Recursive, Recursive), "input", {"x": 1})
    assert isinstance(info.value.__cause__, RecursionError)


def test_shared_and_cyclic_references_terminate_quickly(validator: BoundaryValidator) -> None:
    shared: list[Any] = [1.0]
    for _ in range(60):  # 2**60 paths, 61 distinct lists
        shared = [shared, shared]
    cyclic: dict[str, Any] = {"x": 1}
    cyclic["self"] = cyclic
    contract = NodeContract("bag", Bag, Bag)
    started = time.perf_counter()
    assert validator(contract, "output", {"data": shared})
    assert validator(contract, "output", {"data": cyclic})
    assert time.perf_counter() - started < 1.0


def test_extra_fields_of_the_schema_are_checked_too() -> None:
    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")

    with pytest.raises(ContractViolation, match=r"extra\.0"):
        BoundaryValidator()(NodeContract("l", Loose, Loose), "output", {"extra": [math.inf]})


# --- ContractRegistry --------------------------------------------------------------------------


def test_registry_register_get_and_replace(contract: NodeContract) -> None:
    registry = ContractRegistry()
    registry.register(contract)
    assert registry.get("summarize") is contract
    assert "summarize" in registry and "other" not in registry
    replacement = NodeContract("summarize", Doc, Doc)
    registry.register(replacement)
    assert registry.get("summarize") is replacement
    assert len(registry) == 1
    assert list(registry) == [replacement]
    assert registry.node_ids() == ["summarize"]


def test_registry_get_unknown_lists_known_ids(contract: NodeContract) -> None:
    registry = ContractRegistry([contract, NodeContract("extract", Doc, Doc)])
    with pytest.raises(KeyError) as info:
        registry.get("missing")
    message = str(info.value)
    assert "'missing'" in message
    assert "'extract', 'summarize'" in message
    empty = ContractRegistry()
    with pytest.raises(KeyError, match="registered steps: none"):
        empty.get("x")


def test_registry_lists_at_most_twenty_ids() -> None:
    registry = ContractRegistry(NodeContract(f"s{i:02}", Doc, Doc) for i in range(25))
    with pytest.raises(KeyError, match=r"\.\.\. and 5 more"):
        registry.get("nope")


def test_registry_validates_input_and_output(contract: NodeContract) -> None:
    registry = ContractRegistry([contract])
    assert isinstance(registry.validate_input("summarize", {"text": "hi"}), Doc)
    assert isinstance(registry.validate_output("summarize", {"title": "t", "words": 1}), Summary)
    with pytest.raises(ContractViolation, match=r"'summarize' \(input\)"):
        registry.validate_input("summarize", {"text": 5})
    with pytest.raises(KeyError):
        registry.validate_output("nope", {})


def test_registry_ensure(contract: NodeContract) -> None:
    registry = ContractRegistry()
    assert registry.ensure(contract) is contract
    assert registry.get("summarize") is contract
    equal = NodeContract("summarize", Doc, Summary)
    assert registry.ensure(equal) is equal
    assert registry.get("summarize") is contract  # equal: left alone
    changed = NodeContract("summarize", Doc, Other)
    registry.ensure(changed)
    assert registry.get("summarize") is changed


def test_registry_rejects_non_contracts() -> None:
    with pytest.raises(TypeError, match="NodeContract"):
        ContractRegistry().register({"node_id": "x"})  # type: ignore[arg-type]


def test_registry_uses_its_validator() -> None:
    registry = ContractRegistry([NodeContract("s", Item, Item)], validator=BoundaryValidator(allow_non_finite=True))
    assert math.isinf(registry.validate_output("s", {"name": "a", "score": "inf"}).score)  # type: ignore[attr-defined]
    assert registry.validator.allow_non_finite
