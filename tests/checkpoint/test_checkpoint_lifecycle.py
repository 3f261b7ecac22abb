"""Stores across process and loop lifecycles: a fork after use (issue 8 E18), a stalled sync store (E19)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from stroma import StromaRunner
from stroma.checkpoint import CheckpointManager
from stroma.errors import CheckpointError

HERE = Path(__file__).parent
STORE_TIMEOUT = 0.3
SLACK = 1.0  # generous for a loaded 2-core machine; the unfixed behaviour took the store's full 5 s


class Text(BaseModel):
    text: str


class BlockingStore:
    """A sync third-party store whose step checkpoint blocks until *release* is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.saved: list[str] = []

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        if node_id == "shout":
            self.release.wait()
        self.saved.append(node_id)

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return None

    def delete(self, run_id: str) -> None:
        pass


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sqlite_stores_used_before_a_fork_work_in_the_child(tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, str(HERE / "fork_store_child.py"), str(tmp_path / "db"), str(result_path)],
        capture_output=True,
        text=True,
        timeout=60,  # a hang fails the test instead of stalling the suite
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(result_path.read_text())
    # async store, then sync store: each call in the child answers at once, not after the 10 s timeout
    for outcome in result["child"]:
        assert outcome["ok"], outcome["error"]
        assert outcome["seconds"] < 3.0
    assert all(outcome["ok"] for outcome in result["parent"]), result["parent"]
    # the parent still uses its own connection and thread, and sees the child's write
    assert result["steps"] == [["before", "child", "after"], ["before", "child", "after"]]


def test_run_sync_returns_within_the_store_timeout_when_a_sync_store_stalls() -> None:
    store = BlockingStore()
    runner = StromaRunner.quick()
    runner.checkpoint_manager = CheckpointManager(store, timeout_seconds=STORE_TIMEOUT)

    @runner.node("shout", input=Text, output=Text)
    async def shout(text: Text) -> dict[str, str]:
        return {"text": text.text.upper()}

    unblock = threading.Timer(5.0, store.release.set)  # bounds the test if the call is waited for
    unblock.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=r"step 'shout' in run 'stalled-run' within 0\.3 s") as info:
            runner.run_sync([shout], Text(text="hi"), run_id="stalled-run")
        elapsed = time.perf_counter() - started
    finally:
        store.release.set()
        unblock.cancel()
    assert (info.value.run_id, info.value.node_id) == ("stalled-run", "shout")
    assert elapsed < STORE_TIMEOUT + SLACK, f"run_sync took {elapsed:.2f} s"


def test_a_stalled_sync_call_is_abandoned_and_finishes_in_the_background() -> None:
    store = BlockingStore()
    manager = CheckpointManager(store, timeout_seconds=STORE_TIMEOUT)
    unblock = threading.Timer(5.0, store.release.set)  # bounds the test if the call is waited for
    unblock.start()
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="within"):
        asyncio.run(manager.checkpoint("r", "shout", Text(text="late")))
    elapsed = time.perf_counter() - started
    unblock.cancel()
    assert elapsed < STORE_TIMEOUT + SLACK, f"asyncio.run took {elapsed:.2f} s"
    abandoned = [t for t in threading.enumerate() if t.name == "stroma-checkpoint-call"]
    assert abandoned and all(t.daemon for t in abandoned)
    store.release.set()  # the store answers after its caller's loop has closed: nothing breaks
    for thread in abandoned:
        thread.join(5)
    assert store.saved == ["shout"]
    assert not [t for t in threading.enumerate() if t.name == "stroma-checkpoint-call"]


def test_a_script_exits_although_its_store_call_never_returns() -> None:
    completed = subprocess.run(
        [sys.executable, str(HERE / "stalled_store_script.py")],
        capture_output=True,
        text=True,
        timeout=30,  # unfixed, the script never exits
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "checkpoint" not in completed.stderr.lower()  # the abandoned call leaves no noise at exit
    line = json.loads(completed.stdout)
    assert line["outcome"].startswith("CheckpointError: ")
    assert "step 'shout' in run 'stalled-run'" in line["outcome"]
    assert line["seconds"] < STORE_TIMEOUT + SLACK
