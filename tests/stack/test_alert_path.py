"""Issue 12: the shipped configuration keeps the budget alert path within seconds.

The path of a breach: Stroma's prompt export (stroma/telemetry/_prompt.py) -> collector ->
Prometheus scrape of the collector's exporter -> evaluation of the budget rule group ->
Alertmanager group_wait -> webhook. These tests read the intervals the repository ships
(collector/prometheus.yml, collector/rules/stroma.rules.yml, collector/alertmanager.yml) and check
that their worst case fits the 10 s target with room; tests/e2e/test_alert_latency.py measures it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COLLECTOR = REPO / "collector"
BUDGET_ALERTS = {"StromaBudgetBreached", "StromaBudgetWarning"}
TARGET_S = 10.0


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(duration))
    assert match, f"not a duration: {duration!r}"
    value, unit = float(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def _prompt_constant(name: str) -> float:
    # read from the source: these tests do not import the library (see conftest.py)
    text = (REPO / "stroma" / "telemetry" / "_prompt.py").read_text(encoding="utf-8")
    match = re.search(rf"^{name}: Final = ([0-9.]+)$", text, re.MULTILINE)
    assert match, f"{name} not found in stroma/telemetry/_prompt.py"
    return float(match.group(1))


def _prometheus() -> dict[str, Any]:
    return dict(_yaml(COLLECTOR / "prometheus.yml"))


def _stroma_scrape_s() -> float:
    config = _prometheus()
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "otel-collector"]
    return _seconds(job.get("scrape_interval", config["global"]["scrape_interval"]))


def _budget_group() -> dict[str, Any]:
    groups = _yaml(COLLECTOR / "rules" / "stroma.rules.yml")["groups"]
    [group] = [g for g in groups if BUDGET_ALERTS & {r.get("alert") for r in g["rules"]}]
    return dict(group)


def _budget_route() -> dict[str, Any]:
    config = _yaml(COLLECTOR / "alertmanager.yml")
    root = config["route"]
    for route in root.get("routes", []):
        matchers = " ".join(route.get("matchers", []))
        if all(name in matchers for name in BUDGET_ALERTS):
            return {**root, **route}
    pytest.fail("alertmanager.yml has no route for the budget alerts")


def test_both_budget_alerts_are_in_one_group_with_its_own_short_interval():
    group = _budget_group()
    assert {r.get("alert") for r in group["rules"]} == BUDGET_ALERTS
    assert "interval" in group, "the budget group needs its own interval (not the global one)"
    assert _seconds(group["interval"]) <= 2


def test_the_collector_exporter_is_scraped_every_two_seconds_and_the_rest_less_often():
    config = _prometheus()
    assert _stroma_scrape_s() <= 2
    # the slow alerts and the collector's own metrics do not pay for the budget path
    assert _seconds(config["global"]["scrape_interval"]) >= 10
    assert _seconds(config["global"]["evaluation_interval"]) >= 10


def test_the_budget_route_waits_one_second_and_groups_per_workflow_for_a_minute():
    route = _budget_route()
    assert _seconds(route["group_wait"]) <= 1
    assert _seconds(route["group_interval"]) >= 60
    assert {"job", "stroma_workflow_name"} <= set(route["group_by"])
    assert "stroma_step_id" not in route["group_by"]  # steps of one workflow share a notification


def test_worst_case_of_the_shipped_intervals_fits_the_target_with_room():
    collector_batch_s = _seconds(_yaml(COLLECTOR / "otelcol.yaml")["processors"]["batch"]["timeout"])
    worst = (
        max(
            _prompt_constant("DELAY_S"), _prompt_constant("MIN_SPACING_S")
        )  # prompt export: a request just after an early export waits the spacing
        + collector_batch_s
        + _stroma_scrape_s()
        + _seconds(_budget_group()["interval"])
        + _seconds(_budget_route()["group_wait"])
    )
    assert worst <= TARGET_S - 3, f"worst case {worst:.1f} s leaves too little room under {TARGET_S} s"


def test_breach_inhibits_the_warnings_of_its_workflow():
    rules = _yaml(COLLECTOR / "alertmanager.yml")["inhibit_rules"]
    breach = [r for r in rules if 'alertname="StromaBudgetBreached"' in r["source_matchers"]]
    assert breach and "StromaBudgetWarning" in " ".join(breach[0]["target_matchers"])
    assert set(breach[0]["equal"]) == {"job", "stroma_workflow_name"}


def test_alertmanager_config_is_valid(promtool):
    amtool = promtool.path.with_name("amtool")
    if not amtool.exists():
        pytest.skip("amtool is not next to promtool")
    done = subprocess.run(
        [str(amtool), "check-config", str(COLLECTOR / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 inhibit rules" in done.stdout
