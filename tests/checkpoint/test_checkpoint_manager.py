"""CheckpointManager: third-party stores, threads, timeouts, cancellation and error wrapping."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, field_serializer

from stroma.checkpoint import (
    AsyncSQLiteStore,
    CheckpointManager,
    InMemoryStore,
    SQLiteStore,
    manifest_entry,
    schema_fingerprint,
    schema_name,
)
from stroma.errors import CheckpointError, ConfigurationError


class Out(BaseModel):
    text: str


class Wider(BaseModel):
    text: str
    extra: int = 0


class Counted(BaseModel):
    count: int


class ThreadProbe(BaseModel):
    """Records the thread that serialises it (stores serialise in the thread doing the write)."""

    text: str

    @field_serializer("text")
    def _record_thread(self, value: str) -> str:
        seen_threads.append(threading.current_thread())
        return value


seen_threads: list[threading.Thread] = []


class DictStore:
    """A minimal third-party sync store: only save/load/delete, keeps model objects."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Any] = {}
        self.threads: list[threading.Thread] = []

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.threads.append(threading.current_thread())
        self.data[(run_id, node_id)] = state

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return self.data.get((run_id, node_id))

    def delete(self, run_id: str) -> None:
        for key in [key for key in self.data if key[0] == run_id]:
            del self.data[key]


class AsyncDictStore:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], Any] = {}

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.data[(run_id, node_id)] = state

    async def load(self, run_id: str, node_id: str) -> Any:
        return self.data.get((run_id, node_id))

    async def delete(self, run_id: str) -> None:
        self.data.clear()


class Boom(BaseException):
    """Stands for KeyboardInterrupt / SystemExit without disturbing the test runner."""


class RaisingStore(DictStore):
    blocking = False

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        raise self.error

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        raise self.error


class StallingAsyncStore(AsyncDictStore):
    async def load(self, run_id: str, node_id: str) -> Any:
        await asyncio.sleep(30)
        return None


class StallingSyncStore(DictStore):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        time.sleep(self.seconds)
        super().save(run_id, node_id, state)


# --- construction ------------------------------------------------------------------------------


def test_rejects_objects_that_are_not_stores() -> None:
    with pytest.raises(TypeError, match="save, load, delete"):
        CheckpointManager(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [0, -1, True, "5", float("nan")])
def test_rejects_bad_timeouts(timeout: Any) -> None:
    with pytest.raises(ConfigurationError, match="timeout_seconds"):
        CheckpointManager(InMemoryStore(), timeout_seconds=timeout)


def test_store_kind() -> None:
    assert CheckpointManager(InMemoryStore()).store_kind == "memory"
    assert CheckpointManager(DictStore()).store_kind == "DictStore"
    assert CheckpointManager(InMemoryStore(), timeout_seconds=None).store is not None


# --- third-party stores ------------------------------------------------------------------------


async def test_third_party_sync_store_runs_in_a_worker_thread() -> None:
    store = DictStore()
    manager = CheckpointManager(store)
    await manager.checkpoint("r", "s", Out(text="hi"))
    assert store.threads[0] is not threading.current_thread()
    assert await manager.resume("r", "s", Out) == Out(text="hi")


async def test_third_party_results_are_revalidated_with_the_callers_schema() -> None:
    store = DictStore()
    manager = CheckpointManager(store)
    store.data[("r", "wide")] = Wider(text="x", extra=3)
    store.data[("r", "dict")] = {"text": "from a dict"}
    store.data[("r", "bad")] = {"nope": 1}
    store.data[("r", "weird")] = 42
    assert await manager.resume("r", "wide", Out) == Out(text="x")
    assert await manager.resume("r", "dict", Out) == Out(text="from a dict")
    with pytest.raises(CheckpointError, match="does not validate") as info:
        await manager.resume("r", "bad", Out)
    assert (info.value.run_id, info.value.node_id) == ("r", "bad")
    with pytest.raises(CheckpointError, match="not a model"):
        await manager.resume("r", "weird", Out)


async def test_typed_checkpoint_on_a_store_without_save_typed() -> None:
    store = DictStore()
    manager = CheckpointManager(store)
    await manager.checkpoint("r", "s", Wider(text="x", extra=2), schema=Out)
    assert type(store.data[("r", "s")]) is Out
    with pytest.raises(CheckpointError, match="does not validate"):
        await manager.checkpoint("r", "s", Out(text="x"), schema=Counted)
    assert type(store.data[("r", "s")]) is Out


@pytest.mark.parametrize("store_type", [DictStore, AsyncDictStore])
async def test_manifest_fallback_for_third_party_stores(store_type: type[Any]) -> None:
    manager = CheckpointManager(store_type())
    assert await manager.load_manifest("r") is None
    assert await manager.completed_steps("r") == []
    manifest = {"steps": [manifest_entry("a", Out), "b", {"step_id": "c"}, {"junk": 1}], "status": "partial"}
    await manager.save_manifest("r", manifest)
    assert await manager.load_manifest("r") == manifest
    await manager.checkpoint("r", "c", Out(text="c"))
    await manager.checkpoint("r", "a", Out(text="a"))
    assert await manager.completed_steps("r") == ["a", "c"]


async def test_reserved_step_ids_are_refused() -> None:
    manager = CheckpointManager(InMemoryStore())
    with pytest.raises(ValueError, match="reserved"):
        await manager.checkpoint("r", "\x00stroma:manifest", Out(text="x"))


async def test_manifest_entry() -> None:
    assert manifest_entry("s", Out) == {
        "step_id": "s",
        "schema_name": schema_name(Out),
        "schema_fingerprint": schema_fingerprint(Out),
    }


async def test_argument_errors_are_raised_before_the_store_is_called() -> None:
    store = DictStore()
    manager = CheckpointManager(store)
    with pytest.raises(TypeError):
        await manager.checkpoint("r", "s", {"text": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await manager.resume("", "s", Out)
    with pytest.raises(TypeError):
        await manager.save_manifest("r", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        await manager.checkpoint("r", "s", Out(text="x"), schema=dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        await manager.resume("r", "s", dict)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="schema must be a BaseModel type"):
        manifest_entry("s", dict)  # type: ignore[arg-type]
    assert store.data == {}


# --- failures ----------------------------------------------------------------------------------


async def test_store_exceptions_become_checkpoint_errors() -> None:
    manager = CheckpointManager(RaisingStore(RuntimeError("disk on fire")))
    with pytest.raises(CheckpointError, match="disk on fire") as info:
        await manager.resume("run-1", "step-1", Out)
    assert (info.value.run_id, info.value.node_id) == ("run-1", "step-1")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "'run-1'" in str(info.value) and "'step-1'" in str(info.value)


async def test_a_stores_own_timeout_is_not_reported_as_ours() -> None:
    manager = CheckpointManager(RaisingStore(TimeoutError("socket timed out")))
    with pytest.raises(CheckpointError, match="socket timed out") as info:
        await manager.checkpoint("r", "s", Out(text="x"))
    assert "timeout_seconds" not in str(info.value)


@pytest.mark.parametrize("error", [Boom(), asyncio.CancelledError()])
async def test_base_exceptions_pass_through_unwrapped(error: BaseException) -> None:
    manager = CheckpointManager(RaisingStore(error))
    with pytest.raises(type(error)):
        await manager.checkpoint("r", "s", Out(text="x"))


async def test_stalled_async_store_times_out_closed() -> None:
    manager = CheckpointManager(StallingAsyncStore(), timeout_seconds=0.05)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"within 0\.05 s") as info:
        await manager.resume("r", "s", Out)
    assert time.monotonic() - started < 1.0
    assert (info.value.run_id, info.value.node_id) == ("r", "s")


async def test_stalled_sync_store_times_out_and_finishes_in_the_background() -> None:
    store = StallingSyncStore(0.3)
    manager = CheckpointManager(store, timeout_seconds=0.05)
    with pytest.raises(CheckpointError, match="within"):
        await manager.checkpoint("r", "s", Out(text="late"))
    await asyncio.sleep(0.5)
    assert store.data[("r", "s")] == Out(text="late")


async def test_cancelling_a_blocking_write_propagates_promptly() -> None:
    store = StallingSyncStore(0.4)
    manager = CheckpointManager(store)
    task = asyncio.create_task(manager.checkpoint("r", "s", Out(text="x")))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.1
    await asyncio.sleep(0.5)  # let the worker thread finish before the loop closes


async def test_cancelling_inside_a_timeout_is_still_a_cancellation() -> None:
    manager = CheckpointManager(StallingAsyncStore(), timeout_seconds=5)
    task = asyncio.create_task(manager.resume("r", "s", Out))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- which thread does the work ------------------------------------------------------------------


async def test_in_memory_store_runs_on_the_event_loop_thread() -> None:
    seen_threads.clear()
    await CheckpointManager(InMemoryStore()).checkpoint("r", "s", ThreadProbe(text="x"))
    assert seen_threads == [threading.current_thread()]


async def test_sync_sqlite_store_runs_off_the_event_loop(tmp_path: Path) -> None:
    seen_threads.clear()
    with SQLiteStore(tmp_path / "db.sqlite3") as store:
        manager = CheckpointManager(store)
        await manager.checkpoint("r", "s", ThreadProbe(text="x"))
        assert await manager.resume("r", "s", ThreadProbe) == ThreadProbe(text="x")
    assert seen_threads and all(thread is not threading.current_thread() for thread in seen_threads)


async def test_async_sqlite_store_runs_on_its_worker_thread(tmp_path: Path) -> None:
    seen_threads.clear()
    async with AsyncSQLiteStore(tmp_path / "db.sqlite3") as store:
        await CheckpointManager(store).checkpoint("r", "s", ThreadProbe(text="x"))
    assert [thread.name.startswith("stroma-checkpoint-sqlite") for thread in seen_threads] == [True]
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("stroma-checkpoint-sqlite")]


# --- the in-place path for non-blocking stores --------------------------------------------------


class InPlaceStore(DictStore):
    """A non-blocking store: the manager calls it on the event loop, without a thread."""

    blocking = False


async def test_a_save_method_swapped_for_a_coroutine_function_is_awaited() -> None:
    # The manager decides sync-or-async once per function, not once per store: a method replaced
    # on the instance at run time is looked at anew, so its coroutine is awaited, not dropped.
    store = InPlaceStore()
    manager = CheckpointManager(store)
    await manager.checkpoint("r", "s", Out(text="sync"))
    saved: list[str] = []

    async def save_later(run_id: str, node_id: str, state: BaseModel) -> None:
        await asyncio.sleep(0)
        saved.append(f"{run_id}/{node_id}")
        store.data[(run_id, node_id)] = state

    store.save = save_later  # type: ignore[method-assign, assignment]
    await manager.checkpoint("r", "t", Out(text="async"))
    assert saved == ["r/t"]
    assert store.data[("r", "t")] == Out(text="async")
    assert store.data[("r", "s")] == Out(text="sync")


async def test_an_awaitable_returned_by_an_in_place_save_is_awaited_and_its_failure_wrapped() -> None:
    class FutureStore(InPlaceStore):
        def save(self, run_id: str, node_id: str, state: BaseModel) -> Any:
            async def write() -> None:
                raise OSError("late write failed")

            return write()

    with pytest.raises(CheckpointError, match=r"failed to save .*OSError: late write failed") as info:
        await CheckpointManager(FutureStore()).checkpoint("r", "s", Out(text="x"))
    assert isinstance(info.value.__cause__, OSError)


async def test_an_in_place_save_failure_names_the_store_step_and_run() -> None:
    manager = CheckpointManager(RaisingStore(RuntimeError("disk on fire")))
    with pytest.raises(CheckpointError, match="failed to save the checkpoint of step 's' in run 'r'") as info:
        await manager.checkpoint("r", "s", Out(text="x"))
    assert (info.value.run_id, info.value.node_id) == ("r", "s")
    assert isinstance(info.value.__cause__, RuntimeError)
