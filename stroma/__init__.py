"""Stroma: reliability middleware for LLM and agent pipelines, OpenTelemetry-first.

Every step gets contract validation, retries with backoff, failure classification, cost and
token tracking, budgets, model fallback and checkpoints, and each decision is an OpenTelemetry
span or metric. The names below keep the established ``stroma`` API importable unchanged.
"""

from stroma._loop.step_io import current_model, report_usage
from stroma._version import __version__
from stroma.checkpoint import (
    AsyncCheckpointStore,
    AsyncInMemoryStore,
    AsyncSQLiteStore,
    CheckpointManager,
    CheckpointStore,
    InMemoryStore,
    RedisStore,
    SQLiteStore,
    SyncRedisStore,
)
from stroma.config import NodeHooks, RunConfig, StepHooks
from stroma.contracts import (
    BoundaryValidator,
    ContractRegistry,
    ContractViolation,
    NodeContract,
    StepContract,
    StepViolation,
)
from stroma.cost import (
    BudgetExceeded,
    CostTracker,
    ExecutionBudget,
    FallbackPolicy,
    ModelHint,
    NodeUsage,
    StepUsage,
    resolve_model,
)
from stroma.errors import CheckpointError, ConfigurationError, PipelineChangedError, StromaError
from stroma.failures import (
    Classifier,
    FailureClass,
    FailurePolicy,
    NodeContext,
    PolicyMap,
    RetryBudget,
    StepContext,
    classify,
    default_policy_map,
)
from stroma.middleware import ReliabilityContext, StromaStep, execute_step
from stroma.pricing import KNOWN_MODELS, estimate_cost_usd
from stroma.runner import StromaRunner, parallel, stroma_node, stroma_step
from stroma.telemetry.settings import TelemetrySettings
from stroma.trace import ExecutionResult, ExecutionTrace, RunStatus, TraceEvent

__all__ = [
    "KNOWN_MODELS",
    "AsyncCheckpointStore",
    "AsyncInMemoryStore",
    "AsyncSQLiteStore",
    "BoundaryValidator",
    "BudgetExceeded",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointStore",
    "Classifier",
    "ConfigurationError",
    "ContractRegistry",
    "ContractViolation",
    "CostTracker",
    "ExecutionBudget",
    "ExecutionResult",
    "ExecutionTrace",
    "FailureClass",
    "FailurePolicy",
    "FallbackPolicy",
    "InMemoryStore",
    "ModelHint",
    "NodeContext",
    "NodeContract",
    "NodeHooks",
    "NodeUsage",
    "PipelineChangedError",
    "PolicyMap",
    "RedisStore",
    "ReliabilityContext",
    "RetryBudget",
    "RunConfig",
    "RunStatus",
    "SQLiteStore",
    "StepContext",
    "StepContract",
    "StepHooks",
    "StepUsage",
    "StepViolation",
    "StromaError",
    "StromaRunner",
    "StromaStep",
    "SyncRedisStore",
    "TelemetrySettings",
    "TraceEvent",
    "__version__",
    "classify",
    "current_model",
    "default_policy_map",
    "estimate_cost_usd",
    "execute_step",
    "parallel",
    "report_usage",
    "resolve_model",
    "stroma_node",
    "stroma_step",
]
