"""What the fleet-wide budget costs per attempt, against one plain Redis round trip measured in the same run.

Variants (µs per operation, median of interleaved rounds, one connection, loopback):

- ``PING``: one Redis round trip, the floor of any shared state;
- ``reserve + settle``: :meth:`SharedBudget.reserve` then :meth:`SharedBudget.settle` (two
  round trips, each one Lua script: expired-hold purge, check, hold / settle, expiry);
- ``step-loop hook``: ``reserve_attempt`` + ``settle_attempt`` as the step loop awaits them
  (the same two calls, each in a worker thread so one budget serves any event loop).

A step pays the hook once per attempt. Run: ``python bench/fleet_budget.py [--redis-url URL]
[--ops N] [--rounds R]``; without a URL a private ``redis-server`` is started on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis

from stroma.fleet import SharedBudget
from stroma.stack._native import debian_env, redis_server


@contextmanager
def private_redis() -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        args = [str(redis_server()), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [*args, "--dir", workdir], env=debian_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            for _ in range(300):
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def per_op_us(ops: int, body: Callable[[], None]) -> float:
    started = time.perf_counter()
    for _ in range(ops):
        body()
    return (time.perf_counter() - started) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("STROMA_BENCH_REDIS_URL"))
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    if options.redis_url:
        run(options.redis_url, options.ops, options.rounds)
    else:
        with private_redis() as url:
            run(url, options.ops, options.rounds)


def run(url: str, ops: int, rounds: int) -> None:
    key = f"bench:{uuid.uuid4().hex}"
    budget = SharedBudget(key, max_cost_usd=1_000_000.0, max_tokens=10**15, redis_url=url)
    plain = redis.Redis.from_url(url)
    loop = asyncio.new_event_loop()

    def ping() -> None:
        plain.ping()

    def reserve_settle() -> None:
        budget.settle(budget.reserve(0.001, 100), 0.0009, 90)

    async def hook_ops() -> None:
        for _ in range(ops):
            hold = await budget.reserve_attempt("step", "run")
            await budget.settle_attempt(hold, "step", 0.0009, 90)

    def hook() -> float:
        started = time.perf_counter()
        loop.run_until_complete(hook_ops())
        return (time.perf_counter() - started) / ops * 1e6

    results: dict[str, list[float]] = {"PING": [], "reserve + settle": [], "step-loop hook": []}
    ping()
    reserve_settle()
    loop.run_until_complete(budget.reserve_attempt("warm", "run"))
    for _ in range(rounds):  # interleaved, so load on the machine hits every variant alike
        results["PING"].append(per_op_us(ops, ping))
        results["reserve + settle"].append(per_op_us(ops, reserve_settle))
        results["step-loop hook"].append(hook())
    floor = statistics.median(results["PING"])
    print(f"fleet budget, {ops} ops x {rounds} rounds, median µs per operation ({url})")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"  {name:<18} {median:8.1f} µs   {median / floor:5.2f}x PING")
    usage = budget.usage()
    expected = rounds * ops * 2 + 1
    assert usage.holds == 1, usage  # the warm-up hold only
    exact = usage.spent_micros == expected * 900
    print(f"  settled {usage.spent_micros} micro-dollars over {expected} settles (exact: {exact})")
    budget.delete()
    budget.close()
    plain.close()
    loop.close()


if __name__ == "__main__":
    main()
