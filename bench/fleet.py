"""Pipelines on Celery workers: runs per second with 1 and 2 workers, and what the lease and the
shared budget cost per step against one Redis round trip measured in the same run.

Part 1, throughput: ``--runs`` runs of a 4-step pipeline whose steps each ``asyncio.sleep``
``--step-ms`` (I/O-bound), submitted at once to 1, then 2 real ``celery worker`` processes (prefork,
``--concurrency`` pool processes each) through a private ``redis-server``; runs/s from the first
submit to the last result. The ceiling is what the pool processes could do if a run cost only
its sleeps (``processes / (4 x step)``); the ratio to it is what Celery, Redis and Stroma take.

Part 2, per step (one process, loopback, median µs of interleaved rounds; steps do nothing):

- ``PING``: one Redis round trip;
- a 4-step run through ``StromaRunner`` with a plain ``SyncRedisStore`` (the floor);
- the same with the run's ``RunLease`` taken, renewed and released and every checkpoint write
  fenced (``FencedRedisStore``): what the lease adds, per step (its acquire and release, once
  per run, spread over the run's 4 steps);
- the same as the floor with a ``SharedBudget`` (reserve before and settle after every attempt):
  what the shared budget adds, per step.

Run: ``python bench/fleet.py [--runs N] [--step-ms MS] [--concurrency C] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
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

from stroma.checkpoint import CheckpointManager, SyncRedisStore
from stroma.fleet import RunLease, SharedBudget
from stroma.runner import StromaRunner

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


def trivial_runner(store: Any, **config: Any) -> tuple[StromaRunner, list[Any]]:
    runner = StromaRunner.quick(store=store, **config)
    nodes = []
    for step_id in ("s1", "s2", "s3", "s4"):

        @runner.node(step_id, input=Item, output=Item)
        async def step(state: Item) -> Item:
            return state

        nodes.append(step)
    return runner, nodes


def per_step(url: str, ops: int, rounds: int) -> None:
    prefix = f"stroma-bench-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    plain_store = SyncRedisStore(client=client, key_prefix=prefix + "plain:", ttl_seconds=600)
    plain, plain_nodes = trivial_runner(plain_store)
    budget = SharedBudget(f"bench-{uuid.uuid4().hex}", max_cost_usd=1e6, client=client, key_prefix=prefix)
    budgeted, budget_nodes = trivial_runner(
        SyncRedisStore(client=client, key_prefix=prefix + "budget:", ttl_seconds=600), shared_budget=budget
    )
    fenced, fenced_nodes = trivial_runner(plain_store)
    loop = asyncio.new_event_loop()

    def ping_us() -> float:
        started = time.perf_counter()
        for _ in range(ops * 4):
            client.ping()
        return (time.perf_counter() - started) / (ops * 4) * 1e6

    def runs_us(runner: StromaRunner, nodes: list[Any]) -> float:
        async def body() -> None:
            for i in range(ops):
                await runner.run(nodes, Item(n=i))

        started = time.perf_counter()
        loop.run_until_complete(body())
        return (time.perf_counter() - started) / (ops * 4) * 1e6

    def leased_us() -> float:
        async def body() -> None:
            for i in range(ops):
                run_id = f"{prefix}run-{uuid.uuid4().hex}"
                lease = RunLease(run_id, client=client, key_prefix=prefix)
                async with lease:
                    fenced.checkpoint_manager = CheckpointManager(
                        lease.fenced_store(ttl_seconds=600, key_prefix=prefix + "fenced:")
                    )
                    await fenced.run(fenced_nodes, Item(n=i), run_id=run_id)

        started = time.perf_counter()
        loop.run_until_complete(body())
        return (time.perf_counter() - started) / (ops * 4) * 1e6

    results: dict[str, list[float]] = {"PING": [], "plain store": [], "lease + fence": [], "shared budget": []}
    runs_us(plain, plain_nodes)  # warm-up
    for _ in range(rounds):
        results["PING"].append(ping_us())
        results["plain store"].append(runs_us(plain, plain_nodes))
        results["lease + fence"].append(leased_us())
        results["shared budget"].append(runs_us(budgeted, budget_nodes))
    median = {name: statistics.median(values) for name, values in results.items()}
    floor, ping = median["plain store"], median["PING"]
    print(f"per step: {ops} runs of 4 trivial steps x {rounds} rounds, median µs per step ({url})")
    print(f"  PING (one Redis round trip)       {ping:8.1f} µs")
    print(f"  step, plain SyncRedisStore        {floor:8.1f} µs   {floor / ping:5.2f}x PING")
    for name in ("lease + fence", "shared budget"):
        added = median[name] - floor
        print(f"  step, {name:<27} {median[name]:8.1f} µs   adds {added:7.1f} µs = {added / ping:5.2f}x PING")
    budget.delete()
    loop.close()
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    with private_redis() as url:
        per_step(url, options.ops, options.rounds)
        throughput(url, options.runs, options.step_ms, options.concurrency)


if __name__ == "__main__":
    main()
