"""The Python interpreters the cross-version tests run a user's script with.

``make test`` builds a virtualenv per supported interpreter (``.venv-py3.X``) and names them in
``STROMA_TEST_PYTHONS`` (``3.10=/path/bin/python 3.12=...``); there, a missing or broken one is
a failure. Without the variable (a developer's ``pytest``) the current interpreter is used,
plus any ``.venv-py3.X`` found in the checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def interpreters() -> dict[str, str]:
    """``{"3.10": "/path/to/python", ...}``, sorted by version."""
    found: dict[str, str] = {}
    named = os.environ.get("STROMA_TEST_PYTHONS", "").split()
    if named:
        for item in named:
            version, _, path = item.partition("=")
            found[version] = path
    else:
        found[f"{sys.version_info.major}.{sys.version_info.minor}"] = sys.executable
        for venv in ROOT.glob(".venv-py3.*"):
            python = venv / "bin" / "python"
            if python.exists():
                found[venv.name.removeprefix(".venv-py")] = str(python)
    return dict(sorted(found.items(), key=lambda item: tuple(int(p) for p in item[0].split("."))))
