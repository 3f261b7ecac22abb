"""stroma.errors: the exception hierarchy's one module, imported by everything and importing nothing of
Stroma's but :mod:`stroma.money` (so no module needs a deferred import to raise or classify an error)."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import stroma
from stroma import cost, errors, failures
from stroma.errors import BudgetExceeded, StromaError, exception_types
from stroma.failures import FailureClass, NodeContext, classify

ERRORS_PY = Path(errors.__file__)


def test_budget_exceeded_keeps_its_public_home_and_name() -> None:
    assert cost.BudgetExceeded is BudgetExceeded is stroma.BudgetExceeded
    assert BudgetExceeded.__module__ == "stroma.cost"
    exc = BudgetExceeded("cost", 0.5, 0.75, "summarize")
    assert isinstance(exc, StromaError)
    assert exception_types(exc) == "stroma.cost.BudgetExceeded"
    assert str(exc) == (
        "cost budget exhausted at step 'summarize': used $0.75 of a $0.50 limit. "
        "Raise ExecutionBudget.max_cost_usd (and resume the run) to continue."
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is BudgetExceeded and (copy.dimension, copy.limit, copy.actual, copy.node_id) == (
        "cost",
        0.5,
        0.75,
        "summarize",
    )
    assert classify(exc, NodeContext("summarize", 1, "r")) is FailureClass.TERMINAL


def test_errors_imports_no_stroma_module_but_money() -> None:
    tree = ast.parse(ERRORS_PY.read_text(encoding="utf-8"))
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stroma")
    }
    assert imported == {"stroma.money"}


def test_failures_no_longer_reaches_into_cost() -> None:
    source = Path(failures.__file__).read_text(encoding="utf-8")
    assert "stroma.cost" not in source.replace("~stroma.cost.BudgetExceeded", "")
