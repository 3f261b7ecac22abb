"""Issue 8 B8: an output model instance made invalid is a contract violation, never a checkpoint
that can not be read back."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from stroma import ContractRegistry, NodeContract, ReliabilityContext, RunConfig, RunStatus, StromaRunner
from stroma.checkpoint import CheckpointManager, InMemoryStore, SQLiteStore
from stroma.contracts import BoundaryValidator, ContractViolation
from stroma.middleware import execute_step


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    text: str
    words: int


class Aliased(BaseModel):
    model_config = ConfigDict(extra="allow")
    word_count: int = Field(alias="wordCount")
    _note: str = PrivateAttr(default="")


CONTRACT = NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary)


async def _run(output: Any, tmp_path: Any) -> Any:
    manager = CheckpointManager(SQLiteStore(str(tmp_path / "c.db")))
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), manager)

    async def step(doc: Doc) -> Any:
        return output

    return await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT), manager, ctx.run_id


async def test_model_construct_output_is_a_violation(tmp_path: Any) -> None:
    result, _, run_id = await _run(Summary.model_construct(text="a", words="many"), tmp_path)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "ContractViolation" in result.error and "words" in result.error
    assert SQLiteStore(str(tmp_path / "c.db")).load(run_id, "summarize") is None  # nothing checkpointed


async def test_assignment_without_validate_assignment_is_a_violation(tmp_path: Any) -> None:
    bad = Summary(text="a", words=1)
    bad.words = "many"  # type: ignore[assignment]
    result, _, _ = await _run(bad, tmp_path)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "words" in result.error


def test_valid_instance_is_returned_as_is_and_a_coerced_one_as_a_valid_copy() -> None:
    validator = BoundaryValidator()
    good = Summary(text="a", words=1)
    assert validator(CONTRACT, "output", good) is good
    coerced = Summary(text="a", words=1)
    coerced.words = "7"  # type: ignore[assignment]
    fixed = validator(CONTRACT, "output", coerced)
    assert isinstance(fixed, Summary) and fixed.words == 7


def test_aliases_extras_and_private_attributes_survive_revalidation() -> None:
    contract = NodeContract(node_id="alias", input_schema=Doc, output_schema=Aliased)
    value = Aliased(wordCount=3, extra_field="x")
    value._note = "kept"
    value.word_count = "4"  # type: ignore[assignment]
    fixed = BoundaryValidator()(contract, "output", value)
    assert isinstance(fixed, Aliased)
    assert fixed.word_count == 4 and fixed.model_extra == {"extra_field": "x"} and fixed._note == "kept"
    broken = Aliased.model_construct(word_count="x")
    try:
        BoundaryValidator()(contract, "output", broken)
    except ContractViolation as violation:
        assert violation.direction == "output"
    else:  # pragma: no cover - the point of the test
        raise AssertionError("an invalid instance passed the contract")


def test_a_run_that_returned_a_broken_instance_can_still_be_resumed(tmp_path: Any) -> None:
    """Before: the invalid instance was checkpointed and every resume failed reading it back."""
    store = SQLiteStore(str(tmp_path / "run.db"))
    runner = StromaRunner(ContractRegistry(), CheckpointManager(store), RunConfig(run_id="broken-once"))
    calls = {"n": 0}

    @runner.node("summarize", input=Doc, output=Summary)
    async def summarize(doc: Doc) -> Summary:
        calls["n"] += 1
        if calls["n"] == 1:
            return Summary.model_construct(text=doc.text, words="many")
        return Summary(text=doc.text, words=1)

    first = runner.run_sync([summarize], Doc(text="a"))
    assert first.status is RunStatus.FAILED
    second = runner.run_sync([summarize], Doc(text="a"))
    assert second.status is RunStatus.COMPLETED, second.error
    assert second.final_state == Summary(text="a", words=1)


def test_in_memory_store_never_holds_the_broken_instance() -> None:
    store = InMemoryStore()
    runner = StromaRunner(ContractRegistry(), CheckpointManager(store), RunConfig())

    @runner.node("summarize", input=Doc, output=Summary)
    async def summarize(doc: Doc) -> Summary:
        return Summary.model_construct(text=doc.text, words="many")

    result = runner.run_sync([summarize], Doc(text="a"))
    assert result.status is RunStatus.FAILED
    assert store.load(result.run_id, "summarize") is None


def test_revalidation_without_pydantic_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic < 2.11 has no ``by_name``: aliased fields are then passed by their alias."""
    import stroma.contracts

    monkeypatch.setattr(stroma.contracts, "_VALIDATE_BY_NAME", False)
    test_aliases_extras_and_private_attributes_survive_revalidation()
