"""Fixtures for the checkpoint tests: a real redis-server, and every store behind one harness."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from checkpoint_support import Harness, free_port

from stroma._tools import debian_env, redis_server
from stroma.checkpoint import (
    AsyncInMemoryStore,
    AsyncSQLiteStore,
    InMemoryStore,
    RedisStore,
    SQLiteStore,
    SyncRedisStore,
)

REDIS_START_TIMEOUT = 15.0


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence, stopped by PID at the end."""
    try:
        binary = redis_server()
    except Exception as exc:  # no binary and no apt: cannot run here
        pytest.skip(f"redis-server is not available: {exc}")
    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    log_path = workdir / "redis.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
            ],
            env=debian_env(),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while not _ping(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        os.kill(process.pid, 15)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait(timeout=10)


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
        return None if text is None else text.encode()

    def put(run_id: str, step_id: str | None, raw: bytes) -> None:
        record = inner._runs[run_id]
        # the in-memory store keeps text; undecodable bytes are kept as their escaped form
        text = raw.decode("utf-8", errors="surrogateescape")
        if step_id is None:
            record.manifest = text
        else:
            record.steps[step_id] = (text, record.steps[step_id][1])

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
