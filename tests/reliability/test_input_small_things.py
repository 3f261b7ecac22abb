"""Issue 8 G (part): an unpriced fallback model warns at configuration, the price table is loaded
before the first step, and ``build_result`` refuses to nest an ``ExecutionResult``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stroma import ContractRegistry, FallbackPolicy, ReliabilityContext, RunConfig, RunStatus, StromaRunner

CHILD = Path(__file__).with_name("price_table_child.py")


def test_a_fallback_to_an_unpriced_model_warns_at_configuration() -> None:
    with pytest.warns(UserWarning, match=r"falls back to model 'acme-tiny-9', which has no known price"):
        RunConfig(model_fallbacks=[FallbackPolicy("gpt-4o", "acme-tiny-9", on_failure=["recoverable"])])


def test_the_runner_builder_warns_when_the_run_starts() -> None:
    runner = StromaRunner.quick().with_budget(cost_usd=1.0).with_model_fallback("gpt-4o", to="acme-tiny-9")
    with pytest.warns(UserWarning, match="acme-tiny-9"):
        runner.run_sync([], {})


def test_a_priced_fallback_does_not_warn() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RunConfig(model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", on_failure=["recoverable"])])


def test_build_result_refuses_an_execution_result() -> None:
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), None)
    inner = ctx.result(RunStatus.COMPLETED, {"a": 1})
    with pytest.raises(TypeError, match=r"final_state=result\.final_state"):
        ctx.build_result(RunStatus.COMPLETED, inner)
    assert ctx.build_result(RunStatus.COMPLETED, inner.final_state).final_state == {"a": 1}


@pytest.mark.parametrize("mode", ["budget", "none"])
def test_the_price_table_load_is_not_charged_to_the_first_attempt(mode: str) -> None:
    """Before: the first priced attempt took 61-89 ms here (the table load), now ~0 ms."""
    done = subprocess.run([sys.executable, str(CHILD), mode], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == "COMPLETED" and report["cost"] > 0
    assert report["attempt_ms"] < 20, report
    if mode == "budget":
        assert report["table_loaded_before_step"], report
