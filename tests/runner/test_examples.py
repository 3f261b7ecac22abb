"""The pipeline example in ``examples/`` runs, and does what its docstring says."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from stroma import RunStatus

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "support_pipeline.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("support_pipeline_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_support_pipeline_example(tmp_path: Path) -> None:
    example = load_example()
    first, resumed, again = await example.main(tmp_path)
    assert first.status is RunStatus.PARTIAL and first.failed_step == "draft_reply"
    assert resumed.status is RunStatus.COMPLETED
    assert resumed.final_state.approved is True
    assert again.final_state == resumed.final_state and len(again.trace) == 0
    assert len(example.LLM.calls) == 4  # every model call happened exactly once
    assert resumed.total_cost_usd > first.total_cost_usd
    assert list(again.cost_by_step) == list(resumed.cost_by_step)


def test_support_pipeline_example_as_a_script() -> None:
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE.parents[1])}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "first run, $0.003 budget: PARTIAL" in done.stdout
    assert "the stored result; nothing runs): COMPLETED" in done.stdout
