"""The README tells the truth: its example runs as written, its sample output is what the CLI
prints, and every environment variable the code reads is documented."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _block(name: str) -> str:
    """The fenced code block between ``<!-- readme-NAME:start -->`` and ``<!-- readme-NAME:end -->``."""
    match = re.search(rf"<!-- readme-{name}:start -->\n```[a-z]*\n(.*?)```\n<!-- readme-{name}:end -->", README, re.S)
    assert match, f"README has no readme-{name} block"
    return match.group(1)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "STROMA_"))}
    env.update(HOME=str(tmp_path), PYTHONIOENCODING="utf-8")
    env.pop("XDG_DATA_HOME", None)
    return env


def _run(args: list[str], tmp_path: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, encoding="utf-8", timeout=120, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stderr == "", done.stderr
    return done.stdout


def test_the_example_runs_as_written_and_prints_what_the_readme_says(tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_block("example"), encoding="utf-8")
    code_lines = [line for line in _block("example").splitlines() if line.strip()]
    assert len(code_lines) <= 22, "the README promises a short example"
    output = _run([sys.executable, str(script)], tmp_path, _env(tmp_path))
    assert output == _block("output")


def _normalised(text: str) -> list[str]:
    """Lines with what differs between runs (ids, times, durations, delays) replaced."""
    text = re.sub(r"tkt-\d+-[0-9a-f]{8}", "RUN", text)
    text = re.sub(r"\b[0-9a-f]{32}\b", "TRACE", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", "TIME", text)
    text = re.sub(r"\b\d+(\.\d+)? (ms|s)\b", "DUR", text)
    return [" ".join(line.split()) for line in text.splitlines()]


def test_the_show_sample_is_what_stroma_show_prints(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env["STROMA_RUN_STORE"] = str(tmp_path / "runs.sqlite3")
    demo = json.loads(_run([sys.executable, "-m", "stroma.cli", "demo", "--json"], tmp_path, env))
    run_id = demo["runs"][0]["run_id"]
    shown = _run([sys.executable, "-m", "stroma.cli", "show", run_id], tmp_path, env)
    assert _normalised(shown) == _normalised(_block("show"))
    # The sentence introducing the sample names the run it shows.
    sample_id = re.search(r"^run (tkt-\d+-[0-9a-f]{8})", _block("show"), re.M)
    assert sample_id and f"`stroma show {sample_id.group(1)}`" in README


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    names: set[str] = set()
    for path in (REPO / "stroma").rglob("*.py"):
        names.update(re.findall(r"\b(?:STROMA|OTEL)_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    assert "STROMA_RUN_STORE" in names
    missing = sorted(name for name in names if not re.search(rf"`{name}`", README))
    assert not missing, f"README does not document {missing}"
