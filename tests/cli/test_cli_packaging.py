"""Packaging of the ``stroma`` command: installing it prints no setuptools deprecation blocks (issue 8, G).

setuptools 77 and later warn at every build about a ``project.license`` TOML table; the SPDX string
form needs setuptools >= 77 to build, so the build requirement says so. Checked by hand too: a fresh
Python 3.10 venv outside the repository, ``pip install -v -e .``, no ``SetuptoolsDeprecationWarning``.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

import pytest

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # 3.11+; 3.10 runs the metadata check below
    data: dict[str, Any] = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return data


def test_the_license_is_an_spdx_string_and_the_build_needs_a_setuptools_that_reads_it(
    pyproject: dict[str, Any],
) -> None:
    assert pyproject["project"]["license"] == "MIT"
    requires = pyproject["build-system"]["requires"]
    setuptools = [spec for spec in requires if re.match(r"setuptools\b", spec)]
    assert len(setuptools) == 1
    floor = re.search(r">=\s*(\d+)", setuptools[0])
    assert floor is not None and int(floor.group(1)) >= 77, setuptools


def test_the_installed_metadata_carries_the_license_expression() -> None:
    metadata = importlib.metadata.metadata("stroma")
    assert metadata.get("License-Expression") == "MIT"
    assert metadata.get("License") is None  # the deprecated free-text field is gone
