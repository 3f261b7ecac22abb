"""Scenario 14: ``kill -9`` at each point of a run, then resume with the same run id.

The pipeline (``crash_pipeline.py``: charge -> parallel(pack, invoice) -> ship) runs in a
subprocess against the durable SQLite store and kills itself with SIGKILL at a named point. A
ledger file (append + fsync) records every side effect. Resuming with the same run id must give
the uninterrupted result; every step that completed before the kill must have run exactly once;
the one step killed between its side effect and its checkpoint runs again (at-least-once, as
documented); and a finished run resumes to its stored result without running anything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("crash_pipeline.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = ("charge", "pack", "invoice", "ship")


def run_pipeline(db: Path, ledger: Path, run_id: str, kill_at: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(db), str(ledger), run_id, kill_at],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def ledger_counts(ledger: Path, run_id: str) -> Counter[str]:
    if not ledger.exists():
        return Counter()
    lines = [line.split() for line in ledger.read_text().splitlines()]
    return Counter(step for _, step, rid in lines if rid == run_id)


def result_of(process: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert process.returncode == 0, process.stderr[-3000:]
    parsed: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    return parsed


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("baseline")
    return result_of(run_pipeline(tmp / "db.sqlite3", tmp / "ledger.txt", "baseline"))


@pytest.mark.parametrize(
    ("kill_at", "ran_twice", "usage_lost"),
    [
        ("before:pack", None, None),
        ("effect:charge", "charge", None),
        ("effect:invoice", "invoice", None),
        ("checkpoint:charge", "charge", None),
        ("manifest:charge", None, "charge"),
        ("final", None, "ship"),
    ],
)
def test_kill_9_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, baseline: dict[str, Any], kill_at: str, ran_twice: str | None, usage_lost: str | None
) -> None:
    db, ledger, run_id = tmp_path / "db.sqlite3", tmp_path / "ledger.txt", "order:o-1/attempt"
    killed = run_pipeline(db, ledger, run_id, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed.stdout == ""
    before = ledger_counts(ledger, run_id)

    resumed = result_of(run_pipeline(db, ledger, run_id))
    assert resumed["status"] == "COMPLETED"
    assert resumed["final_state"] == baseline["final_state"] == {"tracking": "trk-box-ch-o-1-inv-o-1"}
    counts = ledger_counts(ledger, run_id)
    expected = Counter(dict.fromkeys(STEPS, 1))
    if ran_twice is not None:
        expected[ran_twice] = 2
        assert before[ran_twice] == 1
    assert counts == expected
    if usage_lost is None:
        assert resumed["total_cost_usd"] == pytest.approx(baseline["total_cost_usd"])
        assert resumed["total_tokens"] == baseline["total_tokens"]
        assert resumed["cost_by_step"] == pytest.approx(baseline["cost_by_step"])
    else:
        # the documented bound: a step whose checkpoint was written but not the manifest write that
        # follows it is restored (not re-run) without its usage
        lost = baseline["cost_by_step"][usage_lost]
        assert resumed["total_cost_usd"] == pytest.approx(baseline["total_cost_usd"] - lost)

    # a finished run resumes to its stored result without running anything
    again = result_of(run_pipeline(db, ledger, run_id))
    assert again == resumed
    assert ledger_counts(ledger, run_id) == counts
