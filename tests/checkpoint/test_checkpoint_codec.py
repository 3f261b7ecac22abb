"""The stored envelope: fingerprints, verification, and that loading never imports anything."""

from __future__ import annotations

import builtins
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, RootModel

import stroma.checkpoint
from stroma.checkpoint import CheckpointData, schema_fingerprint, schema_name
from stroma.checkpoint import _codec as codec
from stroma.errors import CheckpointError


class Doc(BaseModel):
    """A document."""

    text: str
    score: float = 0.0


class DocRenamedAndRedocumented(BaseModel):
    """The same fields, other words around them."""

    text: str = Field(description="the body", examples=["hi"])
    score: float = Field(default=0.0, title="Score")


class DocWithInt(BaseModel):
    text: str
    score: int = 0


class DocWithExtraField(BaseModel):
    text: str
    score: float = 0.0
    lang: str = "en"


class DocRequiredScore(BaseModel):
    text: str
    score: float


class DocOtherDefault(BaseModel):
    text: str
    score: float = 1.0


class DocConstrained(BaseModel):
    text: str = Field(max_length=10)
    score: float = 0.0


class Properties(BaseModel):
    """A model whose field *names* are JSON-schema keywords must keep them in the fingerprint."""

    title: str
    description: str


class PropertiesRenamed(BaseModel):
    heading: str
    description: str


class Opaque:
    pass


class WithArbitrary(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque


class Numbers(RootModel[list[int]]):
    pass


def _reseal(text: str, **changes: Any) -> str:
    envelope = json.loads(text)
    envelope.pop("checksum")
    envelope.update(changes)
    return json.dumps({**envelope, "checksum": codec._checksum(envelope)})


def test_fingerprint_is_stable_and_ignores_documentation() -> None:
    assert schema_fingerprint(Doc) == schema_fingerprint(Doc)
    assert schema_fingerprint(Doc).startswith("sha256:")
    assert schema_fingerprint(Doc) == schema_fingerprint(DocRenamedAndRedocumented)


@pytest.mark.parametrize("changed", [DocWithInt, DocWithExtraField, DocRequiredScore, DocOtherDefault, DocConstrained])
def test_fingerprint_changes_with_what_the_schema_accepts(changed: type[BaseModel]) -> None:
    assert schema_fingerprint(changed) != schema_fingerprint(Doc)


def test_fingerprint_keeps_fields_named_like_keywords() -> None:
    assert schema_fingerprint(Properties) != schema_fingerprint(PropertiesRenamed)


def test_fingerprint_of_a_model_without_json_schema() -> None:
    assert schema_fingerprint(WithArbitrary).startswith("sha256:")


def test_schema_name_is_plain_text() -> None:
    assert schema_name(Doc) == f"{__name__}.Doc"


def test_envelope_shape() -> None:
    text = codec.encode_step("r", "s", Doc(text="hi"))
    envelope = json.loads(text)
    assert envelope["format"] == "stroma.checkpoint"
    assert envelope["version"] == stroma.checkpoint.FORMAT_VERSION == 1
    assert envelope["kind"] == "step"
    assert envelope["schema"] == {"name": schema_name(Doc), "fingerprint": schema_fingerprint(Doc)}
    assert envelope["payload"] == {"text": "hi", "score": 0.0}
    assert envelope["checksum"].startswith("sha256:")


def test_newer_format_version_is_refused() -> None:
    text = _reseal(codec.encode_step("r", "s", Doc(text="hi")), version=2)
    with pytest.raises(CheckpointError, match="format version 2"):
        codec.decode_step(text, "r", "s", Doc)


def test_unexpected_envelope_fields_are_refused() -> None:
    text = _reseal(codec.encode_step("r", "s", Doc(text="hi")), python_class="os.system")
    with pytest.raises(CheckpointError, match="malformed envelope"):
        codec.decode_step(text, "r", "s", Doc)


def test_manifest_is_not_a_step_and_vice_versa() -> None:
    manifest = codec.encode_manifest("r", {"steps": []})
    forged = _reseal(manifest, step_id="s")
    with pytest.raises(CheckpointError, match="record"):
        codec.decode_step(forged, "r", "s", Doc)


def test_loading_never_imports_code_named_by_data(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _reseal(
        codec.encode_step("r", "s", Doc(text="hi")),
        schema={"name": "evil_module_xyz.Payload", "fingerprint": schema_fingerprint(Doc)},
    )
    imported: list[str] = []
    real_import = builtins.__import__

    def spy(name: str, *args: Any, **kwargs: Any) -> Any:
        imported.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", spy)
    data = codec.decode_untyped(text, "r", "s")
    typed = codec.decode_step(text, "r", "s", Doc)
    monkeypatch.undo()
    assert isinstance(data, CheckpointData) and data.stored_schema_name == "evil_module_xyz.Payload"
    assert typed == Doc(text="hi")
    assert not [name for name in imported if "evil" in name]
    assert "evil_module_xyz" not in sys.modules


def test_no_pickle_or_dynamic_import_in_the_checkpoint_package() -> None:
    forbidden = re.compile(
        r"^\s*(import|from)\s+(pickle|importlib|marshal|shelve|dill|cloudpickle)\b"
        r"|__import__\(|import_module\(|\beval\(|\bexec\(",
        re.MULTILINE,
    )
    package = Path(stroma.checkpoint.__file__).parent
    sources = list(package.glob("*.py"))
    assert len(sources) >= 6
    for source in sources:
        assert not forbidden.search(source.read_text()), source.name


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 100_000 + "]" * 100_000,  # deep nesting
        '{"format": "stroma.checkpoint", "version": 1, "n": ' + "9" * 5000 + "}",  # huge int
        '{"format": "stroma.checkpoint", "version": true}',
        '{"format": "stroma.checkpoint"}',
        "null",
        "",
    ],
)
def test_hostile_text_fails_closed(raw: str) -> None:
    with pytest.raises(CheckpointError) as info:
        codec.decode_step(raw, "r", "s", Doc)
    assert info.value.run_id == "r" and info.value.node_id == "s"


def test_validation_errors_do_not_echo_stored_values() -> None:
    class Secretive(BaseModel):
        token: int

    text = codec.encode_step("r", "s", Doc(text="CANARY-9f8e7d"))
    with pytest.raises(CheckpointError) as info:
        codec.decode_step(
            _reseal(text, schema={"name": "x", "fingerprint": schema_fingerprint(Secretive)}),
            "r",
            "s",
            Secretive,
        )
    assert "CANARY" not in str(info.value)
    assert "token" in str(info.value)


def test_validation_message_is_bounded() -> None:
    class Many(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int
        f: int
        g: int

    payload_text = _reseal(
        codec.encode_step("r", "s", Doc(text="x")),
        schema={"name": "x", "fingerprint": schema_fingerprint(Many)},
    )
    with pytest.raises(CheckpointError, match="and 2 more"):
        codec.decode_step(payload_text, "r", "s", Many)


def test_root_model_round_trip_and_untyped_refusal() -> None:
    text = codec.encode_step("r", "s", Numbers([1, 2, 3]))
    assert codec.decode_step(text, "r", "s", Numbers) == Numbers([1, 2, 3])
    with pytest.raises(CheckpointError, match="without its schema"):
        codec.decode_untyped(text, "r", "s")


def test_unserialisable_state_is_a_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="cannot be serialised"):
        codec.encode_step("r", "s", WithArbitrary(thing=Opaque()))


def test_state_must_be_a_model() -> None:
    with pytest.raises(TypeError):
        codec.encode_step("r", "s", {"text": "hi"})  # type: ignore[arg-type]


def test_checkpoint_error_pickles_with_its_names() -> None:
    error = CheckpointError("broken", run_id="r", node_id="s")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.run_id, copy.node_id) == ("broken", "r", "s")


def test_run_ids_found_valid_are_remembered_within_a_bound() -> None:
    for number in range(3000):
        assert codec.check_run_id(f"run-{number}") == f"run-{number}"
    assert 0 < len(codec._CHECKED_RUN_IDS) <= codec._MAX_CHECKED_RUN_IDS


def test_a_str_subclass_run_id_is_checked_every_time() -> None:
    class Sneaky(str):
        """Hashes and compares as a valid id while its text is not one."""

        def __hash__(self) -> int:
            return hash("ok-run")

        def __eq__(self, other: object) -> bool:
            return other == "ok-run" or str.__eq__(self, other)

    assert codec.check_run_id("ok-run") == "ok-run"  # remembered as valid
    with pytest.raises(ValueError, match="control characters"):
        codec.check_run_id(Sneaky("bad\x00run"))
