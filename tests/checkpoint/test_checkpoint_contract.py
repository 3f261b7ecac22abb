"""The store contract, run against every store (memory, SQLite and Redis; sync and async)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
from checkpoint_support import Harness
from pydantic import BaseModel, Field

from stroma.checkpoint import (
    AsyncCheckpointStore,
    AsyncRunMetadataStore,
    AsyncTypedCheckpointStore,
    CheckpointData,
    CheckpointManager,
    CheckpointStore,
    RunMetadataStore,
    TypedCheckpointStore,
)
from stroma.errors import CheckpointError

RUN = "run:7/α"
STEP = "summarize:v1"


class Summary(BaseModel):
    text: str
    score: float = 0.0
    tags: list[str] = []


class SummaryV2(BaseModel):
    text: str
    score: float = 0.0
    tags: list[str] = []
    language: str = "en"


class Other(BaseModel):
    name: str
    count: int


class Aliased(BaseModel):
    model_config = {"strict": True}

    user_name: str = Field(alias="userName")
    when: list[int]


def _assert_names(exc: CheckpointError, run_id: str, step_id: str | None) -> None:
    assert exc.run_id == run_id
    assert exc.node_id == step_id
    assert repr(run_id) in str(exc)
    if step_id is not None:
        assert repr(step_id) in str(exc)


async def test_store_satisfies_protocols(harness: Harness) -> None:
    if harness.is_async:
        assert isinstance(harness.store, AsyncCheckpointStore)
        assert isinstance(harness.store, AsyncTypedCheckpointStore)
        assert isinstance(harness.store, AsyncRunMetadataStore)
    else:
        assert isinstance(harness.store, CheckpointStore)
        assert isinstance(harness.store, TypedCheckpointStore)
        assert isinstance(harness.store, RunMetadataStore)


async def test_round_trip_with_schema(harness: Harness) -> None:
    state = Summary(text="hello", score=0.5, tags=["a", "b"])
    await harness.call("save", RUN, STEP, state)
    loaded = await harness.call("load_typed", RUN, STEP, Summary)
    assert type(loaded) is Summary
    assert loaded == state
    assert loaded is not state


async def test_round_trip_keeps_aliases_and_strict_models(harness: Harness) -> None:
    state = Aliased(userName="ada", when=[1, 2])
    await harness.call("save", RUN, STEP, state)
    assert await harness.call("load_typed", RUN, STEP, Aliased) == state


async def test_load_without_schema_never_needs_an_import(harness: Harness) -> None:
    state = Summary(text="hello", score=0.5)
    await harness.call("save", RUN, STEP, state)
    loaded = await harness.call("load", RUN, STEP)
    if harness.kind.endswith("memory"):
        # in-process: the store kept the class object itself
        assert type(loaded) is Summary and loaded == state
    else:
        assert isinstance(loaded, CheckpointData)
        assert loaded.model_dump() == state.model_dump(mode="json")
        assert loaded.text == "hello"
        assert loaded.stored_schema_name.endswith("Summary")
        assert loaded.stored_schema_fingerprint.startswith("sha256:")


async def test_save_typed_coerces_and_rejects(harness: Harness) -> None:
    await harness.call("save_typed", RUN, STEP, SummaryV2(text="x", language="fr"), Summary)
    assert await harness.call("load_typed", RUN, STEP, Summary) == Summary(text="x")
    with pytest.raises(CheckpointError) as info:
        await harness.call("save_typed", RUN, STEP, Summary(text="x"), Other)
    _assert_names(info.value, RUN, STEP)
    assert await harness.call("load_typed", RUN, STEP, Summary) == Summary(text="x")


async def test_overwrite_replaces(harness: Harness) -> None:
    await harness.call("save", RUN, STEP, Summary(text="one"))
    await harness.call("save", RUN, STEP, Summary(text="two"))
    assert await harness.call("load_typed", RUN, STEP, Summary) == Summary(text="two")


async def test_unknown_keys_give_none(harness: Harness) -> None:
    assert await harness.call("load", "nope", STEP) is None
    assert await harness.call("load_typed", "nope", STEP, Summary) is None
    await harness.call("save", RUN, STEP, Summary(text="x"))
    assert await harness.call("load_typed", RUN, "other-step", Summary) is None
    assert await harness.call("load_manifest", "nope") is None
    assert await harness.call("completed_steps", "nope") == []
    await harness.call("delete", "nope")  # no error


async def test_ids_with_separators_never_collide(harness: Harness) -> None:
    keys = [
        ("a:b", "c"),
        ("a", "b:c"),
        ("a:b:c", "s:x"),
        ("a", "m"),
        ("a", "s:m"),
        ("a", "o:m"),
        ("a/b", "c"),
        ("a", "b/c"),
    ]
    for index, (run_id, step_id) in enumerate(keys):
        await harness.call("save", run_id, step_id, Other(name=f"{run_id}|{step_id}", count=index))
    await harness.call("save_manifest", "a", {"owner": "a"})
    await harness.call("save_manifest", "a:b", {"owner": "a:b"})
    for index, (run_id, step_id) in enumerate(keys):
        assert await harness.call("load_typed", run_id, step_id, Other) == Other(
            name=f"{run_id}|{step_id}", count=index
        )
    assert await harness.call("completed_steps", "a") == ["b:c", "m", "s:m", "o:m", "b/c"]

    await harness.call("delete", "a")
    for run_id, step_id in keys:
        expected_gone = run_id == "a"
        assert (await harness.call("load_typed", run_id, step_id, Other) is None) is expected_gone
    assert await harness.call("load_manifest", "a") is None
    assert await harness.call("load_manifest", "a:b") == {"owner": "a:b"}

    await harness.call("delete", "a:b")
    assert await harness.call("load_typed", "a:b", "c", Other) is None
    assert await harness.call("load_typed", "a:b:c", "s:x", Other) is not None
    assert await harness.call("load_typed", "a/b", "c", Other) is not None


async def test_wrong_schema_fails_closed(harness: Harness) -> None:
    await harness.call("save", RUN, STEP, Summary(text="hello"))
    with pytest.raises(CheckpointError) as info:
        await harness.call("load_typed", RUN, STEP, Other)
    _assert_names(info.value, RUN, STEP)
    assert "Other" in str(info.value)


async def test_changed_schema_is_detected_even_when_compatible(harness: Harness) -> None:
    await harness.call("save", RUN, STEP, Summary(text="hello"))
    with pytest.raises(CheckpointError, match="schema changed") as info:
        await harness.call("load_typed", RUN, STEP, SummaryV2)
    _assert_names(info.value, RUN, STEP)


def _flip_value(raw: bytes) -> bytes:
    assert b'"hello"' in raw
    return raw.replace(b'"hello"', b'"HELLO"')


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "last-byte-cut": lambda raw: raw[:-1],
    "empty": lambda raw: b"",
    "edited-payload": _flip_value,
    "edited-schema-name": lambda raw: raw.replace(b"Summary", b"Sommary"),
    "not-utf8": lambda raw: b"\xff\xfe" + raw[2:],
    "garbage": lambda raw: b"\x80\x04\x95 pickle-looking bytes",
    "old-format": lambda raw: b'{"text": "hello", "score": 0.0, "tags": []}',
    "json-list": lambda raw: b"[1, 2, 3]",
    "nan-constant": lambda raw: raw.replace(b'"score":0.0', b'"score":NaN'),
    "duplicate-key": lambda raw: raw.replace(b'"text":"hello"', b'"text":"hello","text":"hello"'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
async def test_damaged_data_fails_closed(harness: Harness, damage: str) -> None:
    await harness.call("save", RUN, STEP, Summary(text="hello"))
    raw = harness.raw_get(RUN, STEP)
    assert raw is not None
    harness.raw_set(RUN, STEP, DAMAGE[damage](raw))
    for name, args in (("load_typed", (RUN, STEP, Summary)), ("load", (RUN, STEP))):
        with pytest.raises(CheckpointError) as info:
            await harness.call(name, *args)
        _assert_names(info.value, RUN, STEP)
    with pytest.raises(CheckpointError):
        await CheckpointManager(harness.store).resume(RUN, STEP, Summary)


async def test_checkpoint_copied_from_another_step_is_rejected(harness: Harness) -> None:
    await harness.call("save", RUN, "first", Summary(text="one"))
    await harness.call("save", RUN, "second", Summary(text="two"))
    copied = harness.raw_get(RUN, "first")
    assert copied is not None
    harness.raw_set(RUN, "second", copied)
    with pytest.raises(CheckpointError, match="belongs to") as info:
        await harness.call("load_typed", RUN, "second", Summary)
    _assert_names(info.value, RUN, "second")


async def test_unrepresentable_state_is_rejected_and_old_value_kept(harness: Harness) -> None:
    await harness.call("save", RUN, STEP, Summary(text="ok"))
    with pytest.raises(CheckpointError) as info:
        await harness.call("save", RUN, STEP, Summary(text="bad", score=math.nan))
    _assert_names(info.value, RUN, STEP)
    assert await harness.call("load_typed", RUN, STEP, Summary) == Summary(text="ok")


async def test_malformed_ids_are_programming_errors(harness: Harness) -> None:
    with pytest.raises(ValueError):
        await harness.call("save", "", STEP, Summary(text="x"))
    with pytest.raises(ValueError):
        await harness.call("load_typed", RUN, "", Summary)
    with pytest.raises(TypeError):
        await harness.call("load", 7, STEP)
    with pytest.raises(TypeError):
        await harness.call("load_typed", RUN, STEP, dict)


@pytest.mark.parametrize("schema", [dict, "Summary", None], ids=["dict", "str", "None"])
async def test_a_schema_that_is_not_a_model_class_is_refused_as_before(harness: Harness, schema: Any) -> None:
    # the established package's message, which its users' tests match on (issue 8, F)
    with pytest.raises(TypeError, match="schema must be a BaseModel type") as info:
        await harness.call("save_typed", RUN, STEP, Summary(text="x"), schema)
    assert repr(schema) in str(info.value)
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        await harness.call("load_typed", RUN, STEP, schema)
    assert await harness.call("completed_steps", RUN) == []


async def test_manifest_round_trip(harness: Harness) -> None:
    manifest = {
        "steps": [
            {"step_id": "fetch", "schema_fingerprint": "sha256:aa"},
            {"step_id": "summarize", "schema_fingerprint": "sha256:bb"},
        ],
        "status": "completed",
        "result": {"text": "héllo", "nested": [1, 2.5, None, True]},
    }
    await harness.call("save_manifest", RUN, manifest)
    assert await harness.call("load_manifest", RUN) == manifest
    await harness.call("save_manifest", RUN, {"steps": []})
    assert await harness.call("load_manifest", RUN) == {"steps": []}
    assert await harness.call("completed_steps", RUN) == []
    await harness.call("delete", RUN)
    assert await harness.call("load_manifest", RUN) is None


async def test_damaged_manifest_fails_closed(harness: Harness) -> None:
    await harness.call("save_manifest", RUN, {"steps": ["a"]})
    raw = harness.raw_get(RUN, None)
    assert raw is not None
    harness.raw_set(RUN, None, raw.replace(b'"a"', b'"b"'))
    with pytest.raises(CheckpointError, match="checksum") as info:
        await harness.call("load_manifest", RUN)
    _assert_names(info.value, RUN, None)


async def test_manifest_must_be_a_json_object(harness: Harness) -> None:
    with pytest.raises(TypeError):
        await harness.call("save_manifest", RUN, ["not", "an", "object"])
    with pytest.raises(CheckpointError):
        await harness.call("save_manifest", RUN, {"value": math.inf})
    with pytest.raises(CheckpointError):
        await harness.call("save_manifest", RUN, {"value": object()})


async def test_completed_steps_in_first_save_order(harness: Harness) -> None:
    for step_id in ("b", "a", "c"):
        await harness.call("save", RUN, step_id, Summary(text=step_id))
    await harness.call("save", RUN, "a", Summary(text="again"))
    assert await harness.call("completed_steps", RUN) == ["b", "a", "c"]


async def test_manager_over_every_store(harness: Harness) -> None:
    manager = CheckpointManager(harness.store)
    assert manager.store_kind == {"memory": "memory", "sqlite": "sqlite", "redis": "redis"}[harness.kind.split("-")[-1]]
    await manager.checkpoint(RUN, STEP, Summary(text="hello"))
    await manager.checkpoint(RUN, "typed", SummaryV2(text="x", language="de"), schema=Summary)
    resumed = await manager.resume(RUN, STEP, Summary)
    assert resumed == Summary(text="hello")
    assert await manager.resume(RUN, "typed", Summary) == Summary(text="x")
    assert await manager.resume(RUN, "missing", Summary) is None
    await manager.save_manifest(RUN, {"steps": [STEP, "typed"]})
    assert await manager.load_manifest(RUN) == {"steps": [STEP, "typed"]}
    assert await manager.completed_steps(RUN) == [STEP, "typed"]
    await manager.clear(RUN)
    assert await manager.resume(RUN, STEP, Summary) is None
    assert await manager.load_manifest(RUN) is None


async def test_cancellation_mid_write_leaves_old_or_new(harness: Harness) -> None:
    manager = CheckpointManager(harness.store)
    big = [f"tag-{i}" for i in range(20_000)]
    old = Summary(text="old", tags=big)
    await manager.checkpoint(RUN, STEP, old)
    allowed = {"old"}
    cancelled = 0
    for delay in range(8):
        new = Summary(text=f"new-{delay}", tags=big)
        allowed.add(new.text)
        task = asyncio.create_task(manager.checkpoint(RUN, STEP, new))
        for _ in range(delay):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
            assert task.cancelled()  # propagated, never swallowed
        current = await manager.resume(RUN, STEP, Summary)  # never half-written
        assert current is not None and current.text in allowed
    assert cancelled >= 1
    await asyncio.sleep(0.2)  # writes abandoned in worker threads finish in the background
    current = await manager.resume(RUN, STEP, Summary)
    assert current is not None and current.text in allowed and current.tags == big
