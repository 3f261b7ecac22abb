"""Fixtures for the CLI tests (the helpers are in ``cli_support``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import Cli, DemoSession


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI with an empty run store of its own."""
    return Cli(tmp_path)


@pytest.fixture(scope="session")
def demo_session(tmp_path_factory: pytest.TempPathFactory) -> DemoSession:
    """``stroma demo --runs 2`` run once; tests read what it stored (read-only)."""
    cli = Cli(tmp_path_factory.mktemp("demo-home"))
    result = cli("demo", "--runs", "2")
    assert result.returncode == 0, str(result)
    listed = cli("runs", "--json")
    assert listed.returncode == 0, str(listed)
    run_ids = [run["run_id"] for run in reversed(listed.json())]
    return DemoSession(cli, result, run_ids)
