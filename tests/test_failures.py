"""Failure classes, policies, policy resolution, the classification table and RetryBudget."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import pickle
from typing import Any

import pytest
from pydantic import ValidationError

from stroma.config import RunConfig
from stroma.contracts import ContractViolation
from stroma.cost import BudgetExceeded, FallbackPolicy
from stroma.errors import ConfigurationError
from stroma.failures import (
    FailureClass,
    FailurePolicy,
    NodeContext,
    RetryBudget,
    StepContext,
    check_policy_map,
    classify,
    default_policy_map,
    parse_failure_class,
    resolve_policy,
)

CTX = NodeContext(node_id="step", attempt=1, run_id="run-1")
R, T, A = FailureClass.RECOVERABLE, FailureClass.TERMINAL, FailureClass.AMBIGUOUS


# --- FailureClass --------------------------------------------------------------------------------


def test_failure_class_values_and_otel_value() -> None:
    assert [m.value for m in FailureClass] == ["RECOVERABLE", "TERMINAL", "AMBIGUOUS"]
    assert [m.otel_value for m in FailureClass] == ["recoverable", "terminal", "ambiguous"]
    assert FailureClass.RECOVERABLE == "RECOVERABLE"
    assert isinstance(FailureClass.TERMINAL, str)
    assert FailureClass("AMBIGUOUS") is FailureClass.AMBIGUOUS


# --- FailurePolicy -------------------------------------------------------------------------------


def test_policy_defaults_and_immutability() -> None:
    policy = FailurePolicy()
    assert (policy.max_retries, policy.backoff_seconds, policy.max_backoff_seconds) == (3, 1.0, 30.0)
    with pytest.raises(ValidationError):
        policy.max_retries = 5
    assert FailurePolicy(max_retries=0, backoff_seconds=0.0).max_retries == 0
    assert FailurePolicy(max_retries=100).max_retries == 100
    assert pickle.loads(pickle.dumps(policy)) == policy


def test_large_base_delay_raises_the_default_cap() -> None:
    # The established API had no cap: FailurePolicy(backoff_seconds=60) must stay valid.
    assert FailurePolicy(backoff_seconds=60).max_backoff_seconds == 60
    assert FailurePolicy(backoff_seconds=5).max_backoff_seconds == 30


@pytest.mark.parametrize(
    ("kwargs", "setting", "value"),
    [
        ({"max_retries": -1}, "max_retries", "-1"),
        ({"max_retries": 101}, "max_retries", "101"),
        ({"max_retries": 1.5}, "max_retries", "1.5"),
        ({"max_retries": True}, "max_retries", "True"),
        ({"max_retries": "many"}, "max_retries", None),
        ({"backoff_seconds": -0.5}, "backoff_seconds", "-0.5"),
        ({"backoff_seconds": math.nan}, "backoff_seconds", "nan"),
        ({"backoff_seconds": math.inf}, "backoff_seconds", "inf"),
        ({"max_backoff_seconds": math.inf}, "max_backoff_seconds", "inf"),
        ({"backoff_seconds": 10.0, "max_backoff_seconds": 5.0}, "max_backoff_seconds", "5.0"),
    ],
)
def test_invalid_policy_names_the_setting_and_value(kwargs: dict[str, Any], setting: str, value: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        FailurePolicy(**kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"FailurePolicy.{setting}" in message
    if value is None:  # a text value is never repeated (settings can be read from secrets' neighbours)
        assert "many" not in message
    else:
        assert value in message


def test_policy_rejects_unknown_settings() -> None:
    with pytest.raises(TypeError):
        FailurePolicy(retries=3)  # type: ignore[call-arg]


# --- default_policy_map and resolve_policy -----------------------------------------------------


def test_default_policy_map_values_and_freshness() -> None:
    defaults = default_policy_map()
    assert defaults[R] == FailurePolicy(max_retries=3, backoff_seconds=1.0)
    assert defaults[T].max_retries == 0 and defaults[T].backoff_seconds == 0.0
    assert defaults[A] == FailurePolicy(max_retries=1, backoff_seconds=0.5)
    defaults.pop(R)
    defaults[T] = FailurePolicy(max_retries=9)
    again = default_policy_map()
    assert again is not defaults
    assert again[R].max_retries == 3 and again[T].max_retries == 0


def test_resolve_policy_precedence() -> None:
    step_policy = FailurePolicy(max_retries=7)
    run_policy = FailurePolicy(max_retries=5)
    node_policies = {"special": {R: step_policy}}
    policy_map = {R: run_policy}
    assert resolve_policy(R, "special", policy_map, node_policies) is step_policy
    assert resolve_policy(R, "ordinary", policy_map, node_policies) is run_policy
    assert resolve_policy(A, "special", policy_map, node_policies) == default_policy_map()[A]
    assert resolve_policy(T, "x", None, None).max_retries == 0
    assert resolve_policy(R, "x", {}, {"x": {}}) == default_policy_map()[R]


def test_check_policy_map() -> None:
    policy = FailurePolicy(max_retries=2)
    assert check_policy_map({"recoverable": policy, T: policy}) == {R: policy, T: policy}
    with pytest.raises(ConfigurationError, match=r"policy_map has an unknown failure class 'FATAL'"):
        check_policy_map({"FATAL": policy})
    with pytest.raises(ConfigurationError, match=r"node_policies\[TERMINAL\] must be a FailurePolicy, got int"):
        check_policy_map({T: 3}, setting="node_policies")
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        check_policy_map([R])  # type: ignore[arg-type]


def test_run_config_validates_policy_maps_with_the_one_rule() -> None:
    # RunConfig used to refuse what check_policy_map accepted ("recoverable"); one rule now
    policy = FailurePolicy(max_retries=2)
    config = RunConfig(policy_map={"recoverable": policy}, node_policies={"a": {" Terminal ": policy}})
    assert config.policy_map == {R: policy}
    assert config.node_policies == {"a": {T: policy}}
    for bad in ({"FATAL": policy}, {R: 3}, [R]):
        with pytest.raises(ConfigurationError) as config_error:
            RunConfig(policy_map=bad)
        with pytest.raises(ConfigurationError) as map_error:
            check_policy_map(bad, setting="RunConfig.policy_map")  # type: ignore[arg-type]
        assert str(map_error.value) in str(config_error.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (R, R),
        ("terminal", T),
        ("AMBIGUOUS", A),
        (" Recoverable ", R),
        ("fatal", None),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_parse_failure_class_is_the_one_reading(value: Any, expected: FailureClass | None) -> None:
    assert parse_failure_class(value) is expected
    # every place that reads a failure class from the user agrees with it
    policy = FailurePolicy()
    if expected is None:
        with pytest.raises(ConfigurationError):
            check_policy_map({value: policy})
        with pytest.raises(ConfigurationError):
            FallbackPolicy("a", "b", on_failure=[value])
        assert classify(ValueError("x"), NodeContext("s", 1, "r"), [lambda exc, ctx: value]) is A
    else:
        assert check_policy_map({value: policy}) == {expected: policy}
        assert FallbackPolicy("a", "b", on_failure=[value]).on_failure == frozenset({expected})
        assert classify(ValueError("x"), NodeContext("s", 1, "r"), [lambda exc, ctx: value]) is expected


# --- NodeContext -------------------------------------------------------------------------------


def test_node_context_is_frozen_and_positional() -> None:
    ctx = NodeContext("a", 2, "run")
    assert (ctx.node_id, ctx.attempt, ctx.run_id, ctx.step_id) == ("a", 2, "run", "a")
    assert StepContext is NodeContext
    with pytest.raises(AttributeError):
        ctx.attempt = 3  # type: ignore[misc]


# --- classify: the built-in table ------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


class StatusError(Exception):
    def __init__(self, status: Any) -> None:
        super().__init__("status")
        self.status = status


class Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


class ResponseError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__("response")
        self.response = Response(status_code)


class HTTPValueError(ValueError):
    status_code = 503


VIOLATION = ContractViolation("s", "output", {}, [])
BREACH = BudgetExceeded("cost", 1.0, 1.5, "s")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (VIOLATION, T),
        (BREACH, T),
        (TimeoutError(), R),
        (asyncio.TimeoutError(), R),
        (ConnectionError(), R),
        (ConnectionRefusedError(), R),
        (ConnectionResetError(), R),
        (HTTPError(408), R),
        (HTTPError(409), R),
        (HTTPError(425), R),
        (HTTPError(429), R),
        (HTTPError(500), R),
        (HTTPError(503), R),
        (HTTPError(599), R),
        (HTTPError(401), T),
        (HTTPError(403), T),
        (HTTPError(400), T),
        (HTTPError(404), T),
        (HTTPError(422), T),
        (StatusError(429), R),
        (StatusError(403), T),
        (StatusError("busy"), A),
        (StatusError(True), A),
        (ResponseError(502), R),
        (ResponseError(401), T),
        (HTTPValueError(), R),
        (HTTPError(200), A),
        (PermissionError(), T),
        (TypeError(), T),
        (AttributeError(), T),
        (NameError(), T),
        (UnboundLocalError(), T),
        (NotImplementedError(), T),
        (AssertionError(), T),
        (ImportError(), T),
        (ModuleNotFoundError(), T),
        (ValueError(), A),
        (KeyError("k"), A),
        (RuntimeError(), A),
        (RecursionError(), A),
        (OSError(), A),
        (Exception(), A),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_builtin_classification_table(exc: Exception, expected: FailureClass) -> None:
    assert classify(exc, CTX) is expected


def _sdk_error(name: str, *bases: type[Exception]) -> Exception:
    """An instance of a class named like an HTTP client's or SDK's error."""
    return type(name, bases or (Exception,), {})()


class TransportError(Exception):  # httpx's shape: TimeoutException(TransportError)
    pass


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_sdk_error("ReadTimeout", _sdk_error("TimeoutException", TransportError).__class__), R),
        (_sdk_error("ConnectError", TransportError), R),
        (_sdk_error("APITimeoutError", _sdk_error("APIConnectionError").__class__), R),
        (_sdk_error("ClientConnectionError"), R),
        (_sdk_error("ServerDisconnectedError"), R),
        (TransportError(), A),
        (_sdk_error("TimeoutLikeButNot"), A),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_client_and_sdk_transient_errors_by_class_name(exc: Exception, expected: FailureClass) -> None:
    assert classify(exc, CTX) is expected


def test_requests_exceptions_are_classified() -> None:
    requests = pytest.importorskip("requests")
    exceptions = requests.exceptions
    assert classify(exceptions.ReadTimeout(), CTX) is R
    assert classify(exceptions.ConnectTimeout(), CTX) is R
    assert classify(exceptions.ConnectionError(), CTX) is R
    response = requests.Response()
    response.status_code = 401
    assert classify(exceptions.HTTPError(response=response), CTX) is T
    response.status_code = 503
    assert classify(exceptions.HTTPError(response=response), CTX) is R


@pytest.mark.parametrize("exc", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(1)])
def test_base_exceptions_are_terminal_and_skip_classifiers(exc: BaseException) -> None:
    asked: list[BaseException] = []

    def greedy(error: Exception, ctx: NodeContext) -> FailureClass:
        asked.append(error)
        return R

    assert classify(exc, CTX, [greedy]) is T
    assert asked == []


def test_classify_never_raises_on_hostile_exceptions() -> None:
    class Hostile(Exception):
        @property
        def status_code(self) -> int:
            raise RuntimeError("boom")

    assert classify(Hostile(), CTX) is A


# --- classify: custom classifiers ----------------------------------------------------------


def test_custom_classifiers_run_first_in_order() -> None:
    calls: list[str] = []

    def defer(exc: Exception, ctx: NodeContext) -> None:
        calls.append("defer")

    def decide(exc: Exception, ctx: NodeContext) -> FailureClass:
        calls.append(f"decide:{ctx.node_id}:{ctx.attempt}")
        return T

    def never(exc: Exception, ctx: NodeContext) -> FailureClass:
        calls.append("never")
        return R

    assert classify(TimeoutError(), CTX, [defer, decide, never]) is T
    assert calls == ["defer", "decide:step:1"]
    assert classify(TimeoutError(), CTX, [defer]) is R


def test_classifier_may_return_a_class_name() -> None:
    assert classify(ValueError(), CTX, [lambda exc, ctx: "recoverable"]) is R


def test_raising_classifier_is_logged_once_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    def broken(exc: Exception, ctx: NodeContext) -> FailureClass:
        raise ZeroDivisionError("classifier bug")

    with caplog.at_level(logging.WARNING, logger="stroma.failures"):
        for _ in range(3):
            assert classify(TimeoutError(), CTX, [broken]) is R
    records = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(records) == 1
    assert "raised" in records[0].getMessage()


def test_classifier_returning_garbage_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    def garbage(exc: Exception, ctx: NodeContext) -> Any:
        return 42

    with caplog.at_level(logging.WARNING, logger="stroma.failures"):
        assert classify(ValueError(), CTX, [garbage]) is A
    assert any("returned int" in r.getMessage() for r in caplog.records)


def test_async_classifier_is_skipped_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def async_classifier(exc: Exception, ctx: NodeContext) -> FailureClass:
        return T

    with caplog.at_level(logging.WARNING, logger="stroma.failures"):
        assert classify(TimeoutError(), CTX, [async_classifier]) is R  # type: ignore[list-item]
    gc.collect()  # a never-awaited coroutine would warn here (and filterwarnings=error fails)
    assert any("is async" in r.getMessage() for r in caplog.records)


def test_classifier_base_exceptions_propagate() -> None:
    def interrupted(exc: Exception, ctx: NodeContext) -> FailureClass:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        classify(ValueError(), CTX, [interrupted])


# --- RetryBudget -------------------------------------------------------------------------------


def test_retry_budget_counts_per_run_and_step() -> None:
    budget = RetryBudget()
    policy = FailurePolicy(max_retries=2)
    assert budget.increment("r1", "a") == 1
    assert not budget.exhausted("r1", "a", policy)
    assert budget.increment("r1", "a") == 2
    assert budget.exhausted("r1", "a", policy)
    assert budget.count("r1", "b") == 0
    assert budget.count("r2", "a") == 0
    budget.increment("r2", "a")
    budget.reset("r1")
    assert budget.count("r1", "a") == 0 and budget.count("r2", "a") == 1
    budget.reset()
    assert budget.count("r2", "a") == 0


def test_retry_budget_is_bounded() -> None:
    budget = RetryBudget(max_runs=3)
    for run in range(10):
        budget.increment(f"run-{run}", "a")
    assert [budget.count(f"run-{run}", "a") for run in range(10)] == [0] * 7 + [1] * 3
    with pytest.raises(ConfigurationError, match="max_runs"):
        RetryBudget(max_runs=0)


def test_retry_budget_zero_retries_is_exhausted_at_once() -> None:
    assert RetryBudget().exhausted("r", "a", FailurePolicy(max_retries=0))
