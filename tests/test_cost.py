"""Budgets, breaches, the cost tracker, model hints, fallback policies and resolve_model."""

from __future__ import annotations

import math
import pickle
import threading
from typing import Any

import pytest
from pydantic import ValidationError

from stroma.cost import (
    KNOWN_MODELS,
    BudgetExceeded,
    CostTracker,
    ExecutionBudget,
    FallbackPolicy,
    ModelHint,
    NodeUsage,
    StepUsage,
    estimate_cost_usd,
    resolve_model,
)
from stroma.errors import ConfigurationError, StromaError
from stroma.failures import FailureClass


def usage(node: str, tokens: int = 0, cost: float = 0.0, latency: int = 0, **extra: Any) -> NodeUsage:
    return NodeUsage(node_id=node, tokens_used=tokens, cost_usd=cost, latency_ms=latency, **extra)


# --- ExecutionBudget -----------------------------------------------------------------------------


def test_budget_defaults_and_unlimited() -> None:
    budget = ExecutionBudget.unlimited()
    assert budget == ExecutionBudget()
    assert budget.is_unlimited
    assert budget.unpriced == "warn"
    assert not ExecutionBudget(max_latency_ms=10).is_unlimited
    positional = ExecutionBudget(100, 0.5, 1_000)
    assert (positional.max_tokens_total, positional.max_cost_usd, positional.max_latency_ms) == (100, 0.5, 1_000)
    assert positional.limit("cost") == 0.5 and positional.limit("tokens") == 100.0
    assert ExecutionBudget().limit("latency") is None


def test_zero_limits_are_allowed() -> None:
    budget = ExecutionBudget(max_tokens_total=0, max_cost_usd=0.0, max_latency_ms=0, unpriced="fail")
    assert budget.max_cost_usd == 0.0 and not budget.is_unlimited


@pytest.mark.parametrize(
    ("kwargs", "setting", "value"),
    [
        ({"max_tokens_total": -1}, "max_tokens_total", "-1"),
        ({"max_tokens_total": 1.5}, "max_tokens_total", "1.5"),
        ({"max_tokens_total": True}, "max_tokens_total", "True"),
        ({"max_cost_usd": -0.01}, "max_cost_usd", "-0.01"),
        ({"max_cost_usd": math.nan}, "max_cost_usd", "nan"),
        ({"max_cost_usd": math.inf}, "max_cost_usd", "inf"),
        ({"max_cost_usd": "cheap"}, "max_cost_usd", None),
        ({"max_latency_ms": -5}, "max_latency_ms", "-5"),
        ({"max_latency_ms": math.inf}, "max_latency_ms", "inf"),
        ({"unpriced": "ignore"}, "unpriced", None),
    ],
)
def test_invalid_budget_names_the_setting_and_value(kwargs: dict[str, Any], setting: str, value: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        ExecutionBudget(**kwargs)
    assert isinstance(info.value, ValueError)
    if value is None:  # text is never repeated in a message: only numbers are
        assert f"ExecutionBudget.{setting}:" in str(info.value)
        assert str(kwargs[setting]) not in str(info.value)
    else:
        assert f"ExecutionBudget.{setting}={value}" in str(info.value)


def test_budget_pickles() -> None:
    budget = ExecutionBudget(max_tokens_total=10, max_cost_usd=0.5, unpriced="fail")
    assert pickle.loads(pickle.dumps(budget)) == budget


def test_budget_is_immutable() -> None:
    budget = ExecutionBudget(max_cost_usd=1.0)
    with pytest.raises(ValidationError):
        budget.max_cost_usd = 2.0


# --- BudgetExceeded --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dimension", "limit", "actual", "texts"),
    [
        ("cost", 0.5, 0.5123, ["cost budget", "$0.5123", "$0.50 limit", "max_cost_usd"]),
        ("tokens", 1000.0, 1200.0, ["tokens budget", "1,200 tokens", "1,000 tokens limit", "max_tokens_total"]),
        ("latency", 2000.0, 2500.0, ["latency budget", "2,500 ms", "2,000 ms limit", "max_latency_ms"]),
    ],
)
def test_budget_exceeded_message_has_units(dimension: Any, limit: float, actual: float, texts: list[str]) -> None:
    breach = BudgetExceeded(dimension, limit, actual, "summarize")
    message = str(breach)
    assert "'summarize'" in message
    for text in texts:
        assert text in message
    assert isinstance(breach, StromaError)
    assert (breach.dimension, breach.limit, breach.actual, breach.node_id) == (dimension, limit, actual, "summarize")


def test_budget_exceeded_pickles() -> None:
    breach = BudgetExceeded("cost", 1.0, 1.25, "s")
    clone = pickle.loads(pickle.dumps(breach))
    assert type(clone) is BudgetExceeded
    assert (clone.dimension, clone.limit, clone.actual, clone.node_id) == ("cost", 1.0, 1.25, "s")
    assert str(clone) == str(breach)


# --- NodeUsage ---------------------------------------------------------------------------------


def test_node_usage_input_tokens_and_alias() -> None:
    item = NodeUsage("s", 150, 0.01, 20, model="gpt-4o", output_tokens=50)
    assert item.input_tokens == 100
    assert not item.unpriced
    assert StepUsage is NodeUsage


# --- CostTracker -------------------------------------------------------------------------------


def test_tracker_accumulates_per_step_and_in_total() -> None:
    tracker = CostTracker()
    tracker.record(usage("a", 100, 0.01, 10, model="m1", output_tokens=40))
    tracker.record(usage("a", 50, 0.02, 5, model="m2", output_tokens=10))
    tracker.record(usage("b", 10, 0.0, 1, model="local", unpriced=True))
    tracker.record(usage("c", 5, 0.0, 1, unpriced=True))
    assert tracker.total_tokens == 165
    assert tracker.total_output_tokens == 50
    assert tracker.total_input_tokens == 115
    assert tracker.total_cost_usd == pytest.approx(0.03)
    assert tracker.total_latency_ms == 17
    assert tracker.unpriced_models == {"local"}
    assert tracker.unpriced_count == 2
    summary = tracker.summary()
    assert summary["a"] == NodeUsage("a", 150, pytest.approx(0.03), 15, model="m2", output_tokens=50)
    assert summary["b"].unpriced
    assert tracker.cost_by_node() == {"a": pytest.approx(0.03), "b": 0.0, "c": 0.0}


def test_tracker_hands_out_copies() -> None:
    tracker = CostTracker()
    recorded = usage("a", 10, 0.5)
    tracker.record(recorded)
    recorded.tokens_used = 999
    tracker.summary()["a"].tokens_used = 999
    tracker.unpriced_models.add("x")
    assert tracker.summary()["a"].tokens_used == 10
    assert tracker.unpriced_models == set()


def test_totals_do_not_walk_the_steps() -> None:
    class NoWalking(dict[str, NodeUsage]):
        def values(self) -> Any:
            raise AssertionError("totals must be running sums")

        def __iter__(self) -> Any:
            raise AssertionError("totals must be running sums")

    tracker = CostTracker()
    tracker._usage = NoWalking()
    for i in range(1_000):
        tracker.record(usage(f"s{i}", 2, 0.001, 1, output_tokens=1))
    assert tracker.total_tokens == 2_000
    assert tracker.total_input_tokens == 1_000
    assert tracker.total_cost_usd == pytest.approx(1.0)
    assert tracker.total_latency_ms == 1_000
    tracker.check_budget(ExecutionBudget(max_tokens_total=2_000), "s")


def test_tracker_is_thread_safe() -> None:
    tracker = CostTracker()

    def work() -> None:
        for _ in range(2_000):
            tracker.record(usage("shared", 1, 0.5, 1))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.total_tokens == 16_000
    assert tracker.total_cost_usd == 8_000.0
    assert tracker.summary()["shared"].tokens_used == 16_000


@pytest.mark.parametrize(
    ("budget", "spend", "dimension"),
    [
        (ExecutionBudget(max_tokens_total=100), usage("a", 100), None),
        (ExecutionBudget(max_tokens_total=100), usage("a", 101), "tokens"),
        (ExecutionBudget(max_cost_usd=1.0), usage("a", cost=1.0), None),
        (ExecutionBudget(max_cost_usd=1.0), usage("a", cost=1.01), "cost"),
        (ExecutionBudget(max_latency_ms=50), usage("a", latency=50), None),
        (ExecutionBudget(max_latency_ms=50), usage("a", latency=51), "latency"),
    ],
)
def test_check_budget_raises_only_when_exceeded(
    budget: ExecutionBudget, spend: NodeUsage, dimension: str | None
) -> None:
    tracker = CostTracker()
    tracker.record(spend)
    if dimension is None:
        tracker.check_budget(budget, "a")
        return
    with pytest.raises(BudgetExceeded) as info:
        tracker.check_budget(budget, "a")
    assert info.value.dimension == dimension
    assert info.value.node_id == "a"


def test_latency_uses_the_run_clock_when_given() -> None:
    tracker = CostTracker()
    tracker.record(usage("a", latency=10))
    budget = ExecutionBudget(max_latency_ms=100)
    tracker.check_budget(budget, "a", elapsed_ms=100)
    with pytest.raises(BudgetExceeded) as info:
        tracker.check_budget(budget, "a", elapsed_ms=150)
    assert (info.value.limit, info.value.actual) == (100.0, 150.0)


def test_check_can_start_blocks_once_a_limit_is_reached() -> None:
    tracker = CostTracker()
    budget = ExecutionBudget(max_tokens_total=100, max_cost_usd=1.0, max_latency_ms=1_000)
    tracker.check_can_start(budget, "a", elapsed_ms=0)
    tracker.record(usage("a", 100, 0.5))
    with pytest.raises(BudgetExceeded) as info:
        tracker.check_can_start(budget, "b", elapsed_ms=0)
    assert (info.value.dimension, info.value.node_id) == ("tokens", "b")
    tracker.check_budget(budget, "a", elapsed_ms=0)  # reached, not exceeded
    with pytest.raises(BudgetExceeded, match="latency"):
        CostTracker().check_can_start(budget, "a", elapsed_ms=1_000)


@pytest.mark.parametrize(
    "budget",
    [ExecutionBudget(max_tokens_total=0), ExecutionBudget(max_cost_usd=0.0), ExecutionBudget(max_latency_ms=0)],
)
def test_zero_budget_blocks_any_call(budget: ExecutionBudget) -> None:
    with pytest.raises(BudgetExceeded):
        CostTracker().check_can_start(budget, "first", elapsed_ms=0)


def test_unlimited_budget_never_raises() -> None:
    tracker = CostTracker()
    tracker.record(usage("a", 10**9, 10**6, 10**9))
    tracker.check_budget(ExecutionBudget(), "a")
    tracker.check_can_start(ExecutionBudget(), "a")


def test_utilization() -> None:
    tracker = CostTracker()
    assert tracker.utilization(ExecutionBudget()) is None
    assert tracker.utilization(ExecutionBudget(max_cost_usd=0.0)) == 0.0
    tracker.record(usage("a", cost=0.25))
    assert tracker.utilization(ExecutionBudget(max_cost_usd=1.0)) == 0.25
    assert tracker.utilization(ExecutionBudget(max_cost_usd=0.0)) == math.inf


# --- ModelHint and FallbackPolicy -------------------------------------------------------------


def test_model_hint() -> None:
    hint = ModelHint("s", "gpt-4o", "gpt-4o-mini", 512)
    assert (hint.node_id, hint.preferred_model, hint.fallback_model, hint.max_tokens) == (
        "s",
        "gpt-4o",
        "gpt-4o-mini",
        512,
    )
    assert ModelHint("s", "gpt-4o").fallback_model is None
    with pytest.raises(ConfigurationError, match="max_tokens"):
        ModelHint("s", "gpt-4o", max_tokens=0)


def test_fallback_policy_construction() -> None:
    policy = FallbackPolicy("gpt-4o", "gpt-4o-mini")
    assert policy.at_budget_pct == 0.8 and policy.on_failure is None
    assert FallbackPolicy("a", "b", 1).at_budget_pct == 1.0
    with pytest.raises(AttributeError):
        policy.at_budget_pct = 0.5  # type: ignore[misc]
    on_failure = FallbackPolicy("a", "b", on_failure={"recoverable", FailureClass.AMBIGUOUS})
    assert on_failure.on_failure == frozenset({FailureClass.RECOVERABLE, FailureClass.AMBIGUOUS})
    assert on_failure.switches_on(FailureClass.RECOVERABLE)
    assert not on_failure.switches_on(FailureClass.TERMINAL)
    assert not policy.switches_on(FailureClass.RECOVERABLE)
    assert FallbackPolicy("a", "b", on_failure=FailureClass.TERMINAL).on_failure == frozenset({FailureClass.TERMINAL})


@pytest.mark.parametrize(
    ("args", "kwargs", "setting"),
    [
        (("", "b"), {}, "preferred_model"),
        (("a", "  "), {}, "fallback_model"),
        (("a", "a"), {}, "fallback_model"),
        (("a", "b", 0.0), {}, "at_budget_pct"),
        (("a", "b", 1.5), {}, "at_budget_pct"),
        (("a", "b", math.nan), {}, "at_budget_pct"),
        (("a", "b", True), {}, "at_budget_pct"),
        (("a", "b"), {"on_failure": {"FATAL"}}, "on_failure"),
        (("a", "b"), {"on_failure": 3}, "on_failure"),
    ],
)
def test_invalid_fallback_policy_names_the_setting(args: tuple[Any, ...], kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigurationError, match=f"FallbackPolicy.{setting}"):
        FallbackPolicy(*args, **kwargs)


# --- resolve_model -----------------------------------------------------------------------------


def test_resolve_model_budget_threshold() -> None:
    tracker = CostTracker()
    budget = ExecutionBudget(max_cost_usd=1.0)
    fallbacks = [FallbackPolicy("gpt-4o", "gpt-4o-mini", 0.8), FallbackPolicy("gpt-4o", "other", 0.5)]
    assert resolve_model(None, tracker, budget, fallbacks) is None
    assert resolve_model("gpt-4o", tracker, budget, fallbacks) == "gpt-4o"
    tracker.record(usage("a", cost=0.6))
    assert resolve_model("gpt-4o", tracker, budget, fallbacks) == "other"
    tracker.record(usage("a", cost=0.2))
    assert resolve_model("gpt-4o", tracker, budget, fallbacks) == "gpt-4o-mini"
    assert resolve_model("claude", tracker, budget, fallbacks) == "claude"
    assert resolve_model("gpt-4o", tracker, ExecutionBudget(), fallbacks) == "gpt-4o"
    assert resolve_model("gpt-4o", CostTracker(), ExecutionBudget(max_cost_usd=0.0), fallbacks) == "gpt-4o"
    assert resolve_model("gpt-4o", tracker, budget, {"gpt-4o": fallbacks[0]}) == "gpt-4o-mini"


# --- compatibility entry points ----------------------------------------------------------------


def test_cost_module_keeps_the_established_entry_points() -> None:
    assert KNOWN_MODELS["gpt-4o"] == (2.5, 10.0)
    assert estimate_cost_usd("gpt-4o", 1_000, 1_000) == pytest.approx(0.0125)
    assert estimate_cost_usd("unknown-model-qq", 1_000) == 0.0
