"""examples/langgraph_agent.py runs offline and prints what the README shows for it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")

from stroma import RunStatus

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "langgraph_agent.py"


def _normalised(text: str) -> list[str]:
    text = re.sub(r"\b[0-9a-f]{32}\b", "ID", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "TIME", text)
    text = re.sub(r"\b\d+(\.\d+)? (ms|s)\b", "DUR", text)
    # parallel branches may start in either order: compare the lines, not their order
    return sorted(" ".join(line.split()) for line in text.splitlines() if line.strip())


def test_the_example_runs_and_the_readme_shows_its_tree() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "STROMA_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, _, shown = done.stdout.partition("\n")
    assert first == "COMPLETED | You were charged twice; a refund is on its way within 5 days."
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- readme-langgraph-show:start -->\n```\n(.*?)```\n", readme, re.S)
    assert block is not None
    assert _normalised(shown) == _normalised(block.group(1))


def test_the_example_in_process() -> None:
    spec = importlib.util.spec_from_file_location("langgraph_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # LangGraph resolves the state's annotations through it
    try:
        spec.loader.exec_module(module)
        result, shown = module.main()
    finally:
        sys.modules.pop(spec.name, None)
    assert result.status is RunStatus.COMPLETED
    assert (result.input_tokens, result.output_tokens) == (1200, 139)  # every scripted reply, once
    assert [e.node_id for e in result.trace].count("policy") == 2
    assert "2 attempts" in shown
