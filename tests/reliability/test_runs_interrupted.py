"""Issue 8 B9: a run interrupted by Ctrl-C is recorded as ``interrupted``, with its finished steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stroma.runstore import LocalRunStore

SCRIPT = Path(__file__).with_name("runs_interrupt_script.py")


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_a_run_interrupted_by_sigint_is_listed_as_interrupted(tmp_path: Path, kind: str) -> None:
    store_path = tmp_path / "runs.sqlite3"
    env = {**os.environ, "STROMA_RUN_STORE": str(store_path)}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    child = subprocess.Popen(
        [sys.executable, str(SCRIPT), kind],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # blocks until the second step runs (or the child dies)
        assert line.strip() == "second started", child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGINT)
        # A step blocking the loop thread (time.sleep): on 3.11+ asyncio.run's first Ctrl-C only
        # requests cancellation, the second raises KeyboardInterrupt, as a user would press it.
        # Otherwise one Ctrl-C ends the run; the wait is generous because a loaded machine can
        # take seconds to tear the loop down, and a second signal then would interrupt that.
        needs_second = kind == "sync" and sys.version_info >= (3, 11)
        try:
            _, stderr = child.communicate(timeout=3 if needs_second else 30)
        except subprocess.TimeoutExpired:
            if not needs_second:
                raise
            child.send_signal(signal.SIGINT)
            _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode != 0 and "KeyboardInterrupt" in stderr

    runs = LocalRunStore(store_path).list_runs()
    assert [(r.run_id, r.status) for r in runs] == [("ctrl-c-run", "interrupted")]
    run = runs[0]
    assert run.details["finished_steps"] == ["first"]
    assert run.error in ("interrupted (KeyboardInterrupt)", "interrupted (CancelledError)")
    assert run.input_tokens == 100 and run.output_tokens == 10 and run.cost_usd > 0
    run_record = next(r for r in LocalRunStore(store_path).get_run("ctrl-c-run").records if r["kind"] == "run")
    assert run_record["end_ns"] is not None and run_record["attributes"]["stroma.run.status"] == "interrupted"

    listed = subprocess.run(
        [sys.executable, "-m", "stroma.cli", "runs", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    shown = json.loads(listed.stdout)
    listed_runs = [(r["run_id"], r["status"], r["finished_steps"]) for r in shown]
    assert listed_runs == [("ctrl-c-run", "interrupted", ["first"])]
