"""RunLease and FencedRedisStore against a real redis-server: one holder, growing fences, stale writes refused."""

from __future__ import annotations

import logging
import pickle
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from stroma.checkpoint import CheckpointManager, SyncRedisStore
from stroma.errors import CheckpointError, ConfigurationError
from stroma.fleet import FencedRedisStore, RunLease, RunLeaseError, RunLeaseHeld, StaleFenceError

pytestmark = pytest.mark.redis


class Out(BaseModel):
    value: str


@pytest.fixture
def run_id() -> str:
    return f"run:{uuid.uuid4().hex}"


@pytest.fixture
def prefix() -> str:
    return f"stroma-lease-test:{uuid.uuid4().hex}:"


@pytest.fixture
def leases(redis_url: str, prefix: str) -> Iterator[Any]:
    made: list[RunLease] = []

    def make(run_id: str, **options: Any) -> RunLease:
        lease = RunLease(run_id, redis_url=redis_url, key_prefix=prefix, **options)
        made.append(lease)
        return lease

    yield make
    for lease in made:
        lease.close()


def test_two_acquirers_one_wins_the_loser_is_told_who_holds_it(leases: Any, run_id: str) -> None:
    first = leases(run_id, owner="worker-a")
    second = leases(run_id, owner="worker-b")
    assert first.acquire() == 1
    with pytest.raises(RunLeaseHeld) as held:
        second.acquire()
    message = str(held.value)
    assert run_id in message and "'worker-a'" in message and "ms" in message
    assert held.value.run_id == run_id
    assert pickle.loads(pickle.dumps(held.value)).run_id == run_id
    assert second.token is None and not second.held


def test_after_expiry_the_next_acquirer_gets_a_higher_fence(leases: Any, run_id: str) -> None:
    first = leases(run_id, lease_seconds=0.3)
    second = leases(run_id, lease_seconds=0.3)
    token = first.acquire()
    time.sleep(0.45)  # not renewed: it lapses
    assert second.acquire() > token
    assert not first.renew() and first.lost


def test_renewal_keeps_the_lease_past_its_length_and_release_frees_it(leases: Any, run_id: str) -> None:
    other = leases(run_id, lease_seconds=0.3)
    with leases(run_id, lease_seconds=0.3, renew_every=0.05) as lease:
        time.sleep(0.8)  # well past one lease length
        with pytest.raises(RunLeaseHeld):
            other.acquire()
        assert lease.held
    assert other.acquire() == 2  # released on exit: no need to wait for it to lapse


async def test_async_context_manager(leases: Any, run_id: str) -> None:
    async with leases(run_id) as lease:
        assert lease.held and lease.token == 1
    assert not lease.held


def test_a_renewal_finds_out_that_the_lease_was_taken_over(
    leases: Any, run_id: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    lease = leases(run_id, lease_seconds=0.3, renew_every=0.05)
    newer = leases(run_id, lease_seconds=30)
    with caplog.at_level(logging.WARNING, logger="stroma"), lease:
        conn = redis.Redis.from_url(redis_url)
        conn.delete(lease.lease_key)  # as if it had lapsed during a pause
        conn.close()
        newer.acquire()
        deadline = time.monotonic() + 5
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease.lost and not lease.held
    assert newer.held and newer.renew()  # the old holder's release did not delete the new lease
    assert any("was lost" in record.getMessage() for record in caplog.records)


def test_a_stale_worker_cannot_overwrite_the_newer_workers_checkpoint(leases: Any, run_id: str, prefix: str) -> None:
    old = leases(run_id, lease_seconds=0.3)
    old.acquire()
    old_store = old.fenced_store(ttl_seconds=60, key_prefix=prefix + "ckpt:")
    old_store.save(run_id, "draft", Out(value="old"))
    time.sleep(0.45)  # the old worker stalls past its lease; the run is redelivered
    new = leases(run_id, lease_seconds=30)
    new.acquire()
    new_store = new.fenced_store(ttl_seconds=60, key_prefix=prefix + "ckpt:")
    new_store.save(run_id, "draft", Out(value="new"))
    new_store.save_manifest(run_id, {"steps": ["draft"]})

    with pytest.raises(StaleFenceError) as stale:
        old_store.save(run_id, "draft", Out(value="stale"))
    message = str(stale.value)
    assert run_id in message and "'draft'" in message and "token 1" in message and "token is 2" in message
    assert isinstance(stale.value, CheckpointError) and stale.value.run_id == run_id
    with pytest.raises(StaleFenceError):
        old_store.save_manifest(run_id, {"steps": []})
    with pytest.raises(StaleFenceError):
        old_store.delete(run_id)

    reader = SyncRedisStore(client=new.client, key_prefix=prefix + "ckpt:")  # the plain layout reads it
    assert reader.load_typed(run_id, "draft", Out) == Out(value="new")
    assert reader.load_manifest(run_id) == {"steps": ["draft"]}
    assert reader.completed_steps(run_id) == ["draft"]
    new_store.delete(run_id)
    assert reader.load_typed(run_id, "draft", Out) is None


async def test_the_fenced_store_works_under_the_checkpoint_manager(leases: Any, run_id: str, prefix: str) -> None:
    lease = leases(run_id)
    lease.acquire()
    manager = CheckpointManager(FencedRedisStore(lease, key_prefix=prefix + "ckpt:", ttl_seconds=60))
    await manager.checkpoint(run_id, "draft", Out(value="v"), schema=Out)
    assert await manager.resume(run_id, "draft", Out) == Out(value="v")
    with pytest.raises(CheckpointError, match=r"fenced for run .* cannot write step 'draft' of run 'other'"):
        await manager.checkpoint("other", "draft", Out(value="v"))


def test_writes_before_acquiring_are_refused(leases: Any, run_id: str) -> None:
    store = leases(run_id).fenced_store()
    with pytest.raises(CheckpointError, match="never acquired"):
        store.save(run_id, "draft", Out(value="v"))


def test_settings_and_unreachable_redis() -> None:
    with pytest.raises(ConfigurationError, match="renew_every"):
        RunLease("r", redis_url="redis://127.0.0.1:1/0", lease_seconds=1, renew_every=2)
    with pytest.raises(ConfigurationError, match=r"RunLease\.run_id"):
        RunLease("", redis_url="redis://127.0.0.1:1/0")
    lease = RunLease("run-7", redis_url="redis://127.0.0.1:1/0", timeout_seconds=0.2)
    with pytest.raises(RunLeaseError, match="could not take the lease of run 'run-7'"):
        lease.acquire()
    lease.close()
