"""Redis specifics against a real redis-server: TTL, key layout, clients, and a server that is down."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
from checkpoint_support import dead_redis_url
from pydantic import BaseModel

from stroma.checkpoint import CheckpointManager, RedisStore, SyncRedisStore
from stroma.checkpoint.redis import mask_url
from stroma.errors import CheckpointError, ConfigurationError

pytestmark = pytest.mark.redis

RUN = "run:1"
STEP = "step:a"


class Out(BaseModel):
    text: str


def _prefix() -> str:
    return f"stroma-test:{uuid.uuid4().hex}:"


@pytest_asyncio.fixture
async def async_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, ttl_seconds=100, key_prefix=_prefix())
    yield store
    await store.aclose()


@pytest.fixture
def sync_store(redis_url: str) -> Iterator[SyncRedisStore]:
    store = SyncRedisStore(redis_url, ttl_seconds=100, key_prefix=_prefix())
    yield store
    store.close()


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("store_type", [RedisStore, SyncRedisStore])
@pytest.mark.parametrize("ttl", [0, -5, True, 1.5, "60", None])
def test_ttl_must_be_positive_whole_seconds(store_type: type[Any], ttl: Any) -> None:
    with pytest.raises(ConfigurationError, match="ttl_seconds"):
        store_type("redis://127.0.0.1:6379/0", ttl_seconds=ttl)


@pytest.mark.parametrize("store_type", [RedisStore, SyncRedisStore])
def test_settings_are_validated_without_connecting(store_type: type[Any]) -> None:
    assert store_type("redis://127.0.0.1:1/0").ttl_seconds == 3600  # lazy: no connection attempted
    with pytest.raises(ConfigurationError, match="exactly one"):
        store_type()
    with pytest.raises(ConfigurationError, match="exactly one"):
        store_type("redis://127.0.0.1:1/0", client=object())
    with pytest.raises(ConfigurationError, match="redis_url"):
        store_type("http://user:hunter2@example.com")
    with pytest.raises(ConfigurationError, match="key_prefix"):
        store_type("redis://127.0.0.1:1/0", key_prefix="")
    with pytest.raises(ConfigurationError, match="timeout_seconds"):
        store_type("redis://127.0.0.1:1/0", timeout_seconds=0)


def test_mask_url() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://ada:s3cret@host/1") == "rediss://ada:***@host/1"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"
    assert "s3cret" not in mask_url("redis://host/0?password=s3cret&db=1")
    assert "hunter2" not in repr(RedisStore("redis://:hunter2@127.0.0.1:1/0"))


# --- layout and TTL ------------------------------------------------------------------------------


async def test_ttl_is_set_and_refreshed(async_store: RedisStore, redis_client: Any) -> None:
    key = async_store.run_key(RUN)
    await async_store.save(RUN, STEP, Out(text="x"))
    assert 0 < redis_client.ttl(key) <= 100
    redis_client.expire(key, 5)
    await async_store.save_manifest(RUN, {"steps": [STEP]})
    assert 50 < redis_client.ttl(key) <= 100


def test_sync_ttl_is_set(sync_store: SyncRedisStore, redis_client: Any) -> None:
    sync_store.save(RUN, STEP, Out(text="x"))
    assert 0 < redis_client.ttl(sync_store.run_key(RUN)) <= 100


async def test_one_key_per_run_and_delete_without_scan(async_store: RedisStore, redis_client: Any) -> None:
    for step in ("a", "b:c", "m"):
        await async_store.save(RUN, step, Out(text=step))
    await async_store.save_manifest(RUN, {"steps": ["a"]})
    await async_store.save("run", "1:step:a", Out(text="other run"))
    prefix = async_store._prefix
    assert sorted(redis_client.keys(prefix + "*")) == sorted(
        [async_store.run_key(RUN).encode(), async_store.run_key("run").encode()]
    )
    redis_client.config_resetstat()
    await async_store.delete(RUN)
    stats = redis_client.info("commandstats")
    assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats
    assert stats["cmdstat_del"]["calls"] == 1
    assert redis_client.keys(prefix + "*") == [async_store.run_key("run").encode()]
    assert await async_store.load_typed("run", "1:step:a", Out) == Out(text="other run")


async def test_writes_are_transactions(async_store: RedisStore, redis_client: Any) -> None:
    redis_client.config_resetstat()
    await async_store.save(RUN, STEP, Out(text="x"))
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_multi"]["calls"] == 1 and stats["cmdstat_exec"]["calls"] == 1


# --- clients -------------------------------------------------------------------------------------


def test_existing_sync_client_with_decoded_responses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = SyncRedisStore(client=client, key_prefix=_prefix())
    store.save(RUN, STEP, Out(text="x"))
    store.save_manifest(RUN, {"k": "v"})
    assert store.load_typed(RUN, STEP, Out) == Out(text="x")
    assert store.load_manifest(RUN) == {"k": "v"}
    assert store.completed_steps(RUN) == [STEP]
    store.close()
    assert client.ping()  # a client passed in is never closed by the store
    store.delete(RUN)
    client.close()


async def test_existing_async_client(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client=client, key_prefix=_prefix())
    await store.save(RUN, STEP, Out(text="x"))
    assert await store.load_typed(RUN, STEP, Out) == Out(text="x")
    await store.aclose()
    assert await client.ping()
    await store.delete(RUN)
    await client.aclose()


async def test_async_store_can_be_used_again_after_aclose(redis_url: str) -> None:
    store = RedisStore(redis_url, key_prefix=_prefix())
    await store.save(RUN, STEP, Out(text="x"))
    await store.aclose()
    assert await store.load_typed(RUN, STEP, Out) == Out(text="x")
    await store.delete(RUN)
    await store.aclose()


async def test_wrong_type_key_is_a_checkpoint_error(async_store: RedisStore, redis_client: Any) -> None:
    redis_client.set(async_store.run_key(RUN), "a plain string")
    with pytest.raises(CheckpointError, match="WRONGTYPE") as info:
        await async_store.save(RUN, STEP, Out(text="x"))
    assert (info.value.run_id, info.value.node_id) == (RUN, STEP)


# --- Redis down ----------------------------------------------------------------------------------


def _assert_down_error(exc: CheckpointError, step: str | None) -> None:
    message = str(exc)
    assert "hunter2" not in message
    assert "127.0.0.1" in message and "***" in message
    assert repr(RUN) in message
    if step is not None:
        assert repr(step) in message
    assert "Is Redis running" in message
    assert (exc.run_id, exc.node_id) == (RUN, step)
    assert isinstance(exc.__cause__, (redis.exceptions.ConnectionError, OSError))


async def test_async_store_down_gives_a_clear_error() -> None:
    store = RedisStore(dead_redis_url("hunter2"), timeout_seconds=1)
    started = time.monotonic()
    calls = [
        (store.save(RUN, STEP, Out(text="x")), STEP),
        (store.load_typed(RUN, STEP, Out), STEP),
        (store.load(RUN, STEP), STEP),
        (store.delete(RUN), None),
        (store.save_manifest(RUN, {}), None),
        (store.load_manifest(RUN), None),
        (store.completed_steps(RUN), None),
    ]
    for call, step in calls:
        with pytest.raises(CheckpointError) as info:
            await call
        _assert_down_error(info.value, step)
    assert time.monotonic() - started < 15
    await store.aclose()


def test_sync_store_down_gives_a_clear_error() -> None:
    store = SyncRedisStore(dead_redis_url("hunter2"), timeout_seconds=1)
    with pytest.raises(CheckpointError) as info:
        store.save(RUN, STEP, Out(text="x"))
    _assert_down_error(info.value, STEP)
    with pytest.raises(CheckpointError) as info:
        store.load_typed(RUN, STEP, Out)
    _assert_down_error(info.value, STEP)
    with pytest.raises(CheckpointError) as info:
        store.delete(RUN)
    _assert_down_error(info.value, None)
    store.close()


@pytest.mark.parametrize("store_type", [RedisStore, SyncRedisStore])
async def test_manager_over_a_down_store_fails_closed(store_type: type[Any]) -> None:
    store = store_type(dead_redis_url("hunter2"), timeout_seconds=1)
    manager = CheckpointManager(store)
    with pytest.raises(CheckpointError) as info:
        await manager.resume(RUN, STEP, Out)
    _assert_down_error(info.value, STEP)
    if isinstance(store, RedisStore):
        await store.aclose()
    else:
        store.close()


async def test_down_error_with_an_existing_client_names_its_address() -> None:
    url = dead_redis_url()
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
    store = RedisStore(client=client)
    with pytest.raises(CheckpointError) as info:
        await store.save(RUN, STEP, Out(text="x"))
    assert url.rsplit("/", 1)[0] in str(info.value)
    await client.aclose()
