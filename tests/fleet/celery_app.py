"""The Celery app of the fleet tests: a 4-step pipeline whose steps write side effects to a ledger.

Imported by the test (to submit) and by real ``celery worker`` processes (``-A celery_app``),
configured through the environment:

    STROMA_CELERY_BROKER   Redis URL of the broker and the result backend
    STROMA_CELERY_STORE    Redis URL of the checkpoints, leases, delivery counts and the ledger
    STROMA_CELERY_PREFIX   prefix of every key of this test session, and the queue name

Each step ``a``, ``b``, ``c``, ``d`` of run R, in order:

1. marks the run busy (``<prefix>busy:R`` = its pid). If another **live** process holds the mark,
   the run is executing twice at once: a violation is pushed to ``<prefix>violations``;
2. pauses when the state asks for it at this step, on the run's first pause only (``pause_when``
   ``"before"``: before the side effect; ``"after"``: after it, before the checkpoint), publishing
   ``<prefix>pausing:R`` = ``"<step> <pid>"`` for the test to kill that process; ``"hold"``
   only makes the step slow (every time);
3. kills its own process when ``poison`` is set, at step ``b`` (a poison run);
4. does its side effect: ``RPUSH <prefix>ledger "R step pid"`` (counted raw) and
   ``HSETNX <prefix>effects R:step pid`` (the same effect made idempotent by ``(run, step)``);
5. clears the busy mark and returns the state with the step appended to ``done``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis
from celery import Celery
from pydantic import BaseModel

from stroma.integrations.celery import CeleryPipeline, celery_settings
from stroma.runner import StromaRunner

BROKER = os.environ.get("STROMA_CELERY_BROKER", "redis://127.0.0.1:6379/1")
STORE = os.environ.get("STROMA_CELERY_STORE", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("STROMA_CELERY_PREFIX", "stroma-celery-test:")

# Test values: short enough that a killed worker's runs come back within seconds. Production
# values are in the README ("Past one machine").
VISIBILITY_TIMEOUT = 6.0
RUN_TIMEOUT_MS = 5_000
LEASE_SECONDS = 1.5
RENEW_EVERY = 0.4
MAX_DELIVERIES = 2
STEP_SECONDS = 0.03
PAUSE_SECONDS = 4.0  # a paused step waits this long for the test to kill it
HOLD_SECONDS = 1.5  # a slow step ("hold"), not killed

app = Celery("stroma_fleet_test", broker=BROKER, backend=BROKER)
app.conf.update(celery_settings(visibility_timeout=VISIBILITY_TIMEOUT))
app.conf.broker_transport_options.update(
    {
        # restore unacknowledged messages of a dead worker every second (production: the
        # defaults, 10 s x 10)
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "global_keyprefix": PREFIX,
    }
)
app.conf.update(
    task_default_queue=PREFIX + "runs",
    result_backend_transport_options={"global_keyprefix": PREFIX},
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class Work(BaseModel):
    label: str
    n: int
    pause_step: str = ""
    pause_when: str = ""
    poison: bool = False
    done: list[str] = []


runner = StromaRunner.quick(run_timeout_ms=RUN_TIMEOUT_MS, workflow_name="fleet-test")
_client: redis.Redis | None = None


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(STORE)
    return _client


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def pause(state: Work, step: str, when: str) -> None:
    if state.pause_step != step:
        return
    if state.pause_when == "hold" and when == "before":
        await asyncio.sleep(HOLD_SECONDS)  # a slow step: a duplicate delivery arrives meanwhile
        return
    if state.pause_when != when:
        return
    r = client()
    if not r.set(f"{PREFIX}paused:{state.label}", "1", nx=True):
        return  # paused once already: this is the delivery that resumes the run
    r.set(f"{PREFIX}pausing:{state.label}", f"{step} {os.getpid()}")
    await asyncio.sleep(PAUSE_SECONDS)
    r.rpush(f"{PREFIX}violations", f"{state.label} {step}: paused {PAUSE_SECONDS} s and was not killed")


async def work(state: Work, step: str) -> Work:
    r = client()
    pid = os.getpid()
    busy = f"{PREFIX}busy:{state.label}"
    if not r.set(busy, pid, nx=True, px=60_000):
        holder = int(r.get(busy) or 0)
        if holder and holder != pid and alive(holder):
            r.rpush(f"{PREFIX}violations", f"{state.label} {step}: pid {pid} ran while pid {holder} ran it")
        r.set(busy, pid, px=60_000)
    await pause(state, step, "before")
    if state.poison and step == "b":
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(STEP_SECONDS)
    r.rpush(f"{PREFIX}ledger", f"{state.label} {step} {pid} {time.time():.6f}")
    r.hsetnx(f"{PREFIX}effects", f"{state.label}:{step}", pid)
    await pause(state, step, "after")
    r.delete(busy)
    return state.model_copy(update={"done": [*state.done, step]})


@runner.node("a", input=Work, output=Work)
async def step_a(state: Work) -> Work:
    return await work(state, "a")


@runner.node("b", input=Work, output=Work)
async def step_b(state: Work) -> Work:
    return await work(state, "b")


@runner.node("c", input=Work, output=Work)
async def step_c(state: Work) -> Work:
    return await work(state, "c")


@runner.node("d", input=Work, output=Work)
async def step_d(state: Work) -> Work:
    return await work(state, "d")


pipeline = CeleryPipeline(
    app,
    "stroma_test.fleet_pipeline",
    [step_a, step_b, step_c, step_d],
    runner,
    redis_url=STORE,
    max_deliveries=MAX_DELIVERIES,
    lease_seconds=LEASE_SECONDS,
    renew_every=RENEW_EVERY,
    checkpoint_ttl_seconds=600,
    key_prefix=PREFIX,
    checkpoint_key_prefix=PREFIX + "ckpt:",
)
