"""Loading a file of ``examples/`` as a module in a test (tests import this by its bare name)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextmanager
def example_module(file_name: str, module_name: str) -> Iterator[Any]:
    """``examples/<file_name>`` imported as *module_name*, registered in ``sys.modules`` while in
    use (LangGraph and pydantic resolve a state's annotations through the module)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / file_name)
    assert spec is not None and spec.loader is not None
    module: Any = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)
