"""On every supported Python, a script that simply returns has its run in Jaeger and Prometheus.

Issue 8 A1/A2: the exit path is where interpreters differ (3.12 forbids new threads at shutdown).
The user's script (``tests/reliability/exit_script.py``) runs once per interpreter that
``make test`` prepared, exporting over OTLP/HTTP to the real collector; the test then finds the
run's seven spans in Jaeger and its token counts in Prometheus.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import E2EStack, get_json, wait_until

RELIABILITY = Path(__file__).parents[1] / "reliability"
sys.path.insert(0, str(RELIABILITY))
from interpreters import interpreters  # noqa: E402

PYTHONS = interpreters()


@pytest.mark.parametrize("version", list(PYTHONS))
def test_script_exit_reaches_jaeger_and_prometheus(stack: E2EStack, version: str) -> None:
    service = f"exit-py{version}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STROMA_"))}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=stack.otlp_http_endpoint, OTEL_SERVICE_NAME=service)
    done = subprocess.run(
        [PYTHONS[version], str(RELIABILITY / "exit_script.py"), f"exit-{version}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    run_id = done.stdout.strip()

    def found() -> list[dict[str, object]] | None:
        params = {"service": service, "tags": json.dumps({"stroma.run.id": run_id})}
        traces = get_json(f"{stack.jaeger_url}/api/traces", params)["data"]
        return traces if traces and len(traces[0]["spans"]) == 7 else None

    [trace] = wait_until(found, 30, f"the run of {service} in Jaeger")
    names = {span["operationName"] for span in trace["spans"]}
    assert {f"run exit-{version}", "step fetch", "step summarize", "step publish", "attempt publish"} <= names

    series = stack.wait_for_series(f'stroma_usage_input_tokens_total{{job="{service}"}}')
    assert sum(float(s["value"][1]) for s in series) == 36  # 3 steps x 12 input tokens
