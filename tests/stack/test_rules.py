"""The Prometheus alert and recording rules: valid, unit-tested, and on known metric names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from queries import known_metric_names, metric_names, prom_names, rule_expressions

RULES = Path(__file__).resolve().parents[2] / "collector" / "rules"
RULE_FILE = RULES / "stroma.rules.yml"
RULE_TESTS = RULES / "stroma.rules.test.yml"

EXPECTED_ALERTS = {
    "StromaBudgetBreached",
    "StromaBudgetWarning",
    "StromaBudgetUtilizationHigh",
    "StromaUnpricedUsage",
    "StromaCostBurnHigh",
    "StromaRetryStorm",
}


def _rules() -> list[dict]:
    document = yaml.safe_load(RULE_FILE.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_promtool_check_rules(promtool):
    output = promtool.run("check", "rules", str(RULE_FILE))
    assert "SUCCESS" in output


def test_promtool_unit_tests_pass(promtool):
    # rule_files in the test file are relative to the test file itself.
    output = promtool.run("test", "rules", RULE_TESTS.name, cwd=RULES)
    assert "SUCCESS" in output


def test_prom_names_are_read_from_the_telemetry_names_module():
    names = prom_names()
    # the counters and histograms the alert rules are built on
    assert {
        "stroma_cost_total",
        "stroma_budget_breaches_total",
        "stroma_budget_cost_utilization_bucket",
        "stroma_cost_unpriced_total",
        "stroma_step_retries_total",
        "stroma_step_duration_seconds_bucket",
    } <= names
    assert "stroma_step_duration_seconds_count" in known_metric_names()


def test_expected_alerts_exist_with_severity_and_annotations():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert set(alerts) == EXPECTED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize(
    ("alert", "counter"),
    [("StromaBudgetBreached", "stroma_budget_breaches_total"), ("StromaBudgetWarning", "stroma_budget_warnings_total")],
)
def test_budget_alerts_fire_without_delay_and_name_workflow_step_and_dimension(alert, counter):
    rule = next(r for r in _rules() if r.get("alert") == alert)
    assert rule.get("for", "0s") in {"0s", "0m", 0}
    by = " ".join(rule["expr"].split())
    assert "sum by (job, stroma_workflow_name, stroma_step_id, stroma_budget_dimension)" in by
    # the first-event clause (a counter series is born at its first increment)
    assert f"unless {counter}" in by


def test_cost_burn_threshold_is_a_recording_rule():
    records = {rule["record"]: rule for rule in _rules() if "record" in rule}
    assert records["stroma:cost_burn_threshold_usd_per_hour"]["expr"].startswith("vector(")
    burn = next(r for r in _rules() if r.get("alert") == "StromaCostBurnHigh")
    assert "stroma:cost_burn_threshold_usd_per_hour" in burn["expr"]


def test_every_alert_has_unit_tests():
    document = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    tested = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert tested == EXPECTED_ALERTS


@pytest.mark.parametrize(
    ("name", "expr"), [pytest.param(name, expr, id=name) for name, expr in rule_expressions(RULES)]
)
def test_rules_use_known_metric_names(name, expr):
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    unknown = metric_names(expr) - known_metric_names() - recorded
    assert not unknown, f"{name} uses metric names not in names.py PROM_*: {sorted(unknown)}"
