"""Fixtures for the checkpoint tests: every store behind one harness (Redis: ``tests/conftest.py``)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from checkpoint_support import Harness

from stroma.checkpoint import (
    AsyncInMemoryStore,
    AsyncSQLiteStore,
    InMemoryStore,
    RedisStore,
    SQLiteStore,
    SyncRedisStore,
)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# --- one harness over every store ---------------------------------------------------------------


def _memory_raw(inner: InMemoryStore) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def get(run_id: str, step_id: str | None) -> bytes | None:
        record = inner._runs.get(run_id)
        if record is None:
            return None
        text = record.manifest if step_id is None else record.steps.get(step_id, (None, None))[0]
        return text.encode() if isinstance(text, str) else text

    def put(run_id: str, step_id: str | None, raw: bytes) -> None:
        record = inner._runs[run_id]
        if step_id is None:
            # the in-memory store keeps manifests as text; undecodable bytes as their escaped form
            record.manifest = raw.decode("utf-8", errors="surrogateescape")
        else:
            record.steps[step_id] = (raw, record.steps[step_id][1])  # step checkpoints as bytes

    return get, put


def _sqlite_raw(path: Path) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def get(run_id: str, step_id: str | None) -> bytes | None:
        with sqlite3.connect(path) as conn:
            if step_id is None:
                row = conn.execute(
                    "SELECT CAST(envelope AS BLOB) FROM stroma_manifest WHERE run_id = ?", (run_id,)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT CAST(envelope AS BLOB) FROM stroma_checkpoint WHERE run_id = ? AND step_id = ?",
                    (run_id, step_id),
                ).fetchone()
        conn.close()
        return None if row is None else bytes(row[0])

    def put(run_id: str, step_id: str | None, raw: bytes) -> None:
        with sqlite3.connect(path) as conn:
            if step_id is None:
                conn.execute("UPDATE stroma_manifest SET envelope = ? WHERE run_id = ?", (raw, run_id))
            else:
                conn.execute(
                    "UPDATE stroma_checkpoint SET envelope = ? WHERE run_id = ? AND step_id = ?",
                    (raw, run_id, step_id),
                )
        conn.close()

    return get, put


def _redis_raw(client: Any, store: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    def field_of(step_id: str | None) -> str:
        return "m" if step_id is None else "s:" + step_id

    def get(run_id: str, step_id: str | None) -> bytes | None:
        value = client.hget(store.run_key(run_id), field_of(step_id))
        return None if value is None else bytes(value)

    def put(run_id: str, step_id: str | None, raw: bytes) -> None:
        client.hset(store.run_key(run_id), field_of(step_id), raw)

    return get, put


STORE_KINDS = [
    "memory",
    "async-memory",
    "sqlite",
    "async-sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("sync-redis", marks=pytest.mark.redis),
]


@pytest_asyncio.fixture(params=STORE_KINDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "memory":
        store: Any = InMemoryStore()
        yield Harness(kind, store, *_memory_raw(store))
    elif kind == "async-memory":
        store = AsyncInMemoryStore()
        yield Harness(kind, store, *_memory_raw(store._inner))
    elif kind == "sqlite":
        path = tmp_path / "ckpt.sqlite3"
        store = SQLiteStore(path)
        yield Harness(kind, store, *_sqlite_raw(path), extras={"path": path})
        store.close()
    elif kind == "async-sqlite":
        path = tmp_path / "ckpt.sqlite3"
        store = AsyncSQLiteStore(path)
        yield Harness(kind, store, *_sqlite_raw(path), extras={"path": path})
        await store.aclose()
    else:
        url = request.getfixturevalue("redis_url")
        client = request.getfixturevalue("redis_client")
        prefix = f"stroma-test:{uuid.uuid4().hex}:"
        if kind == "redis":
            store = RedisStore(url, ttl_seconds=120, key_prefix=prefix)
            yield Harness(kind, store, *_redis_raw(client, store), extras={"client": client})
            await store.aclose()
        else:
            store = SyncRedisStore(url, ttl_seconds=120, key_prefix=prefix)
            yield Harness(kind, store, *_redis_raw(client, store), extras={"client": client})
            store.close()
