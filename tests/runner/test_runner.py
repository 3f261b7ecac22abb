"""StromaRunner: construction, every builder, node decorators, run ids and per-run isolation."""

from __future__ import annotations

import asyncio
import warnings
from collections import Counter
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from runner_support import Analysis, Doc, Published, Summary, fast_policies, only, span_tree, support_pipeline

import stroma
from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    NodeContract,
    NodeHooks,
    RunConfig,
    RunStatus,
    current_model,
)
from stroma.checkpoint import AsyncInMemoryStore, CheckpointManager, InMemoryStore
from stroma.errors import CheckpointError, ConfigurationError
from stroma.runner import StromaRunner, parallel, stroma_node, stroma_step
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture


def new_runner(capture: TelemetryCapture | None = None, **config: Any) -> StromaRunner:
    if capture is not None:
        config.setdefault("telemetry", capture.settings)
    config.setdefault("policy_map", fast_policies())
    return StromaRunner.quick(**config)


# --- construction and decorators -----------------------------------------------------------------


def test_quick_builds_registry_memory_store_and_config() -> None:
    hooks = NodeHooks()
    budget = ExecutionBudget(max_cost_usd=1.0)
    runner = StromaRunner.quick(budget=budget, hooks=hooks, workflow_name="support")
    assert isinstance(runner.registry, ContractRegistry) and len(runner.registry) == 0
    assert isinstance(runner.checkpoint_manager, CheckpointManager)
    assert isinstance(runner.checkpoint_manager.store, AsyncInMemoryStore)
    assert runner.config.budget is budget and runner.config.hooks is hooks
    assert runner.config.workflow_name == "support"
    store = InMemoryStore()
    assert StromaRunner.quick(store=store).checkpoint_manager.store is store  # type: ignore[union-attr]


def test_constructor_keeps_established_signature_and_checks_types() -> None:
    registry = ContractRegistry()
    manager = CheckpointManager(InMemoryStore())
    config = RunConfig()
    runner = StromaRunner(registry, manager, config)
    assert (runner.registry, runner.checkpoint_manager, runner.config) == (registry, manager, config)
    assert StromaRunner(registry, None).config is not None
    with pytest.raises(TypeError, match="CheckpointManager"):
        StromaRunner(registry, InMemoryStore(), config)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RunConfig"):
        StromaRunner(registry, manager, {"run_id": "x"})  # type: ignore[arg-type]


def test_public_names_and_aliases_are_identical_objects() -> None:
    assert stroma_step is stroma_node
    assert stroma.StepHooks is stroma.NodeHooks
    assert stroma.StepContract is stroma.NodeContract
    assert stroma.StepViolation is stroma.ContractViolation
    assert stroma.StepUsage is stroma.NodeUsage
    assert stroma.StepContext is stroma.NodeContext
    from stroma import runner as runner_module

    for name in ("StromaRunner", "parallel", "stroma_node", "stroma_step", "RunConfig", "NodeHooks"):
        assert hasattr(runner_module, name)


def test_node_decorator_registers_contract_and_returns_the_function() -> None:
    runner = StromaRunner.quick()

    async def summarize(doc: Doc) -> dict[str, Any]:
        return {"text": doc.text, "words": 1}

    decorated = runner.node("summarize", input=Doc, output=Summary)(summarize)
    assert decorated is summarize
    assert summarize._stroma_node_id == "summarize"  # type: ignore[attr-defined]
    contract = runner.registry.get("summarize")
    assert contract == NodeContract("summarize", Doc, Summary)
    assert summarize._stroma_contract is contract  # type: ignore[attr-defined]


def test_stroma_node_marks_and_checks_the_contract_id() -> None:
    contract = NodeContract("publish", Analysis, Published)

    @stroma_node("publish", contract)
    def publish(state: Analysis) -> dict[str, Any]:
        return {"url": "u"}

    assert publish._stroma_node_id == "publish" and publish._stroma_contract is contract  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="contract of step 'publish'"):
        stroma_node("other", contract)
    with pytest.raises(ConfigurationError, match="NodeContract"):
        stroma_node("x", object())  # type: ignore[arg-type]


async def test_stroma_node_on_a_bound_method_and_a_node_from_another_registry() -> None:
    class Service:
        def __init__(self) -> None:
            self.prefix = "svc:"

        async def summarize(self, doc: Doc) -> dict[str, Any]:
            return {"text": self.prefix + doc.text, "words": 1}

    contract = NodeContract("summarize", Doc, Summary)
    node = stroma_node("summarize", contract)(Service().summarize)  # bound methods take no attributes
    runner = StromaRunner(ContractRegistry(), None)
    result = await runner.run([node], Doc(text="a"))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Summary(text="svc:a", words=1)
    assert runner.registry.get("summarize") == contract  # registered on first use


async def test_nodes_without_id_or_contract_and_duplicates_fail_before_running() -> None:
    runner = StromaRunner.quick()
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)

    async def plain(doc: Doc) -> dict[str, Any]:
        return {}

    with pytest.raises(ConfigurationError, match=r"node 1 \(.*plain\) has no step id"):
        await runner.run([nodes[0], plain], Doc(text="a"))
    with pytest.raises(ConfigurationError, match="appears twice"):
        await runner.run([nodes[0], nodes[0]], Doc(text="a"))
    with pytest.raises(ConfigurationError, match="appears twice"):
        await runner.run([nodes[0], parallel(nodes[0], nodes[2])], Doc(text="a"))
    orphan = stroma_node("orphan", NodeContract("orphan", Doc, Doc))(plain)
    del orphan._stroma_contract  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="step 'orphan' has no contract"):
        await runner.run([orphan], Doc(text="a"))
    assert not calls


async def test_contract_found_in_the_registry_when_the_node_carries_none() -> None:
    registry = ContractRegistry([NodeContract("echo", Doc, Doc)])

    async def echo(doc: Doc) -> dict[str, Any]:
        return {"text": doc.text + "!"}

    echo._stroma_node_id = "echo"  # type: ignore[attr-defined]
    result = await StromaRunner(registry, None).run([echo], {"text": "hi"})
    assert result.final_state == Doc(text="hi!")


async def test_empty_pipeline_returns_the_initial_state() -> None:
    result = await StromaRunner.quick().run([], Doc(text="a"))
    assert result.status is RunStatus.COMPLETED and result.final_state == Doc(text="a")


# --- a run: spans and results --------------------------------------------------------------------


async def test_run_span_is_the_parent_of_every_step_span(capture: TelemetryCapture) -> None:
    runner = new_runner(capture, workflow_name="support", budget=ExecutionBudget(max_cost_usd=1.0))
    calls: Counter[str] = Counter()
    result = await runner.run(support_pipeline(runner, calls), Doc(text="the quick brown fox"))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Published(url="https://example.test/brown-fox-quick/0.4")
    assert span_tree(capture) == [
        (
            "run support",
            [
                ("step summarize", [("attempt summarize", [])]),
                ("step tag", [("attempt tag", [])]),
                ("step score", [("attempt score", [])]),
                ("step publish", [("attempt publish", [])]),
            ],
        )
    ]
    run = only(capture.spans_named("run"))
    attrs = dict(run.attributes or {})
    assert run.kind is SpanKind.INTERNAL and run.status.status_code is not StatusCode.ERROR
    assert attrs[n.GEN_AI_OPERATION_NAME] == "invoke_workflow"
    assert attrs[n.GEN_AI_WORKFLOW_NAME] == "support"
    assert attrs[n.RUN_ID] == result.run_id
    assert attrs[n.RUN_STATUS] == "completed"
    assert attrs[n.RUN_USAGE_INPUT_TOKENS] == 300 and attrs[n.RUN_USAGE_OUTPUT_TOKENS] == 60
    assert attrs[n.RUN_COST_AMOUNT] == pytest.approx(result.total_cost_usd)
    assert result.total_cost_usd > 0
    assert attrs[n.BUDGET_COST_LIMIT] == 1.0
    assert attrs[n.BUDGET_COST_UTILIZATION] == pytest.approx(result.total_cost_usd / 1.0)
    steps = capture.spans_named("step")
    assert {dict(s.attributes or {})[n.RUN_ID] for s in steps} == {result.run_id}
    assert sum(dict(s.attributes or {})[n.STEP_COST_AMOUNT] for s in steps) == pytest.approx(result.total_cost_usd)
    assert result.trace_id == format(run.context.trace_id, "032x")
    assert dict(calls) == {"summarize": 1, "tag": 1, "score": 1, "publish": 1}
    assert set(result.cost_by_step) == {"summarize", "tag", "score"}


def test_run_sync_runs_on_a_new_loop_and_refuses_a_running_one() -> None:
    runner = StromaRunner.quick()
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    result = runner.run_sync(nodes, Doc(text="a b"))
    assert result.status is RunStatus.COMPLETED

    async def inside() -> None:
        with pytest.raises(RuntimeError, match="running event loop"):
            runner.run_sync(nodes, Doc(text="a"))

    asyncio.run(inside())


async def test_each_run_gets_a_fresh_run_id_and_nothing_leaks() -> None:
    runner = new_runner()
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    first = await runner.run(nodes, Doc(text="one two"))
    second = await runner.run(nodes, Doc(text="three"))
    assert first.run_id != second.run_id
    assert first.run_id != runner.config.run_id and not runner.config.explicit_run_id
    assert {e.run_id for e in second.trace} == {second.run_id}
    assert len(second.trace) == len(first.trace) == 4
    assert second.total_tokens == first.total_tokens == 360
    assert second.cost_by_step == pytest.approx(first.cost_by_step)
    assert calls["summarize"] == 2


async def test_explicit_run_id_from_config_or_argument() -> None:
    runner = new_runner(run_id="order-17")
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    assert (await runner.run(nodes, Doc(text="a"))).run_id == "order-17"
    assert (await runner.run(nodes, Doc(text="a"), run_id="order:18/b")).run_id == "order:18/b"
    with pytest.raises(ConfigurationError, match=r"run\(run_id=...\)"):
        await runner.run(nodes, Doc(text="a"), run_id="")


async def test_context_is_copied_per_run() -> None:
    """Steps with a second parameter share the run's context dict; it never leaks between runs."""
    shared = {"tenant": "acme", "seen": 0}
    runner = new_runner().with_context(shared)
    observed: list[dict[str, Any]] = []

    @runner.node("first", input=Doc, output=Doc)
    def first(doc: Doc, context: dict[str, Any]) -> dict[str, Any]:
        context["seen"] += 1
        context["by_first"] = doc.text
        return {"text": doc.text}

    @runner.node("second", input=Doc, output=Doc)
    async def second(doc: Doc, context: dict[str, Any]) -> dict[str, Any]:
        observed.append(dict(context))
        return {"text": context["tenant"] + ":" + doc.text}

    one = await runner.run([first, second], Doc(text="x"))
    two = await runner.run([first, second], Doc(text="y"))
    assert one.final_state == Doc(text="acme:x") and two.final_state == Doc(text="acme:y")
    assert observed == [
        {"tenant": "acme", "seen": 1, "by_first": "x"},
        {"tenant": "acme", "seen": 1, "by_first": "y"},
    ]
    assert shared == {"tenant": "acme", "seen": 0}
    assert runner.config.context == {"tenant": "acme", "seen": 0}


# --- builders ------------------------------------------------------------------------------------


def test_builders_chain_validate_and_keep_the_run_id_a_placeholder() -> None:
    runner = StromaRunner.quick()
    placeholder = runner.config.run_id
    returned = (
        runner.with_budget(tokens=1000, cost_usd=0.5, latency_ms=60_000)
        .with_model_fallback("gpt-4o", to="gpt-4o-mini", at_budget_pct=0.5)
        .with_classifiers([lambda exc, ctx: None])
        .with_hooks(NodeHooks(on_node_start=lambda *a: None))
        .with_context({"k": 1})
        .with_policy_map(fast_policies())
        .with_node_policies({"summarize": {FailureClass.RECOVERABLE: FailurePolicy(max_retries=5)}})
        .with_node_timeouts({"summarize": 250})
    )
    assert returned is runner
    config = runner.config
    assert config.budget == ExecutionBudget(max_tokens_total=1000, max_cost_usd=0.5, max_latency_ms=60_000)
    assert [(p.preferred_model, p.fallback_model, p.at_budget_pct) for p in config.model_fallbacks] == [
        ("gpt-4o", "gpt-4o-mini", 0.5)
    ]
    assert len(config.classifiers) == 1 and config.hooks.on_node_start is not None
    assert config.context == {"k": 1} and config.node_timeouts == {"summarize": 250}
    assert config.node_policies["summarize"][FailureClass.RECOVERABLE].max_retries == 5
    assert not config.explicit_run_id and config.run_id != placeholder  # still a placeholder


@pytest.mark.parametrize(
    ("build", "setting"),
    [
        (lambda r: r.with_node_timeouts({"a": 0}), "node_timeouts"),
        (lambda r: r.with_node_timeouts({"a": True}), "node_timeouts"),
        (lambda r: r.with_budget(cost_usd=-1.0), "max_cost_usd"),
        (lambda r: r.with_model_fallback("m", to="m"), "fallback_model"),
        (lambda r: r.with_model_fallback("m", to="n", at_budget_pct=1.5), "at_budget_pct"),
        (lambda r: r.with_budget(cost_usd=0.0).with_model_fallback("m", to="n"), "cost budget of 0"),
        (lambda r: r.with_classifiers(["not callable"]), "classifiers"),
        (lambda r: r.with_node_policies({"a": {"recoverable": 3}}), "node_policies"),
    ],
)
def test_builders_reject_nonsense_naming_the_setting(build: Any, setting: str) -> None:
    runner = StromaRunner.quick()
    before = runner.config
    with pytest.raises(ValueError, match=setting):
        build(runner)
    if "cost budget of 0" not in setting:
        assert runner.config is before


async def test_fallback_without_cost_budget_warns_once_when_the_run_starts() -> None:
    runner = StromaRunner.quick().with_model_fallback("gpt-4o", to="gpt-4o-mini")  # no warning yet
    with pytest.warns(UserWarning, match="can never trigger"):
        await runner.run([], Doc(text="a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await runner.run([], Doc(text="a"))  # once per configuration
        runner.with_model_fallback("gpt-4o", to="gpt-4o-mini").with_budget(cost_usd=1.0)
        await runner.run([], Doc(text="a"))  # fixed by a later builder: no warning


async def test_unknown_step_ids_are_reported_when_the_run_starts() -> None:
    runner = new_runner().with_node_timeouts({"sumarize": 100})
    calls: Counter[str] = Counter()
    nodes = support_pipeline(runner, calls)
    with pytest.raises(ConfigurationError) as info:
        await runner.run(nodes, Doc(text="a"))
    message = str(info.value)
    assert "node_timeouts" in message and "'sumarize'" in message
    assert "['summarize', 'tag', 'score', 'publish']" in message
    runner.with_node_timeouts({}).with_node_policies({"scor": fast_policies()})
    with pytest.raises(ConfigurationError, match=r"node_policies names unknown step id\(s\) \['scor'\]"):
        await runner.run(nodes, Doc(text="a"))
    assert not calls


async def test_with_budget_stops_partial_and_keeps_paid_output(capture: TelemetryCapture) -> None:
    runner = new_runner(capture).with_budget(tokens=100)
    calls: Counter[str] = Counter()
    result = await runner.run(support_pipeline(runner, calls), Doc(text="a b"))
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "summarize" and result.budget_exceeded is not None
    assert result.final_state == Summary(text="A B", words=2)  # paid for, kept
    assert calls == Counter({"summarize": 1})
    run = only(capture.spans_named("run"))
    assert dict(run.attributes or {})[n.RUN_STATUS] == "partial"
    assert [e.name for e in run.events] == [n.EVENT_BUDGET_EXCEEDED]


async def test_with_model_fallback_switches_model_past_the_threshold(capture: TelemetryCapture) -> None:
    runner = new_runner(capture).with_budget(cost_usd=0.0002)
    runner.with_model_fallback("gpt-4o", to="gpt-4o-mini", at_budget_pct=0.5)
    used: list[str | None] = []

    @runner.node("a", input=Doc, output=Doc)
    async def a(doc: Doc, context: dict[str, Any]) -> Any:
        used.append(current_model("gpt-4o"))
        return {"text": doc.text}, 10, 10, current_model("gpt-4o")

    @runner.node("b", input=Doc, output=Doc)
    async def b(doc: Doc, context: dict[str, Any]) -> Any:
        used.append(context.get("_stroma_model", "gpt-4o"))
        return {"text": doc.text}, 10, 10, "gpt-4o"

    result = await runner.run([a, b], Doc(text="x"))
    assert result.status is RunStatus.COMPLETED
    assert used == ["gpt-4o", "gpt-4o-mini"]  # a spent $0.000125: over 50 % of $0.0002
    step_b = only(capture.spans_named("step b"))
    assert dict(step_b.attributes or {})[n.FALLBACK_TO_MODEL] == "gpt-4o-mini"


async def test_with_classifiers_and_policies_decide_the_attempts() -> None:
    attempts: Counter[str] = Counter()
    runner = new_runner()

    @runner.node("flaky", input=Doc, output=Doc)
    async def flaky(doc: Doc) -> Any:
        attempts["flaky"] += 1
        raise ValueError("bad answer")

    # ValueError is AMBIGUOUS: 1 retry under fast_policies
    assert (await runner.run([flaky], Doc(text="a"))).status is RunStatus.PARTIAL
    assert attempts["flaky"] == 2
    runner.with_classifiers([lambda exc, ctx: FailureClass.TERMINAL if isinstance(exc, ValueError) else None])
    result = await runner.run([flaky], Doc(text="a"))
    assert result.status is RunStatus.FAILED and attempts["flaky"] == 3
    assert result.failed_step == "flaky" and "ValueError" in (result.error or "")
    runner.with_classifiers([]).with_node_policies(
        {"flaky": {FailureClass.AMBIGUOUS: FailurePolicy(max_retries=3, backoff_seconds=0.001)}}
    )
    await runner.run([flaky], Doc(text="a"))
    assert attempts["flaky"] == 7
    runner.with_node_policies({}).with_policy_map(
        {FailureClass.AMBIGUOUS: FailurePolicy(max_retries=0, backoff_seconds=0.0)}
    )
    await runner.run([flaky], Doc(text="a"))
    assert attempts["flaky"] == 8


# --- with_redis, against the real redis-server of the checkpoint tests -----------------------------


@pytest.mark.redis
async def test_with_redis_checkpoints_resume_and_expire(redis_url: str) -> None:
    import uuid

    import redis

    from stroma.checkpoint import RedisStore

    prefix = f"stroma-runner-test:{uuid.uuid4().hex}:"
    runner = new_runner().with_redis(redis_url, ttl_seconds=90, key_prefix=prefix)
    store = runner.checkpoint_manager.store  # type: ignore[union-attr]
    assert isinstance(store, RedisStore) and store.ttl_seconds == 90
    calls: Counter[str] = Counter()
    crash = {"n": 1}

    def publish(state: Any) -> Any:
        if crash["n"]:
            crash["n"] -= 1
            raise KeyboardInterrupt
        return {"url": "https://example.test/ok"}

    nodes = support_pipeline(runner, calls, publish=publish)
    run_id = "tenant:a/run:1"  # separators in run ids never collide across runs
    try:
        with pytest.raises(KeyboardInterrupt):
            await runner.run(nodes, Doc(text="a b"), run_id=run_id)
        client = redis.Redis.from_url(redis_url)
        try:
            key = store.run_key(run_id)
            assert 0 < client.ttl(key) <= 90
            assert client.exists(prefix + "tenant:a") == 0
        finally:
            client.close()
        result = await runner.run(nodes, Doc(text="a b"), run_id=run_id)
        assert result.status is RunStatus.COMPLETED
        assert calls == Counter({"summarize": 1, "tag": 1, "score": 1, "publish": 2})
    finally:
        await store.aclose()


async def test_with_redis_down_fails_with_a_clear_error_before_any_step() -> None:
    import socket

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dead = f"redis://:s3cret@127.0.0.1:{port}/0"
    runner = new_runner().with_redis(dead, timeout_seconds=0.5)
    calls: Counter[str] = Counter()
    with pytest.raises(CheckpointError) as info:
        await runner.run(support_pipeline(runner, calls), Doc(text="a"))
    message = str(info.value)
    assert "Is Redis running" in message and "s3cret" not in message
    assert not calls
    await runner.checkpoint_manager.store.aclose()  # type: ignore[union-attr]
