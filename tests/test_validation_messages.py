"""One formatter for pydantic's validation errors, and a canary that never reaches a message.

Every place Stroma turns a ``ValidationError`` into text (settings, contracts, checkpoints,
traces, the CLI) goes through :func:`stroma.errors.describe_validation_error` /
:func:`stroma.errors.validation_errors`. A secret-looking input value is fed to each of them
through the kinds of field whose pydantic message would repeat it, and must not come back.
"""

from __future__ import annotations

import asyncio
import io
import json
import pickle
from collections.abc import Callable
from typing import Annotated, Any, Literal
from uuid import UUID

import pytest
from pydantic import BaseModel, Field, ValidationError

from stroma import cli
from stroma.checkpoint import CheckpointManager, InMemoryStore
from stroma.checkpoint import _codec as codec
from stroma.config import RunConfig
from stroma.contracts import BoundaryValidator, ContractViolation, NodeContract
from stroma.cost import ExecutionBudget
from stroma.errors import CheckpointError, ConfigurationError, describe_validation_error, validation_errors
from stroma.failures import FailurePolicy
from stroma.trace import ExecutionTrace

CANARY = "canary-SECRET-7f3a"


class Cat(BaseModel):
    kind: Literal["cat"]


class Dog(BaseModel):
    kind: Literal["dog"]


class Strict(BaseModel):
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    uid: UUID
    count: int


class Loose(BaseModel):
    pet: dict[str, Any]
    uid: str
    count: str


BAD = {"pet": {"kind": CANARY}, "uid": CANARY, "count": CANARY}


def _pydantic_error() -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Strict.model_validate(BAD)
    return info.value


def test_pydantic_itself_would_leak_the_canary() -> None:
    # the premise: without the formatter the value is in the text (message, context, or str())
    exc = _pydantic_error()
    assert CANARY in str(exc)
    assert any(CANARY in error["msg"] for error in exc.errors(include_input=False))


def test_the_formatter_leaves_input_values_out() -> None:
    exc = _pydantic_error()
    errors = validation_errors(exc)
    assert [e["loc"] for e in errors] == [("pet",), ("uid",), ("count",)]
    assert all("input" not in e and "url" not in e for e in errors)
    assert CANARY not in repr(errors)
    assert "<input>" in errors[0]["msg"]  # the discriminated union's tag was in pydantic's message
    pickle.loads(pickle.dumps(errors))
    json.dumps(errors)
    for owner in (None, "Owner"):
        for numbers in (False, True):
            text = describe_validation_error(owner, exc, show_numbers=numbers)
            assert CANARY not in text
            assert "uid" in text and "count" in text


def test_only_numbers_are_shown_and_only_for_settings() -> None:
    with pytest.raises(ValidationError) as info:
        Strict.model_validate({"pet": {"kind": "cat"}, "uid": 12345, "count": 1.5})
    assert "count=1.5" in describe_validation_error("S", info.value, show_numbers=True)
    assert "1.5" not in describe_validation_error("S", info.value)


def test_more_than_five_errors_are_counted_not_listed() -> None:
    fields: dict[str, Any] = {f"f{i}": (int, ...) for i in range(8)}
    from pydantic import create_model

    many = create_model("Many", **fields)
    with pytest.raises(ValidationError) as info:
        many.model_validate({})
    text = describe_validation_error("Many", info.value)
    assert text.count("Field required") == 5 and text.endswith("and 3 more")


def _config_messages() -> list[str]:
    messages = []
    for make in (
        lambda: RunConfig(context=CANARY),
        lambda: RunConfig(resume_from=[CANARY]),
        lambda: RunConfig(node_timeouts={"a": CANARY}),
        lambda: RunConfig(budget=CANARY),
        lambda: ExecutionBudget(max_cost_usd=CANARY),  # type: ignore[arg-type]
        lambda: ExecutionBudget(unpriced=CANARY),  # type: ignore[arg-type]
        lambda: FailurePolicy(backoff_seconds=CANARY),  # type: ignore[arg-type]
        lambda: FailurePolicy(max_retries=CANARY),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConfigurationError) as info:
            make()
        messages.append(str(info.value))
    return messages


def _contract_messages() -> list[str]:
    contract = NodeContract("s", Strict, Strict)
    with pytest.raises(ContractViolation) as info:
        BoundaryValidator()(contract, "input", BAD)
    assert CANARY not in repr(info.value.errors)
    return [str(info.value)]


def _checkpoint_messages() -> list[str]:
    messages = []
    # a stored state read back as a schema it does not fit
    with pytest.raises(CheckpointError) as info:
        codec.coerce_to_schema(Loose(pet={"kind": CANARY}, uid=CANARY, count=CANARY), Strict, "r", "s")
    messages.append(str(info.value))

    # a third-party store handing back a plain mapping
    class MappingStore(InMemoryStore):
        def load_typed(self, run_id: str, node_id: str, schema: Any) -> Any:
            return BAD

    manager = CheckpointManager(MappingStore())
    with pytest.raises(CheckpointError) as info:
        asyncio.run(manager.resume("r", "s", Strict))
    messages.append(str(info.value))
    return messages


def _trace_messages() -> list[str]:
    event = {
        "node_id": "s",
        "run_id": "r",
        "attempt": CANARY,
        "timestamp_utc": CANARY,
        "input_state": CANARY,
        "output_state": None,
        "duration_ms": 1,
        "failure": CANARY,
    }
    with pytest.raises(ValueError) as info:
        ExecutionTrace.from_json(json.dumps([event]))
    return [str(info.value)]


def _cli_messages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    # a ValidationError that escapes a command is reported through the formatter too
    def failing(args: Any, out: Any) -> int:
        Strict.model_validate(BAD)
        return 0

    monkeypatch.setattr(cli.commands, "dispatch", failing)
    monkeypatch.setattr(cli, "configure_logging", lambda debug: None)  # leave the process's logging alone
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdout", stdout)
    assert cli.main(["runs", "--json"]) == cli.EXIT_FAILED
    return [stdout.getvalue()]


@pytest.mark.parametrize(
    "messages",
    [_config_messages, _contract_messages, _checkpoint_messages, _trace_messages, _cli_messages],
    ids=["config", "contracts", "checkpoint", "trace", "cli"],
)
def test_a_canary_input_never_reaches_a_message(
    messages: Callable[..., list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = messages(monkeypatch) if messages is _cli_messages else messages()
    assert texts and all(texts)
    for text in texts:
        assert CANARY not in text, text
