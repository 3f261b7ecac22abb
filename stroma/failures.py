"""Failure classification and retry policies.

When a step attempt raises, :func:`classify` sorts the exception into a :class:`FailureClass`;
:func:`resolve_policy` then picks the :class:`FailurePolicy` that says how many retries that
class gets for that step and how long to wait between them (see :mod:`stroma.retry`).

Configuration order for a policy (one rule, applied by :func:`resolve_policy`): the step's own
override (``node_policies[step_id][failure_class]``) > the run's ``policy_map`` > the defaults
of :func:`default_policy_map`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from stroma.contracts import ContractViolation
from stroma.errors import BudgetExceeded, ConfigurationError, UsageError, configuration_error, exception_types
from stroma.retry import retry_delays

__all__ = [
    "Classifier",
    "FailureClass",
    "FailurePolicy",
    "NodeContext",
    "PolicyMap",
    "RetryBudget",
    "StepContext",
    "check_policy_map",
    "classify",
    "default_policy_map",
    "resolve_policy",
]

_log = logging.getLogger(__name__)

MAX_RETRIES_LIMIT: Final = 100


class FailureClass(str, Enum):
    """How a failed attempt should be treated.

    - ``RECOVERABLE``: transient (timeouts, dropped connections, rate limits, 5xx); retry.
    - ``TERMINAL``: retrying cannot help (contract violations, budget breaches, auth and
      programming errors); stop after this attempt.
    - ``AMBIGUOUS``: unknown; a few cautious retries (one by default).
    """

    RECOVERABLE = "RECOVERABLE"
    TERMINAL = "TERMINAL"
    AMBIGUOUS = "AMBIGUOUS"

    @property
    def otel_value(self) -> str:
        """The value for the ``stroma.failure.class`` span attribute (``"recoverable"``, ...)."""
        return self.value.lower()


_BY_NAME: Final[Mapping[str, FailureClass]] = {member.value: member for member in FailureClass}
_CLASS_NAMES: Final = ", ".join(member.value for member in FailureClass)


class FailurePolicy(BaseModel):
    """How often, and how patiently, to retry one class of failure.

    Args:
        max_retries: retries after the first attempt, 0 to 100: ``max_retries=N`` allows up to
            N + 1 attempts per ``execute_step`` call.
        backoff_seconds: base delay in seconds (>= 0, finite).
        max_backoff_seconds: cap on any single delay, in seconds (finite, >= backoff_seconds).
            Defaults to 30 s, or to ``backoff_seconds`` when that is larger.

    The delay before retry *k* (k = 1, 2, ...) is a uniform random draw from::

        [0, min(max_backoff_seconds, backoff_seconds * 2 ** (k - 1))]

    (exponential backoff, base 2, capped, full jitter; computed by :func:`stroma.retry.retry_delays`
    from ``backoff.expo`` and ``backoff.full_jitter``). Policies are immutable; invalid values
    raise :class:`~stroma.errors.ConfigurationError` (a ``ValueError``) naming the setting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_retries: int = 3
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    def __init__(
        self,
        max_retries: int = 3,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float | None = None,
    ) -> None:
        data: dict[str, Any] = {"max_retries": max_retries, "backoff_seconds": backoff_seconds}
        if max_backoff_seconds is not None:
            data["max_backoff_seconds"] = max_backoff_seconds
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise configuration_error("FailurePolicy", exc) from exc

    @field_validator("max_retries", "backoff_seconds", "max_backoff_seconds", mode="before")
    @classmethod
    def _no_bools(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"FailurePolicy.{info.field_name} must be a number, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_cap(cls, data: Any) -> Any:
        # An old-style FailurePolicy(backoff_seconds=60) must keep working: the cap follows
        # the base delay unless it was given explicitly.
        if isinstance(data, dict) and "max_backoff_seconds" not in data:
            base = data.get("backoff_seconds")
            if isinstance(base, (int, float)) and not isinstance(base, bool) and base > 30.0:
                return {**data, "max_backoff_seconds": base}
        return data

    @model_validator(mode="after")
    def _check(self) -> FailurePolicy:
        if not 0 <= self.max_retries <= MAX_RETRIES_LIMIT:
            raise ValueError(
                f"FailurePolicy.max_retries must be between 0 and {MAX_RETRIES_LIMIT}, got {self.max_retries!r}"
            )
        for name in ("backoff_seconds", "max_backoff_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"FailurePolicy.{name} must be a finite number >= 0, got {value!r}")
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError(
                f"FailurePolicy.max_backoff_seconds ({self.max_backoff_seconds!r}) must be >= "
                f"backoff_seconds ({self.backoff_seconds!r})"
            )
        return self

    def delays(self) -> Iterator[float]:
        """Seconds to sleep before retries 1, 2, 3, ... (an infinite, fresh iterator).

        Retry *k* sleeps ``uniform(0, min(max_backoff_seconds, backoff_seconds * 2 ** (k - 1)))``.
        """
        return retry_delays(self)


PolicyMap = dict[FailureClass, FailurePolicy]
"""Retry policies by failure class."""

_DEFAULT_POLICIES: Final[Mapping[FailureClass, FailurePolicy]] = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=3, backoff_seconds=1.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.5),
}


def default_policy_map() -> PolicyMap:
    """The default policies, as a new dict on every call (safe to modify).

    ================  ===========  =============  ===================
    class             max_retries  backoff (s)    max_backoff (s)
    ================  ===========  =============  ===================
    ``RECOVERABLE``   3            1.0            30
    ``TERMINAL``      0            0.0            30
    ``AMBIGUOUS``     1            0.5            30
    ================  ===========  =============  ===================
    """
    return dict(_DEFAULT_POLICIES)


def check_policy_map(policies: Mapping[Any, Any], *, setting: str = "policy_map") -> PolicyMap:
    """Validate a user-supplied policy map and return it as a :data:`PolicyMap`.

    Keys may be :class:`FailureClass` members or their names (``"RECOVERABLE"``, any case);
    values must be :class:`FailurePolicy`. Raises :class:`~stroma.errors.ConfigurationError`
    naming *setting*, the key and the value otherwise.
    """
    if not isinstance(policies, Mapping):
        raise ConfigurationError(
            f"{setting} must be a mapping of FailureClass to FailurePolicy, got {type(policies).__name__}"
        )
    result: PolicyMap = {}
    for key, policy in policies.items():
        failure_class = parse_failure_class(key)
        if failure_class is None:
            raise ConfigurationError(f"{setting} has an unknown failure class {key!r}; use one of {_CLASS_NAMES}")
        if not isinstance(policy, FailurePolicy):
            raise ConfigurationError(
                f"{setting}[{failure_class.value}] must be a FailurePolicy, got {type(policy).__name__}"
            )
        result[failure_class] = policy
    return result


def resolve_policy(
    failure_class: FailureClass,
    step_id: str,
    policy_map: Mapping[FailureClass, FailurePolicy] | None = None,
    node_policies: Mapping[str, Mapping[FailureClass, FailurePolicy]] | None = None,
) -> FailurePolicy:
    """The policy for *failure_class* at *step_id*.

    Precedence: ``node_policies[step_id][failure_class]`` > ``policy_map[failure_class]`` >
    :func:`default_policy_map`'s entry. A missing level, or a class missing from a level, falls
    through to the next.
    """
    if node_policies:
        step_map = node_policies.get(step_id)
        if step_map:
            policy = step_map.get(failure_class)
            if policy is not None:
                return policy
    if policy_map:
        policy = policy_map.get(failure_class)
        if policy is not None:
            return policy
    return _DEFAULT_POLICIES[failure_class]


@dataclass(frozen=True)
class NodeContext:
    """What a classifier knows about the failed attempt.

    Attributes:
        node_id: the step id.
        attempt: the attempt that failed, 1-based.
        run_id: the run's id.
    """

    node_id: str
    attempt: int
    run_id: str

    @property
    def step_id(self) -> str:
        """Alias of :attr:`node_id`."""
        return self.node_id


StepContext = NodeContext

Classifier = Callable[[Exception, NodeContext], FailureClass | None]
"""A custom classifier: return a :class:`FailureClass` to decide, or ``None`` to defer.

Plain functions, lambdas and callable objects all qualify. A classifier must be quick and
synchronous. One that raises is logged (once per classifier) and skipped; its exception never
replaces the step's own error.
"""

# HTTP statuses worth retrying: request timeout, conflict, too early, too many requests.
_RETRYABLE_STATUSES: Final = frozenset({408, 409, 425, 429})
_TERMINAL_TYPES: Final = (
    PermissionError,
    TypeError,
    AttributeError,
    NameError,
    NotImplementedError,
    AssertionError,
    ImportError,
)
_RECOVERABLE_TYPES: Final = (TimeoutError, asyncio.TimeoutError, ConnectionError)
# HTTP clients and model SDKs raise their own timeout and connection errors, which do not
# derive from the builtin ones (httpx, requests, aiohttp, openai, anthropic). They are matched
# by the exact name of the class or one of its bases, so no client library is imported here.
_TRANSIENT_CLASS_NAMES: Final = frozenset(
    {
        "TimeoutException",  # httpx
        "ConnectTimeout",  # httpx, requests
        "ReadTimeout",  # httpx, requests
        "WriteTimeout",  # httpx
        "PoolTimeout",  # httpx
        "ConnectError",  # httpx
        "RemoteProtocolError",  # httpx: the server dropped the connection mid-response
        "Timeout",  # requests
        "ConnectionError",  # requests (not the builtin)
        "APITimeoutError",  # openai, anthropic
        "APIConnectionError",  # openai, anthropic
        "ClientConnectionError",  # aiohttp
        "ServerDisconnectedError",  # aiohttp
        "ServerTimeoutError",  # aiohttp
    }
)

_logged_lock = threading.Lock()
_logged_classifiers: dict[tuple[int, str], None] = {}
_LOGGED_LIMIT: Final = 1024


def classify(exc: BaseException, context: NodeContext, classifiers: Sequence[Classifier] | None = None) -> FailureClass:
    """Sort a step's exception into a :class:`FailureClass`. Never raises.

    Custom *classifiers* are asked first, in order; the first that returns a class decides
    (a class name string such as ``"terminal"`` is accepted too). Then the built-in rules, top
    to bottom:

    ========================================================  ===============
    exception                                                 class
    ========================================================  ===============
    :class:`~stroma.contracts.ContractViolation`              ``TERMINAL``
    :class:`~stroma.cost.BudgetExceeded` (never retried)      ``TERMINAL``
    :class:`~stroma.errors.UsageError` (bad usage reported)   ``TERMINAL``
    ``TimeoutError``, ``asyncio.TimeoutError``,               ``RECOVERABLE``
    ``ConnectionError`` (and subclasses)
    HTTP status 408, 409, 425, 429 or 5xx                     ``RECOVERABLE``
    HTTP status 401, 403 and every other 4xx                  ``TERMINAL``
    HTTP client and SDK timeout/connection errors, by class   ``RECOVERABLE``
    name (httpx ``TimeoutException``, ``ConnectError``;
    requests ``Timeout``, ``ConnectionError``; openai and
    anthropic ``APITimeoutError``, ``APIConnectionError``;
    aiohttp ``ClientConnectionError``, ...)
    ``PermissionError``, ``TypeError``, ``AttributeError``,   ``TERMINAL``
    ``NameError``, ``NotImplementedError``,
    ``AssertionError``, ``ImportError`` (programming and
    auth errors: exactly one attempt)
    ``ValueError`` and everything else                        ``AMBIGUOUS``
    ========================================================  ===============

    The HTTP status is read from an int ``status_code`` or ``status`` attribute of the
    exception, or from ``exc.response.status_code`` (httpx, requests, openai and anthropic SDK
    errors). A ``BaseException`` that is not an ``Exception`` (cancellation, ``KeyboardInterrupt``)
    is ``TERMINAL`` without consulting classifiers: it is never retried.
    """
    if not isinstance(exc, Exception):
        return FailureClass.TERMINAL
    for classifier in classifiers or ():
        decided = _ask(classifier, exc, context)
        if decided is not None:
            return decided
    try:
        return _builtin_class(exc)
    except Exception:  # a hostile exception object (e.g. a raising property); stay safe
        return FailureClass.AMBIGUOUS


def _ask(classifier: Classifier, exc: Exception, context: NodeContext) -> FailureClass | None:
    try:
        result: Any = classifier(exc, context)
    except Exception as fault:
        # the type chain only: the classifier's exception may be raised from the step's own,
        # whose message (and traceback) can carry step content (issue 8 D16)
        _log_classifier_once(classifier, f"raised {exception_types(fault)}; it is skipped")
        return None
    if result is None:
        return None
    decided = parse_failure_class(result)
    if decided is None:
        if inspect.iscoroutine(result):
            result.close()  # an async classifier: never awaited, so close it to avoid a warning
            _log_classifier_once(classifier, "is async; classifiers must be synchronous; it is skipped")
        else:
            _log_classifier_once(
                classifier, f"returned {type(result).__name__}, not a FailureClass or None; it is skipped"
            )
    return decided


def parse_failure_class(value: object) -> FailureClass | None:
    """*value* as a :class:`FailureClass`, or ``None`` when it names none.

    Stroma's one reading of a failure class given by a user (policy-map keys, fallback
    ``on_failure`` sets, classifier results, CLI options): a member, or its name in any case
    (``"terminal"``, ``"Recoverable"``). Anything else, ``None`` included, gives ``None``.
    """
    if isinstance(value, FailureClass):
        return value
    if isinstance(value, str):
        return _BY_NAME.get(value.strip().upper())
    return None


def failure_classes(values: object, *, setting: str) -> frozenset[FailureClass]:
    """A set of failure classes read with :func:`parse_failure_class`: one class or an iterable.

    Raises :class:`~stroma.errors.ConfigurationError` naming *setting* for something that is not
    iterable or an item that names no class.
    """
    if isinstance(values, (str, FailureClass)):
        values = (values,)
    try:
        items = list(values)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigurationError(
            f"{setting} must be a set of FailureClass values or None, got {type(values).__name__}"
        ) from None
    result: set[FailureClass] = set()
    for item in items:
        failure_class = parse_failure_class(item)
        if failure_class is None:
            raise ConfigurationError(f"{setting} has an unknown failure class {item!r}; use one of {_CLASS_NAMES}")
        result.add(failure_class)
    return frozenset(result)


def _log_classifier_once(classifier: Any, what: str) -> None:
    name = getattr(classifier, "__qualname__", None) or type(classifier).__qualname__
    key = (id(classifier), str(name))
    with _logged_lock:
        if key in _logged_classifiers:
            return
        if len(_logged_classifiers) >= _LOGGED_LIMIT:
            _logged_classifiers.pop(next(iter(_logged_classifiers)))
        _logged_classifiers[key] = None
    _log.warning("failure classifier %s %s (logged once per classifier)", name, what)


def _http_status(exc: Exception) -> int | None:
    for holder, attr in (
        (exc, "status_code"),
        (exc, "status"),
        (getattr(exc, "response", None), "status_code"),
    ):
        if holder is None:
            continue
        value = getattr(holder, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def _builtin_class(exc: Exception) -> FailureClass:
    if isinstance(exc, (ContractViolation, BudgetExceeded, UsageError)):
        return FailureClass.TERMINAL
    if isinstance(exc, _RECOVERABLE_TYPES):
        return FailureClass.RECOVERABLE
    status = _http_status(exc)
    if status is not None:
        if status in _RETRYABLE_STATUSES or status >= 500:
            return FailureClass.RECOVERABLE
        if status >= 400:
            return FailureClass.TERMINAL
    if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(exc).__mro__):
        return FailureClass.RECOVERABLE
    if isinstance(exc, _TERMINAL_TYPES):
        return FailureClass.TERMINAL
    return FailureClass.AMBIGUOUS


class RetryBudget:
    """Retry counters per ``(run_id, node_id)``, kept for compatibility.

    The step loop does **not** use this: retries are counted per ``execute_step`` call, so a
    step called again later in the same run starts from zero (design §3, improvement 1). It is
    bounded: counters are grouped by run, :meth:`reset` drops a run's counters, and at most
    ``max_runs`` runs are kept (the oldest run is forgotten first).
    """

    def __init__(self, *, max_runs: int = 1024) -> None:
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
            raise ConfigurationError(f"RetryBudget.max_runs must be an integer >= 1, got {max_runs!r}")
        self._max_runs = max_runs
        self._runs: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def increment(self, run_id: str, node_id: str) -> int:
        """Count one retry of *node_id* in *run_id*; return the new count."""
        with self._lock:
            counts = self._runs.get(run_id)
            if counts is None:
                if len(self._runs) >= self._max_runs:
                    self._runs.pop(next(iter(self._runs)))
                counts = self._runs[run_id] = {}
            counts[node_id] = counts.get(node_id, 0) + 1
            return counts[node_id]

    def count(self, run_id: str, node_id: str) -> int:
        """Retries counted for *node_id* in *run_id* (0 if none)."""
        return self._runs.get(run_id, {}).get(node_id, 0)

    def exhausted(self, run_id: str, node_id: str, policy: FailurePolicy) -> bool:
        """Whether the count has reached ``policy.max_retries``."""
        return self.count(run_id, node_id) >= policy.max_retries

    def reset(self, run_id: str | None = None) -> None:
        """Forget one run's counters, or every counter when *run_id* is ``None``."""
        with self._lock:
            if run_id is None:
                self._runs.clear()
            else:
                self._runs.pop(run_id, None)
