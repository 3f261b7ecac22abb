"""Real Celery workers (prefork, subprocesses on loopback) and a real redis-server as broker and store.

42 runs of the 4-step pipeline of ``celery_app.py`` on two workers of two pool processes each:
a pool child is SIGKILLed mid-step before its side effect, another after its side effect and
before its checkpoint (the at-least-once window), then a whole worker (its process group) is
SIGKILLed mid-step; one more run kills its own worker process at every delivery (a poison run).
Every run completes, every completed step's side effect happened exactly once except the one in
the window (twice, and once through its idempotency key), no run executed in two live
processes at once (one more run is published twice and both deliveries start together: it runs
once), and the poison run stops FAILED after ``MAX_DELIVERIES`` deliveries.

The slowest file of the unit suite: about 15-20 s here, two worker starts included (marked
``redis``). The re-queue intervals are shortened in ``celery_app.py`` (visibility timeout 6 s,
restore sweep every 1 s, lease 1.5 s); the production values are in the README.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from stroma import RunStatus

pytestmark = pytest.mark.redis

HERE = Path(__file__).parent
RUNS = 40
WORKER_START_TIMEOUT = 60.0
PAUSE_WAIT = 45.0
RESULT_TIMEOUT = 90.0


def with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def fleet(redis_url: str) -> Iterator[ModuleType]:
    """``celery_app`` imported with this module's broker, store and key prefix."""
    env = {
        "STROMA_CELERY_BROKER": with_db(redis_url, 1),
        "STROMA_CELERY_STORE": redis_url,
        "STROMA_CELERY_PREFIX": f"stroma-celery-{uuid.uuid4().hex[:12]}:",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    sys.modules.pop("celery_app", None)
    module = importlib.import_module("celery_app")
    yield module
    sys.modules.pop("celery_app", None)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class Worker:
    """One ``celery worker`` in a process group of its own (killed whole by its group id)."""

    def __init__(self, name: str, log: Path) -> None:
        self.name = name
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        self.out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "INFO",
            ],
            cwd=HERE,
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pgid = self.process.pid  # a new session: the worker leads its own group

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while b" ready." not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def owns(self, pid: int) -> bool:
        try:
            return os.getpgid(pid) == self.pgid
        except ProcessLookupError:
            return False

    def kill_group(self) -> None:
        os.killpg(self.pgid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.pgid, signal.SIGTERM)
                self.process.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self.process.wait(timeout=10)
        else:
            with contextlib.suppress(ProcessLookupError):  # pool children left behind by a killed parent
                os.killpg(self.pgid, signal.SIGKILL)
        self.out.close()


@pytest.fixture(scope="module")
def workers(fleet: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    logs = tmp_path_factory.mktemp("celery-workers")
    started = [Worker(name, logs / f"{name}.log") for name in ("w1", "w2")]
    try:
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            worker.stop()


def wait_pausing(store: redis.Redis, prefix: str, label: str) -> tuple[str, int]:
    deadline = time.monotonic() + PAUSE_WAIT
    while time.monotonic() < deadline:
        raw = store.get(f"{prefix}pausing:{label}")
        if raw is not None:
            step, pid = raw.decode().split()
            return step, int(pid)
        time.sleep(0.02)
    raise AssertionError(f"run {label} never paused")


def wait_for(check: Any, what: str, timeout: float = RESULT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_forty_runs_survive_killed_pool_children_and_a_killed_worker(
    fleet: ModuleType, workers: list[Worker], redis_url: str
) -> None:
    prefix = fleet.PREFIX
    store = redis.Redis.from_url(redis_url)
    tag = uuid.uuid4().hex[:8]
    labels = [f"run-{i:02d}-{tag}" for i in range(RUNS)]
    child_before, child_after, whole_worker = labels[5], labels[6], labels[7]
    poison = f"poison-{tag}"
    special = {
        child_before: {"pause_step": "b", "pause_when": "before"},
        child_after: {"pause_step": "c", "pause_when": "after"},
        whole_worker: {"pause_step": "b", "pause_when": "before"},
    }
    # the same run published twice (a producer that retried its publish), first in the queue:
    # both messages are delivered at once, to two pool processes; the lease keeps the second
    # from running it while the first is in a slow step
    duplicate = f"duplicate-{tag}"
    for _ in range(2):
        fleet.pipeline.submit({"label": duplicate, "n": -2, "pause_step": "b", "pause_when": "hold"}, run_id=duplicate)
    submitted = []
    for i, label in enumerate(labels):
        state = {"label": label, "n": i, **special.get(label, {})}
        submitted.append(fleet.pipeline.submit(state, run_id=label))
    assert submitted == labels  # submitting returns the run id
    assert fleet.pipeline.submit({"label": poison, "n": -1, "poison": True}, run_id=poison) == poison

    # 1. a pool child killed mid-step, before the step's side effect
    step, pid = wait_pausing(store, prefix, child_before)
    assert step == "b"
    os.kill(pid, signal.SIGKILL)
    # 2. a pool child killed after the side effect of step c and before its checkpoint
    step, pid = wait_pausing(store, prefix, child_after)
    assert step == "c"
    os.kill(pid, signal.SIGKILL)
    # 3. a whole worker (parent and pool children) killed while one of its children is mid-step
    step, pid = wait_pausing(store, prefix, whole_worker)
    assert step == "b"
    owner = next(w for w in workers if w.owns(pid))
    owner.kill_group()

    results = {label: fleet.pipeline.result(label, timeout=RESULT_TIMEOUT) for label in labels}
    poisoned = fleet.pipeline.result(poison, timeout=RESULT_TIMEOUT)
    duplicated = fleet.pipeline.result(duplicate, timeout=RESULT_TIMEOUT)
    assert duplicated.status is RunStatus.COMPLETED and duplicated.final_state["done"] == ["a", "b", "c", "d"]
    # (at least 2: a delivery of it may also have been in the worker that was killed)
    wait_for(lambda: fleet.pipeline.deliveries(duplicate) >= 2, f"the second delivery of {duplicate}")

    # every run completed, all four steps, under its own run id
    for label, result in results.items():
        assert result.run_id == label
        assert result.status is RunStatus.COMPLETED, (label, result.error)
        assert result.final_state["done"] == ["a", "b", "c", "d"], label
        assert 1 <= result.deliveries <= fleet.MAX_DELIVERIES, (label, result.deliveries)
    for label in (child_before, child_after, whole_worker):
        assert results[label].deliveries >= 2, label  # redelivered, resumed

    # every completed step's side effect happened exactly once, except the one in the window
    ledger = Counter(" ".join(entry.decode().split()[:2]) for entry in store.lrange(f"{prefix}ledger", 0, -1))
    expected = Counter({f"{label} {step}": 1 for label in labels for step in "abcd"})
    expected[f"{child_after} c"] = 2  # killed after its side effect, before its checkpoint: ran again
    expected[f"{poison} a"] = 1  # the poison run's first step completed once; b never did
    expected.update({f"{duplicate} {step}": 1 for step in "abcd"})  # delivered twice, run once
    assert ledger == expected
    # ... and through its idempotency key (run, step) the effect was applied once
    effects = store.hgetall(f"{prefix}effects")
    assert len(effects) == RUNS * 4 + 1 + 4

    # no run executed in two live processes at once (the lease)
    assert [v.decode() for v in store.lrange(f"{prefix}violations", 0, -1)] == []

    # the poison run: stopped after MAX_DELIVERIES deliveries, FAILED, naming the run and the count
    assert poisoned.status is RunStatus.FAILED
    # MAX_DELIVERIES + 1, or one more when Redis' visibility timeout also duplicated its message
    # (a retry waiting past it in a busy worker); the duplicate stops the same way
    count = poisoned.deliveries
    assert count in (fleet.MAX_DELIVERIES + 1, fleet.MAX_DELIVERIES + 2)
    assert poison in (poisoned.error or "") and f"delivered {count} times" in (poisoned.error or "")
    assert fleet.pipeline.deliveries(poison) >= count
    store.close()
