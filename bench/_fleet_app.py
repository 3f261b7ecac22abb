"""The Celery app of bench/fleet.py: a 4-step pipeline of I/O-bound steps (``asyncio.sleep``).

Configured through the environment: ``STROMA_BENCH_REDIS`` (broker, results, checkpoints),
``STROMA_BENCH_PREFIX`` (keys and queue), ``STROMA_BENCH_STEP_S`` (seconds each step sleeps).
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery
from pydantic import BaseModel

from stroma.integrations.celery import CeleryPipeline, celery_settings
from stroma.runner import StromaRunner

REDIS = os.environ.get("STROMA_BENCH_REDIS", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("STROMA_BENCH_PREFIX", "stroma-bench:")
STEP_S = float(os.environ.get("STROMA_BENCH_STEP_S", "0.02"))

app = Celery("stroma_fleet_bench", broker=REDIS, backend=REDIS)
app.conf.update(celery_settings(visibility_timeout=600))
app.conf.broker_transport_options.update({"global_keyprefix": PREFIX})
app.conf.update(
    task_default_queue=PREFIX + "runs",
    result_backend_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class Item(BaseModel):
    n: int
    done: int = 0


runner = StromaRunner.quick(run_timeout_ms=60_000, workflow_name="fleet-bench")


async def io_step(state: Item) -> Item:
    await asyncio.sleep(STEP_S)
    return Item(n=state.n, done=state.done + 1)


@runner.node("s1", input=Item, output=Item)
async def s1(state: Item) -> Item:
    return await io_step(state)


@runner.node("s2", input=Item, output=Item)
async def s2(state: Item) -> Item:
    return await io_step(state)


@runner.node("s3", input=Item, output=Item)
async def s3(state: Item) -> Item:
    return await io_step(state)


@runner.node("s4", input=Item, output=Item)
async def s4(state: Item) -> Item:
    return await io_step(state)


NODES = [s1, s2, s3, s4]
pipeline = CeleryPipeline(
    app, "stroma_bench.pipeline", NODES, runner, redis_url=REDIS, key_prefix=PREFIX, checkpoint_key_prefix=PREFIX
)
