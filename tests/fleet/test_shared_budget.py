"""SharedBudget against a real redis-server: atomic reserve, idempotent settle, leases, exact totals."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from stroma.errors import ConfigurationError
from stroma.fleet import SharedBudget, SharedBudgetError, SharedBudgetExceeded, to_micros

pytestmark = pytest.mark.redis

SPENDER = Path(__file__).with_name("fleet_spender.py")


@pytest.fixture
def key() -> str:
    return f"test:{uuid.uuid4().hex}"


@pytest.fixture
def client(redis_url: str) -> Iterator[Any]:
    conn = redis.Redis.from_url(redis_url)
    yield conn
    conn.close()


def make(redis_url: str, key: str, **options: Any) -> SharedBudget:
    options.setdefault("max_cost_usd", 1.0)
    return SharedBudget(key, redis_url=redis_url, **options)


def spender(*args: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONWARNINGS="error")
    return subprocess.Popen(
        [sys.executable, str(SPENDER), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_to_micros_is_exact_and_rounds_half_up() -> None:
    assert to_micros(0.1) == 100_000
    assert to_micros(0.0000015) == 2
    assert to_micros(0.0000014) == 1
    assert sum(to_micros(0.1) for _ in range(10)) == 1_000_000  # where 0.1 * 10 floats drift
    for bad in (-0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            to_micros(bad)


def test_expiry_is_set_by_the_first_reserve_itself(redis_url: str, key: str, client: Any) -> None:
    budget = make(redis_url, key, ttl_seconds=600, lease_seconds=30)
    state, leases = budget.redis_keys
    assert client.exists(state, leases) == 0
    budget.reserve(0.01)
    # right after the one script call, with no other command in between
    assert 590 <= client.ttl(state) <= 600
    assert 0 < client.pttl(leases) <= 600_000
    budget.close()


def test_reserve_retried_with_the_same_id_changes_nothing(redis_url: str, key: str) -> None:
    budget = make(redis_url, key)
    first = budget.reserve(0.25, reservation_id="r1")
    assert not first.retried
    again = budget.reserve(0.25, reservation_id="r1")  # a client retry after a lost reply
    assert again.retried
    usage = budget.usage()
    assert (usage.held_micros, usage.holds, usage.spent_micros) == (250_000, 1, 0)
    assert budget.settle(first, 0.2)
    after_settle = budget.reserve(0.25, reservation_id="r1")  # a retry arriving after the settle
    assert after_settle.retried
    usage = budget.usage()
    assert (usage.held_micros, usage.holds, usage.spent_micros) == (0, 0, 200_000)
    budget.close()


def test_settling_twice_changes_nothing(redis_url: str, key: str) -> None:
    budget = make(redis_url, key, max_tokens=10_000)
    hold = budget.reserve(0.3, 1000)
    assert budget.settle(hold, 0.123456, 900)
    assert not budget.settle(hold, 0.123456, 900)
    assert not budget.settle(hold, 0.5, 5000)  # a different amount for a settled id is ignored too
    assert not budget.release(hold)
    usage = budget.usage()
    assert (usage.spent_micros, usage.spent_tokens, usage.held_micros, usage.held_tokens) == (123_456, 900, 0, 0)
    budget.close()


def test_refuses_past_the_limit_and_at_the_limit(redis_url: str, key: str) -> None:
    budget = make(redis_url, key, max_cost_usd=0.3)
    a = budget.reserve(0.1)
    budget.reserve(0.1)
    with pytest.raises(SharedBudgetExceeded) as refused:
        budget.reserve(0.2, step_id="draft")
    exc = refused.value
    assert (exc.dimension, exc.limit, exc.actual, exc.requested, exc.key) == ("shared_cost", 0.3, 0.2, 0.2, key)
    assert key in str(exc) and "'draft'" in str(exc)
    assert pickle.loads(pickle.dumps(exc)).key == key
    budget.settle(a, 0.2)  # spent 0.2 + held 0.1: the limit is reached
    with pytest.raises(SharedBudgetExceeded):
        budget.reserve(0.0)  # nothing starts once the limit is reached
    budget.close()


def test_token_limit(redis_url: str, key: str) -> None:
    budget = SharedBudget(key, max_tokens=1000, redis_url=redis_url)
    budget.settle(budget.reserve(0, 600), 0, 600)
    with pytest.raises(SharedBudgetExceeded) as refused:
        budget.reserve(0, 500)
    assert refused.value.dimension == "shared_tokens"
    assert "1,000 tokens" in str(refused.value)
    budget.close()


def test_other_limits_for_the_same_key_are_refused(redis_url: str, key: str) -> None:
    make(redis_url, key, max_cost_usd=1.0).reserve(0.1)
    other = make(redis_url, key, max_cost_usd=2.0)
    with pytest.raises(ConfigurationError, match="same max_cost_usd"):
        other.reserve(0.1)
    other.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_cost_usd": None}, "needs max_cost_usd, max_tokens or both"),
        ({"max_cost_usd": -1}, "max_cost_usd"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"ttl_seconds": 10, "lease_seconds": 60}, "at least lease_seconds"),
        ({"reserve_usd": float("nan")}, "reserve_usd"),
    ],
)
def test_settings_are_checked(redis_url: str, options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        make(redis_url, "k", **options)
    with pytest.raises(ConfigurationError, match="braces"):
        make(redis_url, "a{b}")


def test_unreachable_redis_names_the_budget() -> None:
    budget = SharedBudget("tenant:x", max_cost_usd=1, redis_url="redis://:secret@127.0.0.1:1/0", timeout_seconds=0.2)
    with pytest.raises(SharedBudgetError, match=r"'tenant:x' at redis://:\*\*\*@127.0.0.1:1/0") as failed:
        budget.reserve(0.1)
    assert "secret" not in str(failed.value)
    budget.close()


def test_a_killed_process_hold_expires_and_is_returned(redis_url: str, key: str) -> None:
    proc = spender("hold", redis_url, key, 1.0, 0.5, 0.8)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        budget = make(redis_url, key, max_cost_usd=1.0)
        assert budget.usage().held_micros == 800_000
        with pytest.raises(SharedBudgetExceeded):
            budget.reserve(0.5)  # the live (soon dead) process holds most of it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    time.sleep(0.6)  # past the dead process's lease
    hold = budget.reserve(0.5)  # the hold was released: the budget is back
    usage = budget.usage()
    assert (usage.held_micros, usage.holds, usage.expired_holds, usage.spent_micros) == (500_000, 1, 1, 0)
    budget.settle(hold, 0.5)
    budget.close()


def test_eight_processes_never_pass_the_bound_and_add_up_exactly(redis_url: str, key: str) -> None:
    limit_usd = 0.5
    limit = to_micros(limit_usd)
    processes = [spender("spend", redis_url, key, limit_usd) for _ in range(8)]
    for proc in processes:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in processes:  # the start signal, to all of them before waiting for any
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    results = []
    for proc in processes:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert proc.wait(timeout=120) == 0, err
        results.append(json.loads(out))
    usage = make(redis_url, key, max_cost_usd=limit_usd).usage()
    # every attempt reserves 1000 micro-dollars and spends 500-1500: an attempt overruns its
    # hold by at most 500, and at most 8 run at once (the documented bound)
    assert usage.spent_micros <= limit + 8 * 500
    assert usage.spent_micros > limit - 1000 - 8 * 500  # the budget was used up, not refused early
    assert usage.spent_micros == sum(r["settled_micros"] for r in results)  # exact, no drift
    assert (usage.held_micros, usage.holds) == (0, 0)
    assert sum(r["attempts"] for r in results) >= 400
    assert sum(1 for r in results if r["attempts"]) >= 6, results  # they spent concurrently
