"""Fixtures for the stack configuration tests: a real ``promtool`` and the repository layout."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tools_module() -> ModuleType:
    # Loaded by path: stroma/stack/_native.py is standard-library only, and these tests must not depend
    # on the whole library importing cleanly.
    spec = importlib.util.spec_from_file_location("_stroma_tools", REPO_ROOT / "stroma" / "stack" / "_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


class Promtool:
    """A real ``promtool`` (Prometheus 2.42 from Debian here; the same rule syntax as 3.x)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run promtool; fail the test with its full output when it exits non-zero."""
        result = subprocess.run(
            [str(self.path), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
        )
        output = result.stdout + result.stderr
        if result.returncode != 0:
            pytest.fail(f"promtool {' '.join(args)} exited {result.returncode}:\n{output}")
        return output


@pytest.fixture(scope="session")
def promtool() -> Promtool:
    """``promtool`` from ``$PROMTOOL``, ``PATH``, or unpacked from Debian's prometheus package."""
    configured = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if configured:
        return Promtool(Path(configured))
    try:
        # the same unpacked Debian programs the native stack (stroma/stack/) runs
        return Promtool(Path(_tools_module().prometheus_program("promtool")))
    except RuntimeError as exc:  # no Debian mirror reachable: say so, do not skip silently
        pytest.fail(f"promtool is needed for these tests and could not be unpacked: {exc}")
