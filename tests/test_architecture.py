"""The package's shape, checked from the source (AST only, nothing is imported).

Two rules keep the module graph honest (issue 9, item 2):

1. **No private names across modules.** A module in ``stroma/`` never imports an underscore name
   from another stroma module (``from stroma.x import _y``) nor reads ``x._y`` off another
   stroma module it imported. Something shared is given a public name (in a private module
   when it is not part of the API: ``stroma/_pipeline/plan.py`` may export ``Plan``).
   Re-exports inside a package (``from stroma.stack._stack import Stack`` in
   ``stroma/stack/__init__.py``) import public names of private modules and are fine.
2. **No hidden cycles.** An import of ``stroma`` inside a function (or a class body, or any
   block that is not the module's top level) is how an import cycle is held apart, so each one
   must be listed in :data:`ALLOWED_LOCAL_IMPORTS` with its reason. Imports under
   ``if TYPE_CHECKING:`` are fine (they never run).

Every violation is reported as ``file:line: rule: detail``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stroma"

# (importing file, imported module) -> why the import is deferred to call time.
ALLOWED_LOCAL_IMPORTS: dict[tuple[str, str], str] = {
    # CLI start-up time: the demo module configures OpenTelemetry's SDK (imports it, with its
    # exporters); `stroma runs`, `show`, `prices` and `stack` never need it.
    ("stroma/cli/commands.py", "stroma.demo"): "CLI start-up time: stroma.demo loads OpenTelemetry's SDK",
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.detail}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by an ``ImportFrom`` in *module* (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    # a package's __init__ is named after the package itself; for a plain module drop its name
    is_package = (PACKAGE.parent / Path(*package) / "__init__.py").exists()
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, top_level: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under *node* with whether it runs at import time of the module."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            continue  # never runs
        yield child, top_level
        nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        yield from _walk(child, nested)


def _stroma_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _is_module(dotted: str) -> bool:
    """Whether *dotted* names a stroma module or package (importing a private module is fine)."""
    path = PACKAGE.parent / Path(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _violations(path: Path) -> list[Violation]:
    rel = path.relative_to(ROOT).as_posix()
    return _check_source(rel, _module_name(path), path.read_text(encoding="utf-8"))


def _check_source(rel: str, module: str, text: str) -> list[Violation]:
    tree = ast.parse(text, filename=rel)
    found: list[Violation] = []
    aliases: dict[str, str] = {}  # local name -> stroma module it is bound to
    for node, top_level in _walk(tree, True):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "stroma" or alias.name.startswith("stroma."):
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else "stroma"
                    if not top_level:
                        found.append(_local_import(rel, node, alias.name))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not (source == "stroma" or source.startswith("stroma.")):
                continue
            if not top_level:
                # `from stroma import demo` imports the module stroma.demo: name that one
                modules = sorted({f"{source}.{a.name}" for a in node.names if _is_module(f"{source}.{a.name}")})
                for imported in modules or [source]:
                    found.append(_local_import(rel, node, imported))
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__") and not _is_module(f"{source}.{name}"):
                    found.append(Violation(rel, node.lineno, "private-import", f"imports {name} from {source}"))
                aliases[alias.asname or name] = f"{source}.{name}"
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            target = aliases[node.value.id]
            if target != module:
                found.append(
                    Violation(rel, node.lineno, "private-access", f"reads {node.value.id}.{node.attr} ({target})")
                )
    return found


def _local_import(rel: str, node: ast.stmt, source: str) -> Violation:
    return Violation(rel, node.lineno, "local-import", f"imports {source} inside a function")


def _all_violations() -> list[Violation]:
    found: list[Violation] = []
    for path in _stroma_files():
        for violation in _violations(path):
            if violation.rule == "local-import":
                source = violation.detail.removeprefix("imports ").removesuffix(" inside a function")
                if (violation.path, source) in ALLOWED_LOCAL_IMPORTS:
                    continue
            found.append(violation)
    return found


def test_no_private_names_across_modules_and_no_unlisted_local_imports() -> None:
    found = _all_violations()
    assert not found, "architecture rules broken:\n" + "\n".join(str(v) for v in found)


def test_the_allowlist_only_names_local_imports_that_exist() -> None:
    present: set[tuple[str, str]] = set()
    for path in _stroma_files():
        for violation in _violations(path):
            if violation.rule == "local-import":
                source = violation.detail.removeprefix("imports ").removesuffix(" inside a function")
                present.add((violation.path, source))
    stale = sorted(set(ALLOWED_LOCAL_IMPORTS) - present)
    assert not stale, f"allowlisted local imports that no longer exist: {stale}"


# --- the checker itself must catch what it claims to ------------------------------------------


@pytest.mark.parametrize(
    ("source", "rule"),
    [
        ("from stroma.failures import _configuration_error\n", "private-import"),
        ("from .failures import _as_failure_class\n", "private-import"),
        ("import stroma.stack as stack\nstack._procs.clear()\n", "private-access"),
        ("from stroma import failures\nfailures._as_failure_class('x')\n", "private-access"),
        ("def f():\n    from stroma.cost import BudgetExceeded\n", "local-import"),
        ("class A:\n    import stroma.runner\n", "local-import"),
        ("try:\n    pass\nfinally:\n    def g():\n        import stroma\n", "local-import"),
    ],
)
def test_the_checker_reports_each_rule(source: str, rule: str) -> None:
    rules = [v.rule for v in _check_source("stroma/probe.py", "stroma.probe", source)]
    assert rule in rules, (source, rules)


def test_the_checker_leaves_legitimate_imports_alone() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from stroma.errors import ConfigurationError\n"
        "from stroma.checkpoint import _codec\n"
        "import stroma.errors as errors\n"
        "if TYPE_CHECKING:\n"
        "    from stroma.runner import StromaRunner\n"
        "def f():\n"
        "    import json\n"
        "    return errors.__name__, errors.ConfigurationError, ConfigurationError, _codec.record\n"
        "_local = 1\n"
        "print(_local)\n"
    )
    assert _check_source("stroma/probe.py", "stroma.probe", source) == []
