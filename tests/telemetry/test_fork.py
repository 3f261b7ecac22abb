"""Reliability scenario 20: a forked process exports only its own spans and counts, no deadlock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_fork_exports_each_process_own_spans_and_counts(tmp_path: Path) -> None:
    spans_path = tmp_path / "spans.jsonl"
    result_path = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, str(HERE / "fork_child.py"), str(spans_path), str(result_path)],
        capture_output=True,
        text=True,
        timeout=60,  # a deadlock fails the test instead of hanging it
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    child = json.loads(result_path.read_text())
    parent = json.loads((tmp_path / "result.json.parent").read_text())
    assert parent["status"] == 0
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()]
    parent_pids = {s["pid"] for s in spans if s["run"] == "parent-run"}
    child_pids = {s["pid"] for s in spans if s["run"] == "child-run"}
    # 2 steps x (step + attempt) from the parent, exported once, by the parent only
    assert len([s for s in spans if s["run"] == "parent-run" and s["name"].startswith("step")]) == 2
    assert len(parent_pids) == 1 and len(child_pids) == 1 and parent_pids != child_pids
    # counters: the child counts its own step only; the parent its own two
    assert child["child_metric"] == pytest.approx(child["child_cost"])
    assert parent["parent_metric"] == pytest.approx(parent["parent_cost"])
