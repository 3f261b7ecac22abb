"""The application's own global SDK provider gets the processor added (never replaced); without
one, ``stroma.telemetry.install_global()`` is the one call that makes instrumentations record.
Each scenario runs in a child process: a global provider can be set once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("opentelemetry.instrumentation.genai.openai")

HERE = Path(__file__).parent


def child(mode: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STROMA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-W", "error", str(HERE / "genai_global_child.py"), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_application_global_provider_is_kept_and_its_spans_are_charged() -> None:
    out = child("app-provider")
    assert out["tokens"] == 68
    assert out["same_provider"] is True
    # the application's own exporter still receives every span, Stroma's and the client's
    assert {"attempt", "chat", "run", "step"} >= set(out["app_spans"]) >= {"attempt", "chat", "step"}


def test_without_a_global_provider_instrumentations_record_nothing() -> None:
    assert child("none")["tokens"] == 0


def test_install_global_makes_instrumentations_record() -> None:
    assert child("install-global")["tokens"] == 68


def test_a_global_provider_set_after_the_first_run_is_used() -> None:
    out = child("app-provider-later")
    assert out["before"] == 0
    assert out["tokens"] == 68
