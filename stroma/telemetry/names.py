"""Every telemetry name Stroma emits, in one place.

The telemetry schema is public API: dashboards, alert rules and users' queries depend on these
strings, so renaming one is a breaking change. Standard names come from
``opentelemetry.semconv``; ours live under the ``stroma.`` prefix (design §4 and §6).

How the collector's Prometheus exporter stores a metric: dots become underscores, a unit in
braces is dropped, ``s`` becomes ``_seconds`` and monotonic sums get ``_total``; so
``stroma.cost`` (unit ``{USD}``) is queried as ``stroma_cost_total`` and ``stroma.step.duration``
as ``stroma_step_duration_seconds_bucket``. The end-to-end tests prove every such name exists.
"""

from __future__ import annotations

from typing import Final

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as _gen_ai
from opentelemetry.semconv.attributes import error_attributes as _error

# --- span names (design §4): "<kind> <id>" ---------------------------------------------------
SPAN_RUN: Final = "run"
SPAN_STEP: Final = "step"
SPAN_ATTEMPT: Final = "attempt"

# --- standard attribute names (semantic conventions) ----------------------------------------
ERROR_TYPE: Final = _error.ERROR_TYPE
GEN_AI_OPERATION_NAME: Final = _gen_ai.GEN_AI_OPERATION_NAME
# The GenAI names live only in the incubating module and may still move; pin them here.
GEN_AI_WORKFLOW_NAME: Final = _gen_ai.GEN_AI_WORKFLOW_NAME
OPERATION_INVOKE_WORKFLOW: Final = _gen_ai.GenAiOperationNameValues.INVOKE_WORKFLOW.value

# --- our attribute names ---------------------------------------------------------------------
RUN_ID: Final = "stroma.run.id"
RUN_STATUS: Final = "stroma.run.status"
RUN_RESUMED_FROM: Final = "stroma.run.resumed_from"
RUN_COST_AMOUNT: Final = "stroma.run.cost.amount"
RUN_USAGE_INPUT_TOKENS: Final = "stroma.run.usage.input_tokens"
RUN_USAGE_OUTPUT_TOKENS: Final = "stroma.run.usage.output_tokens"
RUN_STEP_COUNT: Final = "stroma.run.step.count"

STEP_ID: Final = "stroma.step.id"
STEP_ATTEMPT_NUMBER: Final = "stroma.step.attempt.number"
STEP_ATTEMPT_COUNT: Final = "stroma.step.attempt.count"
STEP_RETRY_DELAY: Final = "stroma.step.retry.delay"
STEP_COST_AMOUNT: Final = "stroma.step.cost.amount"
STEP_USAGE_INPUT_TOKENS: Final = "stroma.step.usage.input_tokens"
STEP_USAGE_OUTPUT_TOKENS: Final = "stroma.step.usage.output_tokens"
STEP_INPUT: Final = "stroma.step.input"
STEP_OUTPUT: Final = "stroma.step.output"
STEP_SKIPPED: Final = "stroma.step.skipped"

FAILURE_CLASS: Final = "stroma.failure.class"
USAGE_INPUT_TOKENS: Final = "stroma.usage.input_tokens"
USAGE_OUTPUT_TOKENS: Final = "stroma.usage.output_tokens"
COST_AMOUNT: Final = "stroma.cost.amount"
COST_CURRENCY: Final = "stroma.cost.currency"
COST_UNPRICED: Final = "stroma.cost.unpriced"
CURRENCY_USD: Final = "USD"
MODEL: Final = "stroma.model"
CONTRACT_OUTCOME: Final = "stroma.contract.outcome"

FALLBACK_FROM_MODEL: Final = "stroma.fallback.from_model"
FALLBACK_TO_MODEL: Final = "stroma.fallback.to_model"
FALLBACK_REASON: Final = "stroma.fallback.reason"
FALLBACK_THRESHOLD: Final = "stroma.fallback.threshold"

BUDGET_COST_LIMIT: Final = "stroma.budget.cost.limit"
BUDGET_COST_USAGE: Final = "stroma.budget.cost.usage"
BUDGET_COST_UTILIZATION: Final = "stroma.budget.cost.utilization"
BUDGET_TOKEN_LIMIT: Final = "stroma.budget.token.limit"
BUDGET_TOKEN_USAGE: Final = "stroma.budget.token.usage"
BUDGET_DURATION_LIMIT: Final = "stroma.budget.duration.limit"
BUDGET_DURATION_USAGE: Final = "stroma.budget.duration.usage"
BUDGET_DIMENSION: Final = "stroma.budget.dimension"
BUDGET_LIMIT: Final = "stroma.budget.limit"
BUDGET_USAGE: Final = "stroma.budget.usage"
BUDGET_UTILIZATION: Final = "stroma.budget.utilization"  # usage / limit, on stroma.budget.warning
BUDGET_WARN_AT_PCT: Final = "stroma.budget.warn_at_pct"  # the threshold that was crossed

CHECKPOINT_STORE: Final = "stroma.checkpoint.store"

# metric-only attribute names (labels: dots become underscores in Prometheus)
WORKFLOW: Final = "stroma.workflow.name"
STEP_OUTCOME: Final = "stroma.step.outcome"

# --- attribute values ------------------------------------------------------------------------
CONTRACT_VALID: Final = "valid"
CONTRACT_INVALID: Final = "invalid"
FALLBACK_REASON_BUDGET: Final = "budget_threshold"
FALLBACK_REASON_ERROR: Final = "error"
OUTCOME_OK: Final = "ok"
OUTCOME_ERROR: Final = "error"
CONTRACT_DIRECTION: Final = "stroma.contract.direction"

# --- span events -----------------------------------------------------------------------------
EVENT_BUDGET_EXCEEDED: Final = "stroma.budget.exceeded"
# The first time in a run that a budget dimension's use reaches ExecutionBudget.warn_at_pct.
EVENT_BUDGET_WARNING: Final = "stroma.budget.warning"
EVENT_FALLBACK: Final = "stroma.fallback"
EVENT_CONTRACT_VIOLATION: Final = "stroma.contract.violation"
EVENT_CHECKPOINT_SAVED: Final = "stroma.checkpoint.saved"
EVENT_CHECKPOINT_RESTORED: Final = "stroma.checkpoint.restored"
# one model call (leaf GenAI inference span) counted for an attempt; see stroma.telemetry.genai_usage
EVENT_MODEL_CALL: Final = "stroma.model_call"
MODEL_CALL_SPAN_ID: Final = "stroma.model_call.span_id"
MODEL_CALL_VENDOR_COST: Final = "stroma.model_call.vendor_cost"
# where an attempt's charged usage came from, when it had model-call spans: "spans" or "explicit"
USAGE_SOURCE: Final = "stroma.usage.source"
USAGE_SOURCE_SPANS: Final = "spans"
USAGE_SOURCE_EXPLICIT: Final = "explicit"

# --- metric instruments (design §6): name, unit --------------------------------------------
METRIC_COST: Final = "stroma.cost"  # counter, {USD}; workflow, step, model
METRIC_INPUT_TOKENS: Final = "stroma.usage.input_tokens"  # counter, {token}; workflow, step, model
METRIC_OUTPUT_TOKENS: Final = "stroma.usage.output_tokens"  # counter, {token}; workflow, step, model
METRIC_STEP_DURATION: Final = "stroma.step.duration"  # histogram, s; workflow, step, outcome
METRIC_STEP_RETRIES: Final = "stroma.step.retries"  # counter, {retry}; workflow, step, failure class, error.type
METRIC_FALLBACKS: Final = "stroma.fallbacks"  # counter, {fallback}; workflow, step, reason, from, to
METRIC_BUDGET_BREACHES: Final = "stroma.budget.breaches"  # counter, {breach}; workflow, step, dimension
METRIC_BUDGET_WARNINGS: Final = "stroma.budget.warnings"  # counter, {warning}; workflow, step, dimension
METRIC_BUDGET_UTILIZATION: Final = "stroma.budget.cost.utilization"  # histogram, 1; workflow
METRIC_UNPRICED: Final = "stroma.cost.unpriced"  # counter, {attempt}; workflow, step, model
METRIC_CONTRACT_VIOLATIONS: Final = "stroma.contract.violations"  # counter; workflow, step, direction
METRIC_RUN_DURATION: Final = "stroma.run.duration"  # histogram, s; workflow, status
METRIC_RUNS: Final = "stroma.runs"  # counter, {run}; workflow, status
METRIC_TELEMETRY_ERRORS: Final = "stroma.telemetry.errors"  # counter; component
METRIC_TELEMETRY_LOST: Final = "stroma.telemetry.lost"  # counter; signal, reason (private providers)
TELEMETRY_SIGNAL: Final = "stroma.telemetry.signal"  # label of stroma.telemetry.lost: spans / metrics
TELEMETRY_REASON: Final = "stroma.telemetry.reason"  # queue_full / export_failed / exit_timeout

UTILIZATION_BUCKETS: Final = (0.25, 0.5, 0.8, 0.9, 1.0, 1.25, 2.0)
DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# The names above as Prometheus stores them (collector prometheus exporter, default
# translation). Dashboards and alert rules use these; tests/e2e prove each one exists.
PROM_COST: Final = "stroma_cost_total"
PROM_INPUT_TOKENS: Final = "stroma_usage_input_tokens_total"
PROM_OUTPUT_TOKENS: Final = "stroma_usage_output_tokens_total"
PROM_STEP_DURATION_BUCKET: Final = "stroma_step_duration_seconds_bucket"
PROM_STEP_RETRIES: Final = "stroma_step_retries_total"
PROM_FALLBACKS: Final = "stroma_fallbacks_total"
PROM_BUDGET_BREACHES: Final = "stroma_budget_breaches_total"
PROM_BUDGET_WARNINGS: Final = "stroma_budget_warnings_total"
PROM_BUDGET_UTILIZATION_BUCKET: Final = "stroma_budget_cost_utilization_bucket"
PROM_UNPRICED: Final = "stroma_cost_unpriced_total"
PROM_CONTRACT_VIOLATIONS: Final = "stroma_contract_violations_total"
PROM_RUN_DURATION_BUCKET: Final = "stroma_run_duration_seconds_bucket"
PROM_RUNS: Final = "stroma_runs_total"
PROM_TELEMETRY_LOST: Final = "stroma_telemetry_lost_total"
