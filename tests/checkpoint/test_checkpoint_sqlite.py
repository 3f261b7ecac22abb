"""SQLite specifics: WAL, durability across processes, locking, paths, lifecycle."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from pydantic import BaseModel

import stroma
from stroma.checkpoint import AsyncSQLiteStore, SQLiteStore
from stroma.checkpoint.sqlite import ENV_PATH
from stroma.errors import CheckpointError, ConfigurationError


class Out(BaseModel):
    text: str


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


def test_wal_mode_and_synchronous_setting(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SQLiteStore(path) as store:
        store.save("r", "s", Out(text="x"))
        assert _journal_mode(path) == "wal"
        assert store._connection is not None
        assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with SQLiteStore(tmp_path / "fast.sqlite3", durable=False) as store:
        store.save("r", "s", Out(text="x"))
        assert store._connection is not None
        assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SQLiteStore(path) as store:
        store.save("r", "s", Out(text="kept"))
        store.save_manifest("r", {"steps": ["s"]})
    with SQLiteStore(path) as store:
        assert store.load_typed("r", "s", Out) == Out(text="kept")
        assert store.load_manifest("r") == {"steps": ["s"]}
        assert store.completed_steps("r") == ["s"]


def test_a_write_survives_kill_9_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pydantic import BaseModel
        from stroma.checkpoint import SQLiteStore

        class Out(BaseModel):
            text: str

        store = SQLiteStore({str(path)!r})
        store.save("r", "s", Out(text="written before the kill"))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = str(Path(stroma.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    with SQLiteStore(path) as store:
        assert store.load_typed("r", "s", Out) == Out(text="written before the kill")


def test_path_from_environment_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PATH, str(tmp_path / "env" / "ckpt.db"))
    with SQLiteStore() as store:
        store.save("r", "s", Out(text="x"))
        assert store.path == str(tmp_path / "env" / "ckpt.db")
    assert (tmp_path / "env" / "ckpt.db").exists()

    monkeypatch.delenv(ENV_PATH)
    monkeypatch.chdir(tmp_path)
    with SQLiteStore() as store:
        store.save("r", "s", Out(text="x"))
    assert (tmp_path / ".stroma" / "checkpoints.sqlite3").exists()

    with SQLiteStore(tmp_path / "explicit.db") as store:  # explicit argument wins
        assert store.path == str(tmp_path / "explicit.db")


def test_in_memory_database() -> None:
    with SQLiteStore(":memory:") as store:
        store.save("r", "s", Out(text="x"))
        assert store.load_typed("r", "s", Out) == Out(text="x")


@pytest.mark.parametrize("timeout", [0, -1.0, True, "1"])
def test_invalid_settings(timeout: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout_seconds"):
        SQLiteStore(":memory:", timeout_seconds=timeout)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="path"):
        SQLiteStore("")


def test_closed_store_fails_closed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "db.sqlite3")
    store.save("r", "s", Out(text="x"))
    store.close()
    store.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed") as info:
        store.load_typed("r", "s", Out)
    assert (info.value.run_id, info.value.node_id) == ("r", "s")


def test_unopenable_database_names_run_and_step(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with SQLiteStore(blocker / "db.sqlite3") as store, pytest.raises(CheckpointError) as info:
        store.save("run-9", "step-9", Out(text="x"))
    assert (info.value.run_id, info.value.node_id) == ("run-9", "step-9")
    assert "'run-9'" in str(info.value) and str(blocker) in str(info.value)


def test_not_a_database_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "garbage.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with SQLiteStore(path) as store, pytest.raises(CheckpointError, match="SQLite"):
        store.load_typed("r", "s", Out)


def test_database_from_a_newer_stroma_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SQLiteStore(path) as store:
        store.save("r", "s", Out(text="x"))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE stroma_meta SET value = '99' WHERE key = 'layout_version'")
    conn.close()
    with SQLiteStore(path) as store, pytest.raises(CheckpointError, match="newer Stroma") as info:
        store.load_typed("r", "s", Out)
    assert info.value.run_id == "r"


def test_locked_database_times_out_and_keeps_the_old_value(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SQLiteStore(path, timeout_seconds=0.1) as store:
        store.save("r", "s", Out(text="old"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(CheckpointError, match="locked") as info:
                store.save("r", "s", Out(text="new"))
            assert (info.value.run_id, info.value.node_id) == ("r", "s")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert store.load_typed("r", "s", Out) == Out(text="old")


def test_concurrent_threads(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "db.sqlite3") as store:

        def work(worker: int) -> None:
            for index in range(20):
                store.save("r", f"{worker}-{index}", Out(text=str(index)))

        threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(store.completed_steps("r")) == 160


def test_two_stores_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with SQLiteStore(path) as first, SQLiteStore(path) as second:
        first.save("r", "s", Out(text="from first"))
        assert second.load_typed("r", "s", Out) == Out(text="from first")
        second.delete("r")
        assert first.load_typed("r", "s", Out) is None


async def test_async_store_keeps_call_order(tmp_path: Path) -> None:
    async with AsyncSQLiteStore(tmp_path / "db.sqlite3") as store:
        await asyncio.gather(*(store.save("r", "s", Out(text=str(index))) for index in range(30)))
        assert await store.load_typed("r", "s", Out) == Out(text="29")


async def test_async_store_after_close(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "db.sqlite3")
    await store.save("r", "s", Out(text="x"))
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        await store.load_typed("r", "s", Out)
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("stroma-checkpoint-sqlite")]
    assert "db.sqlite3" in repr(store) and store.path.endswith("db.sqlite3")


def test_async_store_closes_without_a_loop(tmp_path: Path) -> None:
    store = AsyncSQLiteStore(tmp_path / "db.sqlite3")
    asyncio.run(store.save("r", "s", Out(text="x")))
    store.close()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("stroma-checkpoint-sqlite")]
