"""examples/langgraph_agent.py runs offline and prints what the README shows for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from example_modules import example_module

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
    with example_module("langgraph_agent.py", "langgraph_agent_example") as module:
        result, shown = module.main()
    assert result.status is RunStatus.COMPLETED
    assert (result.input_tokens, result.output_tokens) == (1200, 139)  # every scripted reply, once
    assert [e.node_id for e in result.trace].count("policy") == 2
    assert "2 attempts" in shown
