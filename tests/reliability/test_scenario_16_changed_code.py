"""Reliability scenario 16: code changed between a crash and the resume.

``tests/runner/test_resume.py::test_pipeline_changes_are_detected_before_any_step_runs`` covers
the detection after an in-process failure. Here the crash is real: the order pipeline of
``tests/runner/crash_pipeline.py`` is killed with SIGKILL inside its parallel stage (charge and
pack done, invoice's side effect made), then resumed with the same run id by changed code: a
renamed step, a changed output schema, a removed step. Each is refused with
``PipelineChangedError`` before any step runs (the side-effect ledger does not move, no step
function is called); the unchanged code then resumes to the uninterrupted result.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import PipelineChangedError, RunStatus, StromaRunner
from stroma.checkpoint import SQLiteStore
from stroma.runner import parallel

SCRIPT = Path(__file__).resolve().parents[1] / "runner" / "crash_pipeline.py"
ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "order:o-1/changed"


def load_pipeline() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_pipeline_for_scenario_16", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ledger_counts(ledger: Path) -> Counter[str]:
    if not ledger.exists():
        return Counter()
    return Counter(line.split()[1] for line in ledger.read_text().splitlines())


def crash(db: Path, ledger: Path, kill_at: str) -> None:
    process = subprocess.run(
        [sys.executable, str(SCRIPT), str(db), str(ledger), RUN_ID, kill_at],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"},
        check=False,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]


class PackedV2(BaseModel):
    parcel: str
    weight_kg: float


def changed_pipelines(pipeline: ModuleType, runner: StromaRunner, ledger: Path, called: list[str]) -> dict[str, Any]:
    charge, stage, ship = pipeline.build(runner, str(ledger), "")
    pack, invoice = stage.nodes

    @runner.node("deliver", input=ship._stroma_contract.input_schema, output=pipeline.Shipped)
    async def deliver(ready: Any) -> Any:
        called.append("deliver")
        return {"tracking": "t"}

    @runner.node("pack", input=pipeline.Charged, output=PackedV2)
    async def pack_v2(charged: Any) -> Any:
        called.append("pack_v2")
        return {"parcel": "p", "weight_kg": 1.0}

    return {
        "renamed step": [charge, parallel(pack, invoice), deliver],
        "changed output schema": [charge, parallel(pack_v2, invoice), ship],
        "removed step": [charge, parallel(pack, invoice)],
    }


@pytest.mark.parametrize("change", ["renamed step", "changed output schema", "removed step"])
def test_changed_code_is_refused_before_any_step_runs_after_a_kill_9(tmp_path: Path, change: str) -> None:
    db, ledger = tmp_path / "db.sqlite3", tmp_path / "ledger.txt"
    crash(db, ledger, "effect:invoice")
    before = ledger_counts(ledger)
    assert before == Counter({"charge": 1, "pack": 1, "invoice": 1})
    pipeline = load_pipeline()
    called: list[str] = []

    async def resume_changed() -> None:
        with SQLiteStore(db) as store:
            runner = StromaRunner.quick(store=store).with_context({"run_id": RUN_ID})
            nodes = changed_pipelines(pipeline, runner, ledger, called)[change]
            with pytest.raises(PipelineChangedError) as info:
                await runner.run(nodes, pipeline.Order(order_id="o-1", amount=42), run_id=RUN_ID)
            assert RUN_ID in str(info.value) and "Nothing was run" in str(info.value)

    asyncio.run(resume_changed())
    assert called == [] and ledger_counts(ledger) == before  # detected before any step ran

    async def resume_unchanged() -> Any:
        with SQLiteStore(db) as store:
            runner = StromaRunner.quick(store=store).with_context({"run_id": RUN_ID})
            nodes = pipeline.build(runner, str(ledger), "")
            return await runner.run(nodes, pipeline.Order(order_id="o-1", amount=42), run_id=RUN_ID)

    result = asyncio.run(resume_unchanged())
    assert result.status is RunStatus.COMPLETED
    assert result.final_state.tracking == "trk-box-ch-o-1-inv-o-1"
    # invoice was killed after its side effect, before its checkpoint: it runs again (at least once)
    assert ledger_counts(ledger) == Counter({"charge": 1, "pack": 1, "invoice": 2, "ship": 1})
