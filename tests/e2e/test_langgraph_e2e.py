"""A LangGraph run's span tree in Jaeger (issue 10, part 2): the offline example, exported over
OTLP to the real collector, shows as one trace — ``run support-graph`` → one ``step`` per node
(the two parallel branches side by side) → their ``attempt`` spans, the retried node with two."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import E2EStack, get_json, wait_until

pytest.importorskip("langgraph")

EXAMPLE = Path(__file__).parents[2] / "examples" / "langgraph_agent.py"
SERVICE = "langgraph-e2e"


def test_langgraph_run_is_one_trace_of_steps_and_attempts(stack: E2EStack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STROMA_"))}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=stack.otlp_http_endpoint, OTEL_SERVICE_NAME=SERVICE)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("COMPLETED |")

    def found() -> list[dict[str, object]] | None:
        params = {"service": SERVICE, "tags": json.dumps({"gen_ai.workflow.name": "support-graph"})}
        traces = get_json(f"{stack.jaeger_url}/api/traces", params)["data"]
        return traces if traces and len(traces[0]["spans"]) >= 10 else None

    [trace] = wait_until(found, 30, "the LangGraph run in Jaeger")
    spans = {span["spanID"]: span for span in trace["spans"]}
    names = Counter(span["operationName"] for span in spans.values())
    assert names["run support-graph"] == 1
    for node in ("triage", "policy", "account", "write"):
        assert names[f"step {node}"] == 1, names
    assert sum(count for name, count in names.items() if name.startswith("attempt ")) == 5  # one node retried

    def parent(span: dict[str, object]) -> dict[str, object] | None:
        refs = [r for r in span["references"] if r["refType"] == "CHILD_OF"]  # type: ignore[index, union-attr]
        return spans.get(refs[0]["spanID"]) if refs else None

    for span in spans.values():
        name = str(span["operationName"])
        if name.startswith("step "):
            assert parent(span)["operationName"] == "run support-graph"  # type: ignore[index]
        if name.startswith("attempt "):
            assert parent(span)["operationName"] == "step " + name.removeprefix("attempt ")  # type: ignore[index]
