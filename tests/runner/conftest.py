"""Fixtures for the runner tests: span capture, stores (Redis: ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from runner_support import STORE_KINDS

from stroma.checkpoint import AsyncInMemoryStore, AsyncSQLiteStore, CheckpointManager, InMemoryStore, SQLiteStore
from stroma.testing import TelemetryCapture, no_retry_sleep


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


@pytest.fixture
def no_sleep() -> Iterator[list[float]]:
    with no_retry_sleep() as delays:
        yield delays


@pytest_asyncio.fixture(params=STORE_KINDS)
async def manager(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CheckpointManager]:
    """A checkpoint manager over each kind of store (Redis ones against the real server)."""
    kind: str = request.param
    if kind == "memory":
        yield CheckpointManager(InMemoryStore())
    elif kind == "async-memory":
        yield CheckpointManager(AsyncInMemoryStore())
    elif kind == "sqlite":
        store = SQLiteStore(tmp_path / "ckpt.sqlite3")
        yield CheckpointManager(store)
        store.close()
    elif kind == "async-sqlite":
        async_store = AsyncSQLiteStore(tmp_path / "ckpt.sqlite3")
        yield CheckpointManager(async_store)
        await async_store.aclose()
    else:
        import uuid

        from stroma.checkpoint import RedisStore, SyncRedisStore

        url = request.getfixturevalue("redis_url")
        prefix = f"stroma-runner-test:{uuid.uuid4().hex}:"
        if kind == "redis":
            redis_store = RedisStore(url, ttl_seconds=120, key_prefix=prefix)
            yield CheckpointManager(redis_store)
            await redis_store.aclose()
        else:
            sync_store = SyncRedisStore(url, ttl_seconds=120, key_prefix=prefix)
            yield CheckpointManager(sync_store)
            sync_store.close()
