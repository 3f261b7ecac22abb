"""Run configuration: :class:`RunConfig` and the step hooks, :class:`NodeHooks`.

Both keep the names and fields of the established ``stroma`` API. ``RunConfig`` is validated at
construction: nonsense raises :class:`~stroma.errors.ConfigurationError` (a ``ValueError``)
naming the setting; risky-but-legal settings warn (a ``UserWarning``, once per configuration).
Step ids named in per-step settings are checked against the pipeline when a run starts
(:meth:`RunConfig.check_step_ids`), because only then are the steps known.

A configuration is a value: change it with :meth:`RunConfig.replace`, which validates the result
(pydantic's ``model_copy(update=...)`` does not). The runner's ``with_*`` builders use it.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from stroma._ids import MAX_RUN_ID_CHARS, run_id_problem
from stroma.cost import ExecutionBudget, FallbackPolicy, SharedLimit
from stroma.errors import ConfigurationError, configuration_error
from stroma.failures import Classifier, FailureClass, PolicyMap, check_policy_map, default_policy_map
from stroma.pricing import price_for
from stroma.telemetry.settings import TelemetrySettings

HookResult = Awaitable[None] | None


@dataclass(frozen=True)
class NodeHooks:
    """Callbacks at step boundaries; each may be a plain function or a coroutine function.

    - ``on_node_start(run_id, step_id, input_state_dict)`` before each attempt;
    - ``on_node_success(run_id, step_id, output_state_dict, tokens_used)`` once a step succeeded;
    - ``on_node_failure(run_id, step_id, exc, failure_class)`` after each failed attempt.

    A hook that is neither ``None`` nor callable raises
    :class:`~stroma.errors.ConfigurationError` naming it, at construction. Hooks run on the
    step's task, in order, and are awaited. A hook that raises is logged once
    and ignored: it never changes the step's outcome and never re-runs a finished step. A hook
    must not block for long (it delays the step) and should not mutate the states it receives
    (they are copies made for the hook).
    """

    on_node_start: Callable[[str, str, dict[str, Any]], HookResult] | None = None
    on_node_success: Callable[[str, str, dict[str, Any], int], HookResult] | None = None
    on_node_failure: Callable[[str, str, Exception, FailureClass], HookResult] | None = None

    def __post_init__(self) -> None:
        for name in ("on_node_start", "on_node_success", "on_node_failure"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise ConfigurationError(
                    f"NodeHooks.{name} must be a function (plain or async) or None, got {type(hook).__name__}"
                )


StepHooks = NodeHooks

_WORKFLOW_RE = re.compile(r"^[A-Za-z0-9_.:/ -]{1,128}$")

# Set while RunConfig.replace() builds a copy: builders are applied one at a time, so a
# combination that is risky after one builder may be fine after the next. The runner warns
# about what is left when a run starts (RunConfig.warn_risky()).
_defer_warnings: ContextVar[bool] = ContextVar("stroma_defer_config_warnings", default=False)


def new_run_id() -> str:
    """A fresh random run id: 32 hex digits (128 random bits, like a UUID4's hex form)."""
    return os.urandom(16).hex()


def check_run_id(value: object, *, setting: str = "RunConfig.run_id") -> str:
    """Return *value* if it is a usable run id, else raise ``ConfigurationError`` naming *setting*.

    A run id is 1-256 characters without control characters; any other character (``:``,
    ``/``, spaces) is allowed, because checkpoint stores never build keys by joining ids. The
    same rule is applied by the checkpoint stores (:mod:`stroma._ids`).
    """
    problem = run_id_problem(value)
    if problem is not None:
        shown = repr(value) if isinstance(value, str) and len(value) <= MAX_RUN_ID_CHARS else type(value).__name__
        raise ConfigurationError(f"{setting} {problem}, got {shown}")
    return value  # type: ignore[return-value]


def _shown(value: object) -> str:
    """How a rejected setting is quoted in a message: numbers as they are, anything else by type
    (a text value is never repeated: it may be a secret pasted into the wrong place)."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return type(value).__name__


def _reject_bool(setting: str, value: object) -> None:
    if isinstance(value, bool):
        raise ConfigurationError(f"{setting} must be a number of milliseconds, not a bool ({value!r})")


class RunConfig(BaseModel):
    """Settings of one pipeline run.

    Fields of the established API: ``run_id`` (a fresh random id when not given), ``budget``,
    ``policy_map``, ``node_policies`` (per-step overrides of ``policy_map``), ``hooks``,
    ``classifiers`` (consulted before the built-in rules), ``context`` (the shared dict passed to
    steps that take a second parameter), ``node_timeouts`` (per-step timeout of one attempt, in
    **milliseconds**), ``resume_from`` (step id to resume at) and ``model_fallbacks``.

    Added here: ``workflow_name`` (names the run span, ``gen_ai.workflow.name`` and the
    ``stroma.workflow.name`` metric label; keep it low-cardinality), ``run_timeout_ms`` (a
    deadline for the whole run, in milliseconds; every attempt's timeout is capped by what is
    left of it), ``telemetry`` (:class:`~stroma.telemetry.settings.TelemetrySettings`;
    default: environment) and ``shared_budget`` (a :class:`~stroma.cost.SharedLimit` such as
    :class:`stroma.fleet.SharedBudget`, a limit shared with other processes, reserved before and
    settled after every attempt, on top of ``budget``).

    Run ids: a ``run_id`` given by the caller is *explicit* (:attr:`explicit_run_id`) and is used
    by every run of this configuration, so running it again resumes that run (see
    :class:`~stroma.runner.StromaRunner`). Without one, the default is only a placeholder: the
    runner gives each run a fresh id.

    ``context`` is copied by pydantic at construction, and the runner gives each run its own
    shallow copy, so what one run's steps write there never reaches the next run (nor the dict
    the caller passed in).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run_id: str = Field(default_factory=new_run_id)
    budget: ExecutionBudget = Field(default_factory=ExecutionBudget.unlimited)
    policy_map: PolicyMap = Field(default_factory=default_policy_map)
    node_policies: dict[str, PolicyMap] = Field(default_factory=dict)
    hooks: NodeHooks = Field(default_factory=NodeHooks)
    classifiers: list[Classifier] = Field(default_factory=list)
    context: dict[str, Any] = Field(default_factory=dict)
    node_timeouts: dict[str, int] = Field(default_factory=dict)
    resume_from: str | None = None
    model_fallbacks: list[FallbackPolicy] = Field(default_factory=list)
    workflow_name: str = "pipeline"
    run_timeout_ms: int | None = None
    telemetry: TelemetrySettings | None = None
    shared_budget: SharedLimit | None = None

    _risks_reported: bool = PrivateAttr(default=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise configuration_error("RunConfig", exc) from exc
        if not _defer_warnings.get():
            self.warn_risky(stacklevel=3)

    @property
    def explicit_run_id(self) -> bool:
        """Whether ``run_id`` was given by the caller (rather than generated as a placeholder)."""
        return "run_id" in self.model_fields_set

    def replace(self, **changes: Any) -> RunConfig:
        """A new, validated configuration with *changes* applied.

        Only the fields the caller set (and *changes*) are carried over, so a generated run id
        stays a placeholder. Risky-but-legal combinations are not warned about here (a chain of
        builders may still fix them); :meth:`warn_risky` reports them when a run starts. Raises
        :class:`~stroma.errors.ConfigurationError` as the constructor does.
        """
        data: dict[str, Any] = {name: getattr(self, name) for name in self.model_fields_set}
        data.update(changes)
        token = _defer_warnings.set(True)
        try:
            return RunConfig(**data)
        finally:
            _defer_warnings.reset(token)

    def risky_settings(self) -> list[str]:
        """Legal settings that probably do not do what was meant, one sentence each."""
        risks: list[str] = []
        if self.budget.max_cost_usd is None and any(not p.on_failure for p in self.model_fallbacks):
            risks.append(
                "RunConfig.model_fallbacks has budget-threshold fallbacks but budget.max_cost_usd is "
                "not set, so they can never trigger"
            )
        for model in dict.fromkeys(policy.fallback_model for policy in self.model_fallbacks):
            if price_for(model) is None:
                risks.append(
                    f"RunConfig.model_fallbacks falls back to model {model!r}, which has no known price: its "
                    "usage will be counted as $0 and marked unpriced (a budget cannot limit it); register "
                    f"its price first with stroma.pricing.set_price({model!r}, input_per_1m=..., output_per_1m=...)"
                )
        return risks

    def warn_risky(self, *, stacklevel: int = 2) -> None:
        """Warn (``UserWarning``) about :meth:`risky_settings`, once per configuration object."""
        if self._risks_reported:
            return
        self._risks_reported = True
        for message in self.risky_settings():
            warnings.warn(message, UserWarning, stacklevel=stacklevel)

    @field_validator("run_id", mode="before")
    @classmethod
    def _check_run_id(cls, value: object) -> object:
        return check_run_id(value)

    @field_validator("workflow_name")
    @classmethod
    def _check_workflow(cls, value: str) -> str:
        if not _WORKFLOW_RE.match(value):
            raise ConfigurationError(
                f"RunConfig.workflow_name must be 1-128 characters of letters, digits, space and '_.:/-', got {value!r}"
            )
        return value

    @field_validator("node_timeouts", mode="before")
    @classmethod
    def _check_timeouts(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ConfigurationError(
                f"RunConfig.node_timeouts must be a dict of step id -> milliseconds, got {type(value).__name__}"
            )
        for step_id, timeout_ms in value.items():
            setting = f"RunConfig.node_timeouts[{step_id!r}]"
            _reject_bool(setting, timeout_ms)
            if not isinstance(timeout_ms, (int, float)) or not (math.isfinite(timeout_ms) and timeout_ms > 0):
                raise ConfigurationError(
                    f"{setting} must be a positive number of milliseconds, got {_shown(timeout_ms)}"
                )
        return value

    @field_validator("run_timeout_ms", mode="before")
    @classmethod
    def _check_run_timeout(cls, value: Any) -> Any:
        if value is None:
            return value
        _reject_bool("RunConfig.run_timeout_ms", value)
        if not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"RunConfig.run_timeout_ms must be > 0 milliseconds, got {_shown(value)}")
        return value

    @field_validator("policy_map", mode="before")
    @classmethod
    def _check_policy_map(cls, value: Any) -> PolicyMap:
        return check_policy_map(value, setting="RunConfig.policy_map")

    @field_validator("node_policies", mode="before")
    @classmethod
    def _check_node_policies(cls, value: Any) -> dict[str, PolicyMap]:
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                f"RunConfig.node_policies must be a dict of step id -> policy map, got {type(value).__name__}"
            )
        return {
            step_id: check_policy_map(policies, setting=f"RunConfig.node_policies[{step_id!r}]")
            for step_id, policies in value.items()
        }

    @field_validator("classifiers")
    @classmethod
    def _check_classifiers(cls, value: list[Classifier]) -> list[Classifier]:
        for index, classifier in enumerate(value):
            if not callable(classifier):
                raise ConfigurationError(
                    f"RunConfig.classifiers[{index}] must be callable (exc, context) -> FailureClass | None, "
                    f"got {type(classifier).__name__}"
                )
        return value

    @model_validator(mode="after")
    def _check_fallbacks(self) -> RunConfig:
        budget_based = [p for p in self.model_fallbacks if not p.on_failure]
        if budget_based and self.budget.max_cost_usd == 0:
            raise ConfigurationError(
                "RunConfig.model_fallbacks: a cost budget of 0 leaves nothing to fall back within; "
                "raise budget.max_cost_usd or remove the budget-threshold fallbacks"
            )
        return self

    def check_step_ids(self, step_ids: Iterable[str]) -> None:
        """Raise ``ConfigurationError`` if a per-step setting names a step the pipeline lacks.

        The message lists the unknown ids, the setting, and the known ids.
        """
        if not (self.node_policies or self.node_timeouts or self.resume_from is not None):
            return
        known = list(dict.fromkeys(step_ids))
        known_set = set(known)
        for setting, keys in (
            ("node_policies", self.node_policies),
            ("node_timeouts", self.node_timeouts),
        ):
            unknown = sorted(k for k in keys if k not in known_set)
            if unknown:
                raise ConfigurationError(
                    f"RunConfig.{setting} names unknown step id(s) {unknown}; known steps: {known}"
                )
        if self.resume_from is not None and self.resume_from not in known_set:
            raise ConfigurationError(
                f"RunConfig.resume_from names unknown step id {self.resume_from!r}; known steps: {known}"
            )
