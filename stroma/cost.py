"""Cost, tokens and latency: accounting, budgets and model fallback.

* :class:`CostTracker` accumulates each step's usage (running totals, O(1) per query).
* :class:`ExecutionBudget` caps a run's tokens, cost (USD) and latency (ms); the tracker raises
  :class:`BudgetExceeded` when a limit is exceeded after an attempt (:meth:`CostTracker.check_budget`)
  or already reached before one starts (:meth:`CostTracker.check_can_start`).
* :class:`FallbackPolicy` switches a step to a cheaper model once spend crosses a share of the
  cost budget, or after a failed attempt of a given class (one rule, :func:`select_fallback`,
  used by :func:`resolve_model` and by the step loop).

Overspend bound: an attempt only starts while every limit is still below its maximum, and its
cost is known only once it returns, so a run overspends by at most the cost of the attempts
that were already running when the limit was crossed (one attempt for a sequential run, one
per concurrent step otherwise).

Prices come from :mod:`stroma.pricing`; :data:`KNOWN_MODELS` and :func:`estimate_cost_usd` are
the established entry points and are re-exported here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from stroma.errors import BUDGET_LIMIT_FIELDS as _LIMIT_FIELDS
from stroma.errors import BudgetExceeded, ConfigurationError
from stroma.errors import Dimension as Dimension  # noqa: PLC0414 (re-exported: stroma.cost.Dimension stays)
from stroma.errors import configuration_error as _configuration_error
from stroma.failures import FailureClass, failure_classes
from stroma.pricing import KNOWN_MODELS, estimate_cost_usd

__all__ = [
    "KNOWN_MODELS",
    "BudgetExceeded",
    "CostTracker",
    "ExecutionBudget",
    "FallbackPolicy",
    "ModelHint",
    "NodeUsage",
    "SharedLimit",
    "StepUsage",
    "estimate_cost_usd",
    "resolve_model",
    "select_fallback",
]


class ExecutionBudget(BaseModel):
    """Limits for one run. ``None`` means no limit on that dimension.

    Args:
        max_tokens_total: input + output tokens over the run (int >= 0).
        max_cost_usd: USD over the run (finite, >= 0).
        max_latency_ms: the run's wall-clock time in milliseconds (int >= 0).
        unpriced: what to do when a model with no known price is used under a cost limit:
            ``"warn"`` (default: the usage is marked unpriced, logged and reported) or
            ``"fail"`` (the run stops as ``PARTIAL``: spend can no longer be enforced). The
            step loop applies this policy; :class:`CostTracker` only records the flag.
        warn_at_pct: share of a limit (0 < pct <= 1, default 0.8) at which the run gets its early
            warning: the first time the run's use of a limited dimension reaches it, the step
            span gets a ``stroma.budget.warning`` event and ``stroma.budget.warnings`` counts it
            (at most once per run and dimension; a limit of 0 never warns). ``None``: no warning.

    A limit of 0 is allowed and means nothing may be spent: no attempt starts (the one rule for
    the library and the CLI). Negative, NaN, infinite or non-numeric limits (strings such as
    ``"0.1"`` included: they are refused, not parsed) raise
    :class:`~stroma.errors.ConfigurationError` naming the setting.
    Budgets are immutable (note that pydantic's ``model_copy(update=...)`` skips validation;
    build a new budget instead).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens_total: int | None = None
    max_cost_usd: float | None = None
    max_latency_ms: int | None = None
    unpriced: Literal["warn", "fail"] = "warn"
    warn_at_pct: float | None = 0.8

    def __init__(
        self,
        max_tokens_total: int | None = None,
        max_cost_usd: float | None = None,
        max_latency_ms: int | None = None,
        unpriced: Literal["warn", "fail"] = "warn",
        warn_at_pct: float | None = 0.8,
    ) -> None:
        try:
            super().__init__(
                max_tokens_total=max_tokens_total,
                max_cost_usd=max_cost_usd,
                max_latency_ms=max_latency_ms,
                unpriced=unpriced,
                warn_at_pct=warn_at_pct,
            )
        except ValidationError as exc:
            raise _configuration_error("ExecutionBudget", exc) from exc

    @field_validator("max_tokens_total", "max_cost_usd", "max_latency_ms", "warn_at_pct", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number or None, not a bool")
        if isinstance(value, (str, bytes, bytearray)):
            # "0.1" is refused rather than parsed: a limit read from text should be converted
            # (and checked) where it is read, so a typo cannot become a budget silently
            raise ValueError("must be a number or None, not a string")
        return value

    @field_validator("max_tokens_total", "max_cost_usd", "max_latency_ms", mode="after")
    @classmethod
    def _non_negative(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value < 0):
            raise ValueError("must be a finite number >= 0 or None")
        return value

    @field_validator("warn_at_pct", mode="after")
    @classmethod
    def _a_share(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            raise ValueError("must be a share of the limit with 0 < warn_at_pct <= 1 (e.g. 0.8), or None")
        return value

    @classmethod
    def unlimited(cls) -> ExecutionBudget:
        """A budget with no limits."""
        return cls()

    @property
    def is_unlimited(self) -> bool:
        """True when no dimension is limited."""
        return self.max_tokens_total is None and self.max_cost_usd is None and self.max_latency_ms is None

    def limit(self, dimension: Dimension) -> float | None:
        """The limit of *dimension* (``"tokens"``, ``"cost"`` or ``"latency"``), or ``None``
        (also for the ``shared_*`` dimensions: those limits belong to a :class:`SharedLimit`)."""
        field = _LIMIT_FIELDS.get(dimension)
        if field is None:
            return None
        value = getattr(self, field)
        return None if value is None else float(value)


@runtime_checkable
class SharedLimit(Protocol):
    """A limit outside the run consulted around every attempt, e.g. a fleet-wide
    :class:`stroma.fleet.SharedBudget` (set it as ``RunConfig.shared_budget``).

    The step loop calls :meth:`reserve_attempt` before each attempt, after the run's own budget
    checks, and :meth:`settle_attempt` once the attempt's usage is charged (failed attempts
    included). ``reserve_attempt`` raises :class:`BudgetExceeded` (``dimension``
    ``"shared_cost"`` or ``"shared_tokens"``) to refuse the attempt: the step stops as a budget
    breach (``PARTIAL``). Any other ``Exception`` means the limit could not be consulted: the
    step stops ``PARTIAL`` with that error (fail closed). ``settle_attempt`` must not raise.
    An attempt interrupted by a ``BaseException`` (cancellation) is never settled: its hold must
    lapse on its own (a lease).
    """

    async def reserve_attempt(self, step_id: str, run_id: str) -> Any:
        """Reserve the next attempt's estimated spend; returns a handle for :meth:`settle_attempt`."""
        ...

    async def settle_attempt(self, hold: Any, step_id: str, cost_usd: float, tokens: int) -> None:
        """Replace the hold *hold* with the attempt's actual spend (USD, input + output tokens)."""
        ...


@dataclass
class NodeUsage:
    """Resource usage of one step (one attempt, or the sum recorded for a step).

    Attributes:
        node_id: the step id.
        tokens_used: input + output tokens.
        cost_usd: cost in USD (0.0 when unpriced).
        latency_ms: time spent, in milliseconds.
        model: the model used, if any.
        output_tokens: the output part of ``tokens_used``.
        unpriced: tokens were used with no known price.
    """

    node_id: str
    tokens_used: int
    cost_usd: float
    latency_ms: int
    model: str | None = None
    output_tokens: int = 0
    unpriced: bool = False

    @property
    def input_tokens(self) -> int:
        """``tokens_used - output_tokens``."""
        return self.tokens_used - self.output_tokens


StepUsage = NodeUsage


class CostTracker:
    """Accumulates usage per step and checks it against an :class:`ExecutionBudget`.

    Recording adds to per-step entries and to running totals, so every total is O(1). Safe to
    share between tasks, and between threads (recording takes a lock). Memory grows with the
    number of distinct step ids and unpriced model names, not with the number of attempts.
    """

    def __init__(self) -> None:
        # per step: [tokens_used, cost_usd, latency_ms, model, output_tokens, unpriced]
        self._usage: dict[str, list[Any]] = {}
        self._tokens = 0
        self._output_tokens = 0
        self._cost = 0.0
        self._latency_ms = 0
        self._unpriced_models: set[str] = set()
        self._unpriced_count = 0
        self._lock = threading.Lock()

    def record(self, usage: NodeUsage) -> None:
        """Add *usage* to its step's entry and to the run totals."""
        self.add(
            usage.node_id,
            tokens_used=usage.tokens_used,
            output_tokens=usage.output_tokens,
            cost_usd=usage.cost_usd,
            latency_ms=usage.latency_ms,
            model=usage.model,
            unpriced=usage.unpriced,
        )

    def add(
        self,
        node_id: str,
        *,
        tokens_used: int,
        output_tokens: int,
        cost_usd: float,
        latency_ms: int,
        model: str | None,
        unpriced: bool,
    ) -> None:
        """:meth:`record` without building a :class:`NodeUsage` (the step loop's hot path)."""
        with self._lock:
            entry = self._usage.get(node_id)
            if entry is None:
                self._usage[node_id] = [tokens_used, cost_usd, latency_ms, model, output_tokens, unpriced]
            else:
                entry[0] += tokens_used
                entry[1] += cost_usd
                entry[2] += latency_ms
                entry[3] = model or entry[3]
                entry[4] += output_tokens
                entry[5] = entry[5] or unpriced
            self._tokens += tokens_used
            self._output_tokens += output_tokens
            self._cost += cost_usd
            self._latency_ms += latency_ms
            if unpriced:
                self._unpriced_count += 1
                if model:
                    self._unpriced_models.add(model)

    # --- budget checks ---------------------------------------------------------------------

    def check_budget(self, budget: ExecutionBudget, node_id: str, *, elapsed_ms: float | None = None) -> None:
        """Raise :class:`BudgetExceeded` if a total now **exceeds** (>) its limit.

        Called after an attempt is recorded. Latency is checked against *elapsed_ms* (the run's
        wall-clock time) when given, else against the sum of recorded latencies. Dimensions
        are checked in the order tokens, cost, latency. Unpriced usage counts as $0 here (see
        :attr:`unpriced_count`; the step loop applies ``budget.unpriced``).
        """
        self._check(budget, node_id, elapsed_ms, at_limit=False)

    def check_can_start(self, budget: ExecutionBudget, node_id: str, *, elapsed_ms: float | None = None) -> None:
        """Raise :class:`BudgetExceeded` if a limit is already **reached** (>=).

        Called before an attempt starts, so no call starts once a limit is reached; a limit of
        0 blocks every call. Latency is measured as in :meth:`check_budget`.
        """
        self._check(budget, node_id, elapsed_ms, at_limit=True)

    def _check(self, budget: ExecutionBudget, node_id: str, elapsed_ms: float | None, *, at_limit: bool) -> None:
        latency = self._latency_ms if elapsed_ms is None else elapsed_ms
        checks: tuple[tuple[Dimension, float | None, float], ...] = (
            ("tokens", budget.max_tokens_total, self._tokens),
            ("cost", budget.max_cost_usd, self._cost),
            ("latency", budget.max_latency_ms, latency),
        )
        for dimension, limit, actual in checks:
            if limit is not None and (actual >= limit if at_limit else actual > limit):
                raise BudgetExceeded(dimension, float(limit), float(actual), node_id)

    def utilization(self, budget: ExecutionBudget) -> float | None:
        """Cost used / cost limit (``None`` without a cost limit; ``inf`` for spend on a 0 limit)."""
        limit = budget.max_cost_usd
        if limit is None:
            return None
        if limit == 0:
            return 0.0 if self._cost == 0 else math.inf
        return self._cost / limit

    # --- totals ----------------------------------------------------------------------------

    def snapshot(self) -> tuple[float, int, int, dict[str, float]]:
        """``(USD, input tokens, output tokens, USD per step id)`` over all steps, read together
        (the per-step dict is a copy, in first-use order)."""
        with self._lock:
            by_step = {node_id: entry[1] for node_id, entry in self._usage.items()}
            return self._cost, self._tokens - self._output_tokens, self._output_tokens, by_step

    @property
    def total_tokens(self) -> int:
        """Input + output tokens over all steps."""
        return self._tokens

    @property
    def total_output_tokens(self) -> int:
        """Output tokens over all steps."""
        return self._output_tokens

    @property
    def total_input_tokens(self) -> int:
        """Input tokens over all steps."""
        return self._tokens - self._output_tokens

    @property
    def total_cost_usd(self) -> float:
        """USD over all steps (priced usage only)."""
        return self._cost

    @property
    def total_latency_ms(self) -> int:
        """Sum of recorded step latencies, in milliseconds (not the run's wall-clock time)."""
        return self._latency_ms

    @property
    def unpriced_models(self) -> set[str]:
        """Models used without a known price (a copy)."""
        return set(self._unpriced_models)

    @property
    def unpriced_count(self) -> int:
        """Recorded usages marked unpriced (including those without a model name)."""
        return self._unpriced_count

    def summary(self) -> dict[str, NodeUsage]:
        """Usage per step id (copies: changing them does not change the tracker)."""
        with self._lock:
            return {
                node_id: NodeUsage(
                    node_id=node_id,
                    tokens_used=entry[0],
                    cost_usd=entry[1],
                    latency_ms=entry[2],
                    model=entry[3],
                    output_tokens=entry[4],
                    unpriced=entry[5],
                )
                for node_id, entry in self._usage.items()
            }

    def cost_by_node(self) -> dict[str, float]:
        """USD per step id."""
        with self._lock:
            return {node_id: entry[1] for node_id, entry in self._usage.items()}


@dataclass
class ModelHint:
    """A step's preferred model, optional fallback model and per-call token cap."""

    node_id: str
    preferred_model: str
    fallback_model: str | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ConfigurationError(
                f"ModelHint.max_tokens for step {self.node_id!r} must be an integer >= 1 or None, "
                f"got {self.max_tokens!r}"
            )


@dataclass(frozen=True)
class FallbackPolicy:
    """Use *fallback_model* instead of *preferred_model* when spend or failures call for it.

    Args:
        preferred_model: the model a step declares.
        fallback_model: the model used instead (must differ).
        at_budget_pct: share of ``max_cost_usd`` (0 < pct <= 1) from which a step asking for
            *preferred_model* gets the fallback. Needs a cost limit; without one this rule never
            fires. Not used by a policy with ``on_failure`` (an error policy).
        on_failure: failure classes (``FailureClass`` members or their names) after which the
            remaining attempts of a step use the fallback model; ``None`` (default): a budget
            policy. See :func:`select_fallback` for the whole rule.

    Raises :class:`~stroma.errors.ConfigurationError` naming the setting for empty or equal
    model names, a share outside (0, 1], or an unknown failure class.
    """

    preferred_model: str
    fallback_model: str
    at_budget_pct: float = 0.80
    on_failure: frozenset[FailureClass] | None = None

    def __post_init__(self) -> None:
        for name in ("preferred_model", "fallback_model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"FallbackPolicy.{name} must be a non-empty string, got {value!r}")
        if self.preferred_model == self.fallback_model:
            raise ConfigurationError(
                f"FallbackPolicy.fallback_model must differ from preferred_model, both are {self.preferred_model!r}"
            )
        pct = self.at_budget_pct
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not (0 < pct <= 1):
            raise ConfigurationError(
                f"FallbackPolicy.at_budget_pct must be a number with 0 < at_budget_pct <= 1, got {pct!r}"
            )
        object.__setattr__(self, "at_budget_pct", float(pct))
        if self.on_failure is not None:
            object.__setattr__(self, "on_failure", _failure_classes(self.on_failure))

    def switches_on(self, failure_class: FailureClass) -> bool:
        """Whether a failed attempt of *failure_class* moves the step to the fallback model."""
        return self.on_failure is not None and failure_class in self.on_failure


def _failure_classes(values: Any) -> frozenset[FailureClass]:
    return failure_classes(values, setting="FallbackPolicy.on_failure")


def select_fallback(
    model: str | None,
    policies: Iterable[FallbackPolicy],
    *,
    utilization: float | None,
    failures: Iterable[tuple[str | None, FailureClass]] = (),
) -> FallbackPolicy | None:
    """The one model-fallback rule: the first of *policies* that is for *model* and fires.

    A policy is for *model* when its ``preferred_model`` is *model*; ``None`` (a step that does
    not name the model it wants) matches every policy. A policy fires:

    * without ``on_failure`` (a budget policy): once *utilization* (cost used / cost limit, see
      :meth:`CostTracker.utilization`; ``None`` without a cost limit) reaches ``at_budget_pct``;
    * with ``on_failure`` (an error policy): once an attempt of the step failed with a class it
      names, on its preferred model, its fallback model or a model it did not report
      (*failures* holds ``(model, failure class)`` per failed attempt). Its ``at_budget_pct``
      is not used.

    Fallbacks do not chain: the policy's ``fallback_model`` is used as given. Both
    :func:`resolve_model` and the step loop (:func:`stroma.current_model`) apply this rule.
    """
    for policy in policies:
        if model is not None and policy.preferred_model != model:
            continue
        on_failure = policy.on_failure
        if on_failure is None:
            if utilization is not None and utilization >= policy.at_budget_pct:
                return policy
            continue
        for failed_model, failure_class in failures:
            if failure_class in on_failure and failed_model in (None, policy.preferred_model, policy.fallback_model):
                return policy
    return None


def resolve_model(
    declared_model: str | None,
    tracker: CostTracker,
    budget: ExecutionBudget,
    fallbacks: Iterable[FallbackPolicy] | Mapping[Any, FallbackPolicy],
) -> str | None:
    """The model a step declaring *declared_model* should use now, given spend so far.

    Applies :func:`select_fallback` (budget policies only: no attempt has failed here) with the
    tracker's cost utilization: the first budget policy whose ``preferred_model`` is
    *declared_model* and whose ``at_budget_pct`` is reached gives its ``fallback_model``;
    otherwise *declared_model* is returned unchanged. ``None`` stays ``None``; without a cost
    limit nothing changes.
    """
    if declared_model is None:
        return None
    policies = fallbacks.values() if isinstance(fallbacks, Mapping) else fallbacks
    policy = select_fallback(declared_model, policies, utilization=tracker.utilization(budget))
    return declared_model if policy is None else policy.fallback_model
