"""The PromQL behind the Grafana dashboards and the alert rules, ready to run against Prometheus.

Used by ``tests/stack`` (every expression parses, names are known, datasources are provisioned)
and meant for the end-to-end tests, which run each dashboard query against a live Prometheus and
assert that it returns data::

    for query in dashboard_queries():
        if query.needs_firing_alert:      # ALERTS{...} has series only while an alert fires
            ...
        result = prometheus_instant_query(query.expr)
        assert result, f"panel {query.title!r} returned no data: {query.expr}"

Grafana variables are substituted the way Grafana would expand them for a live query: dashboard
template variables (``$workflow``, ``${step}``, ``[[step]]``) by a regex-safe value (``.*``, which
is what "All" expands to, since every template variable is used only in ``=~`` matchers), and
Grafana's interval variables (``$__rate_interval``, ``$__range`` …) by durations given as
arguments. Only the standard library and PyYAML are used, so importing this never imports Stroma.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO_ROOT / "dashboards"
RULES_DIR = REPO_ROOT / "collector" / "rules"
NAMES_MODULE = REPO_ROOT / "stroma" / "telemetry" / "names.py"

# ${var}, ${var:format}, $var, [[var]], [[var:format]]  (Grafana's variable syntaxes)
VARIABLE_RE = re.compile(r"\$\{(?P<braced>[\w.]+)(?::[^}]*)?\}|\[\[(?P<bracketed>\w+)(?::[^\]]*)?\]\]|\$(?P<plain>\w+)")

# PromQL parts that hold label names, not metric names (removed before looking for metrics).
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS_RE = re.compile(r"\{[^{}]*\}")
_LABEL_LIST_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_METRIC_RE = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")
_PROMQL_WORDS = frozenset(
    {
        "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
        "count_values", "group", "by", "without", "on", "ignoring", "group_left", "group_right",
        "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
    }
)  # fmt: skip


class DashboardQuery(NamedTuple):
    """One panel target: the panel's title and its PromQL with every variable substituted."""

    title: str
    expr: str

    @property
    def needs_firing_alert(self) -> bool:
        """True for queries of the ``ALERTS`` series, which exist only while an alert fires."""
        return re.search(r"\bALERTS\b", self.expr) is not None


def dashboard_files() -> list[Path]:
    """Every dashboard JSON under ``dashboards/`` (what Grafana's file provider loads)."""
    return sorted(DASHBOARDS_DIR.rglob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        dashboard: dict[str, Any] = json.load(handle)
    return dashboard


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """All panels, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def raw_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of every panel, variables not substituted."""
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield panel, target


def variable_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(variable name, query) of every query-type template variable, e.g. ``label_values(...)``."""
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        found.append((variable["name"], str(query or variable.get("definition", ""))))
    return found


def _seconds(duration: str) -> int:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", duration):
        total += int(number) * units[unit]
    if total <= 0:
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    return int(total)


def substitute(
    expr: str,
    *,
    value: str = ".*",
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
) -> str:
    """*expr* with Grafana's variables replaced (see the module docstring).

    Raises ``ValueError`` for a Grafana built-in (``$__…``) that has no PromQL meaning here, so
    that a dashboard using a new one is noticed rather than sent to Prometheus half-expanded.
    """
    builtins = {
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": range_,
        "__range_s": str(_seconds(range_)),
        "__range_ms": str(_seconds(range_) * 1000),
        "__interval_ms": str(_seconds(interval) * 1000),
    }

    def replace(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bracketed") or match.group("plain")
        if name.startswith("__"):
            if name not in builtins:
                raise ValueError(f"no substitution for Grafana variable ${name} in {expr!r}")
            return builtins[name]
        return value

    return VARIABLE_RE.sub(replace, expr)


def dashboard_queries(
    path: Path | None = None,
    *,
    rate_interval: str = "1m",
    range_: str = "1h",
) -> list[DashboardQuery]:
    """Every (panel title, expr) of the dashboard at *path* (default: all of ``dashboards/``).

    Template variables become ``.*``; ``$__rate_interval`` becomes *rate_interval* and
    ``$__range`` *range_* (pick windows that cover the data the test produced: a rate needs two
    samples inside *rate_interval*).
    """
    paths = [path] if path is not None else dashboard_files()
    queries = []
    for dashboard_path in paths:
        for panel, target in raw_targets(load_dashboard(dashboard_path)):
            expr = target.get("expr", "")
            if expr:
                queries.append(
                    DashboardQuery(
                        panel.get("title", ""),
                        substitute(expr, rate_interval=rate_interval, range_=range_),
                    )
                )
    return queries


def rule_expressions(rules_dir: Path = RULES_DIR) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in ``collector/rules/*.rules.yml``."""
    found = []
    for path in sorted(rules_dir.glob("*.rules.yml")):
        with open(path, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                found.append((rule.get("alert") or rule.get("record"), str(rule["expr"])))
    return found


def prom_names() -> set[str]:
    """The ``PROM_*`` constants of ``stroma/telemetry/names.py``: metric names as Prometheus
    stores them (read from the source text, so Stroma is not imported)."""
    text = NAMES_MODULE.read_text(encoding="utf-8")
    return set(re.findall(r'^PROM_\w+\s*(?::\s*\w+)?\s*=\s*"([^"]+)"', text, re.MULTILINE))


def known_metric_names() -> set[str]:
    """:func:`prom_names` plus the ``_count`` and ``_sum`` series of every histogram."""
    names = prom_names()
    for name in list(names):
        if name.endswith("_bucket"):
            base = name.removesuffix("_bucket")
            names |= {base + "_count", base + "_sum"}
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (approximate, but exact for our style).

    Strings, ``{...}`` matchers and ``by (...)``-style label lists are removed first, so label
    names such as ``stroma_step_id`` are not mistaken for metrics; function names are recognised
    by the ``(`` that follows them, recording-rule names (``a:b:c``) are kept.
    """
    text = _STRING_RE.sub('""', expr)
    text = _LABEL_LIST_RE.sub(" ", text)
    while _MATCHERS_RE.search(text):
        text = _MATCHERS_RE.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations
    names = set()
    for match in _METRIC_RE.finditer(text):
        word = match.group(1)
        following = text[match.end() :].lstrip()
        if word.lower() in _PROMQL_WORDS or following.startswith("("):
            continue
        if re.fullmatch(r"\d+(ms|s|m|h|d|w|y)?", word):
            continue
        names.add(word)
    return names
