"""Helpers of the CLI tests: the ``stroma`` command run as a subprocess, in a sandbox.

Every call gets an environment of its own: ``STROMA_RUN_STORE`` and ``HOME`` point into a
temporary directory (nothing touches the real user data directory), the ``OTEL_*`` and
``STROMA_*`` variables of the outer environment are removed (nothing is exported unless a test
asks), and the stack state file is a path where no stack is recorded.

Kept out of ``conftest.py`` so test modules can import it by a name no other test directory uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"$ stroma {' '.join(self.argv)}\n[exit {self.returncode}]\n{self.stdout}\n[stderr]\n{self.stderr}"


class Cli:
    """Runs ``python -m stroma.cli`` with a sandboxed environment rooted at *home*."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.store = home / "data" / "runs.sqlite3"

    def env(self, **extra: str) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "STROMA_"))}
        env.pop("NO_COLOR", None)
        env.pop("XDG_DATA_HOME", None)
        env.update(
            HOME=str(self.home),
            STROMA_RUN_STORE=str(self.store),
            STROMA_STACK_STATE=str(self.home / "no-stack-state.json"),
            PYTHONIOENCODING="utf-8",
        )
        env.update(extra)
        return env

    def __call__(self, *argv: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> Result:
        return self.run_command([sys.executable, "-m", "stroma.cli", *argv], list(argv), timeout, env)

    def run_command(
        self, command: Sequence[str], argv: list[str], timeout: float, env: dict[str, str] | None = None
    ) -> Result:
        completed = subprocess.run(
            list(command),
            cwd=self.home,
            env=env if env is not None else self.env(),
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        return Result(argv, completed.returncode, completed.stdout, completed.stderr)


@dataclass
class DemoSession:
    cli: Cli
    result: Result
    run_ids: list[str]
