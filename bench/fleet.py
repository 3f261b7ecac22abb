"""Pipelines on Celery workers: runs per second with 1 and 2 workers, and what the lease and the
shared budget cost per step against one Redis round trip measured in the same run.

Part 1, throughput: ``--runs`` runs of a 4-step pipeline whose steps each ``asyncio.sleep``
``--step-ms`` (I/O-bound), submitted at once to 1, then 2 real ``celery worker`` processes (prefork,
``--concurrency`` pool processes each) through a private ``redis-server``; runs/s from the first
submit to the last result. The ceiling is what the pool processes could do if a run cost only
its sleeps (``processes / (4 x step)``); the ratio to it is what Celery, Redis and Stroma take.

Part 2, per step (one process, one connection, loopback, median µs of interleaved rounds):

- ``PING``: one Redis round trip, the floor of any shared state;
- a checkpoint write with a plain ``SyncRedisStore`` and with a ``FencedRedisStore`` (the fence
  check is in the same script as the write);
- a ``RunLease`` taken, renewed by its thread and released (once per run: spread over the run's
  4 steps);
- a ``SharedBudget`` reserve + settle (once per attempt).

Run: ``python bench/fleet.py [--runs N] [--step-ms MS] [--concurrency C] [--ops N] [--rounds R]
[--per-step-only]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from fleet_budget import private_redis
from pydantic import BaseModel

from stroma.checkpoint import SyncRedisStore
from stroma.fleet import RunLease, SharedBudget

HERE = Path(__file__).parent


# --- part 1: throughput ---------------------------------------------------------------------------


def start_worker(name: str, env: dict[str, str], concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    command = [sys.executable, "-m", "celery", "-A", "_fleet_app", "worker", "-P", "prefork", "-c", str(concurrency)]
    command += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
    process = subprocess.Popen(
        command,
        cwd=HERE,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while b" ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"worker {name} did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, 15)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait(timeout=10)


def throughput(url: str, runs: int, step_ms: float, concurrency: int) -> None:
    prefix = f"stroma-bench-{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    env.update(
        {
            "STROMA_BENCH_REDIS": url,
            "STROMA_BENCH_PREFIX": prefix,
            "STROMA_BENCH_STEP_S": str(step_ms / 1000),
            "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
        }
    )
    os.environ.update({k: env[k] for k in ("STROMA_BENCH_REDIS", "STROMA_BENCH_PREFIX", "STROMA_BENCH_STEP_S")})
    sys.path.insert(0, str(HERE))
    import _fleet_app

    pipeline = _fleet_app.pipeline
    print(f"throughput: {runs} runs of 4 steps x {step_ms:g} ms (asyncio.sleep), {concurrency} pool processes/worker")
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as logs:
        workers: list[subprocess.Popen[bytes]] = []
        try:
            for count in (1, 2):
                while len(workers) < count:
                    name = f"bench{len(workers) + 1}"
                    workers.append(start_worker(name, env, concurrency, Path(logs) / f"{name}.log"))
                # warm-up: every pool process imports and connects once
                warm = [pipeline.submit({"n": -i}) for i in range(count * concurrency * 2)]
                for run_id in warm:
                    pipeline.result(run_id, timeout=120)
                started = time.perf_counter()
                ids = [pipeline.submit({"n": i}) for i in range(runs)]
                for run_id in ids:
                    result = pipeline.result(run_id, timeout=300)
                    assert result.status.value == "COMPLETED" and result.final_state["done"] == 4, result
                elapsed = time.perf_counter() - started
                rate = runs / elapsed
                rates[count] = rate
                ceiling = count * concurrency / (4 * step_ms / 1000)
                print(
                    f"  {count} worker(s): {rate:7.1f} runs/s   ceiling {ceiling:6.1f} runs/s   "
                    f"{rate / ceiling:5.2f}x ceiling"
                )
        finally:
            for process in workers:
                stop(process)
    print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


# --- part 2: per-step costs -----------------------------------------------------------------------


class Item(BaseModel):
    n: int


def per_step(url: str, ops: int, rounds: int) -> None:
    prefix = f"stroma-bench-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    plain = SyncRedisStore(client=client, key_prefix=prefix + "plain:", ttl_seconds=600)
    held = RunLease(f"{prefix}held", client=client, key_prefix=prefix)
    held.acquire()
    fenced = held.fenced_store(ttl_seconds=600, key_prefix=prefix + "fenced:")
    budget = SharedBudget(f"bench-{uuid.uuid4().hex}", max_cost_usd=1e6, client=client, key_prefix=prefix)
    item = Item(n=1)

    def timed(body: Any) -> float:
        started = time.perf_counter()
        for i in range(ops):
            body(i)
        return (time.perf_counter() - started) / ops * 1e6

    def lease_cycle(i: int) -> None:
        lease = RunLease(f"{prefix}run-{i}", client=client, key_prefix=prefix)
        with lease:  # acquire, start the renewal thread, release
            pass

    variants: dict[str, Any] = {
        "PING": lambda i: client.ping(),
        "checkpoint write, SyncRedisStore": lambda i: plain.save(f"{prefix}held", f"s{i % 4}", item),
        "checkpoint write, fenced": lambda i: fenced.save(f"{prefix}held", f"s{i % 4}", item),
        "lease: acquire + renewer + release": lease_cycle,
        "shared budget: reserve + settle": lambda i: budget.settle(budget.reserve(0.001, 100), 0.0009, 90),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for body in variants.values():  # warm-up
        timed(body)
    for _ in range(rounds):  # interleaved, so load on the machine hits every variant alike
        for name, body in variants.items():
            results[name].append(timed(body))
    median = {name: statistics.median(values) for name, values in results.items()}
    ping = median["PING"]
    print(f"per step: {ops} ops x {rounds} rounds, median µs per operation ({url})")
    for name, value in median.items():
        print(f"  {name:<36} {value:8.1f} µs   {value / ping:5.2f}x PING")
    fence = median["checkpoint write, fenced"] - median["checkpoint write, SyncRedisStore"]
    lease_per_step = median["lease: acquire + renewer + release"] / 4 + fence
    print(
        f"  => the lease, per step of a 4-step run (its acquire/release spread over 4 steps + the fence on "
        f"the step's write): {lease_per_step:.1f} µs = {lease_per_step / ping:.2f}x PING"
    )
    spend = median["shared budget: reserve + settle"]
    print(f"  => the shared budget, per attempt: {spend:.1f} µs = {spend / ping:.2f}x PING")
    held.close()
    budget.delete()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ops", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-step-only", action="store_true", help="skip the throughput part (no workers)")
    options = parser.parse_args()
    with private_redis() as url:
        per_step(url, options.ops, options.rounds)
        if not options.per_step_only:
            throughput(url, options.runs, options.step_ms, options.concurrency)


if __name__ == "__main__":
    main()
