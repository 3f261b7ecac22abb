"""RunConfig and NodeHooks: every field, validation at construction, replace(), run ids."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    ConfigurationError,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    NodeHooks,
    RunConfig,
    StepHooks,
    TelemetrySettings,
    default_policy_map,
)
from stroma.checkpoint import InMemoryStore
from stroma.config import check_run_id, new_run_id


def test_defaults_cover_every_field_of_the_established_api() -> None:
    config = RunConfig()
    assert len(config.run_id) == 32 and not config.explicit_run_id
    assert config.budget == ExecutionBudget.unlimited()
    assert config.policy_map == default_policy_map()
    assert config.node_policies == {} and config.classifiers == [] and config.context == {}
    assert config.node_timeouts == {} and config.resume_from is None and config.model_fallbacks == []
    assert config.hooks == NodeHooks()
    assert (config.workflow_name, config.run_timeout_ms, config.telemetry) == ("pipeline", None, None)
    assert RunConfig().run_id != config.run_id


def test_every_field_can_be_set() -> None:
    hooks = NodeHooks(on_node_start=lambda *a: None)
    settings = TelemetrySettings(enabled=False)
    config = RunConfig(
        run_id="r-1",
        budget=ExecutionBudget(max_cost_usd=1.0),
        policy_map={FailureClass.RECOVERABLE: FailurePolicy(max_retries=1)},
        node_policies={"a": {FailureClass.TERMINAL: FailurePolicy(max_retries=0)}},
        hooks=hooks,
        classifiers=[lambda exc, ctx: None],
        context={"k": "v"},
        node_timeouts={"a": 1500},
        resume_from="a",
        model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini")],
        workflow_name="support triage",
        run_timeout_ms=30_000,
        telemetry=settings,
    )
    assert config.explicit_run_id and config.run_id == "r-1"
    assert config.hooks is hooks and config.telemetry is settings
    assert config.node_timeouts == {"a": 1500} and config.run_timeout_ms == 30_000
    assert StepHooks is NodeHooks


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({"run_id": ""}, "RunConfig.run_id"),
        ({"run_id": "a\nb"}, "RunConfig.run_id"),
        ({"run_id": "x" * 257}, "RunConfig.run_id"),
        ({"node_timeouts": {"a": 0}}, "RunConfig.node_timeouts['a']"),
        ({"node_timeouts": {"a": -5}}, "RunConfig.node_timeouts['a']"),
        ({"node_timeouts": {"a": True}}, "RunConfig.node_timeouts['a']"),
        ({"node_timeouts": {"a": float("nan")}}, "RunConfig.node_timeouts['a']"),
        ({"node_timeouts": [("a", 1)]}, "RunConfig.node_timeouts"),
        ({"run_timeout_ms": 0}, "RunConfig.run_timeout_ms"),
        ({"run_timeout_ms": True}, "RunConfig.run_timeout_ms"),
        ({"workflow_name": ""}, "RunConfig.workflow_name"),
        ({"workflow_name": "a\tb"}, "RunConfig.workflow_name"),
        ({"policy_map": {"fatal": FailurePolicy()}}, "RunConfig.policy_map has an unknown failure class"),
        ({"policy_map": [FailureClass.RECOVERABLE]}, "RunConfig.policy_map must be a mapping"),
        ({"policy_map": {FailureClass.RECOVERABLE: 3}}, "RunConfig.policy_map[RECOVERABLE] must be a FailurePolicy"),
        ({"node_policies": {"a": {FailureClass.TERMINAL: "x"}}}, "RunConfig.node_policies['a'][TERMINAL]"),
        ({"node_policies": [("a", {})]}, "RunConfig.node_policies must be a dict"),
        ({"classifiers": [42]}, "RunConfig.classifiers.0"),
        (
            {"budget": ExecutionBudget(max_cost_usd=0.0), "model_fallbacks": [FallbackPolicy("a", "b")]},
            "cost budget of 0",
        ),
    ],
)
def test_nonsense_raises_a_value_error_naming_the_setting(settings: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RunConfig(**settings)
    assert isinstance(info.value, ValueError)
    assert names in str(info.value)


def test_negative_retries_are_rejected_by_the_policy_itself() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        FailurePolicy(max_retries=-1)


def test_a_fallback_that_can_never_trigger_warns_once() -> None:
    with pytest.warns(UserWarning, match="can never trigger"):
        config = RunConfig(model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.warn_risky()  # already reported for this configuration
        RunConfig(model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini", on_failure=[FailureClass.RECOVERABLE])])


def test_replace_validates_and_keeps_only_what_the_caller_set() -> None:
    generated = RunConfig(workflow_name="w")
    copy = generated.replace(node_timeouts={"a": 10})
    assert copy.workflow_name == "w" and copy.node_timeouts == {"a": 10}
    assert not copy.explicit_run_id and copy.run_id != generated.run_id
    explicit = RunConfig(run_id="mine").replace(workflow_name="x")
    assert explicit.explicit_run_id and explicit.run_id == "mine"
    with pytest.raises(ConfigurationError, match="node_timeouts"):
        generated.replace(node_timeouts={"a": -1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deferred: a builder chain may still add the budget
        risky = generated.replace(model_fallbacks=[FallbackPolicy("gpt-4o", "gpt-4o-mini")])
    assert risky.risky_settings()
    with pytest.warns(UserWarning):
        risky.warn_risky()


def test_model_copy_marks_an_updated_run_id_explicit() -> None:
    assert RunConfig().model_copy(update={"run_id": "x"}).explicit_run_id


def test_check_step_ids_lists_unknown_and_known_ids() -> None:
    config = RunConfig(
        node_timeouts={"fetch": 10, "sumarize": 20},
        node_policies={"publsh": default_policy_map()},
        resume_from="fetch",
    )
    with pytest.raises(ConfigurationError) as info:
        config.check_step_ids(["fetch", "summarize", "publish"])
    assert str(info.value) == (
        "RunConfig.node_policies names unknown step id(s) ['publsh']; known steps: ['fetch', 'summarize', 'publish']"
    )
    config = config.replace(node_policies={})
    with pytest.raises(ConfigurationError, match=r"node_timeouts names unknown step id\(s\) \['sumarize'\]"):
        config.check_step_ids(["fetch", "summarize"])
    with pytest.raises(ConfigurationError, match="resume_from names unknown step id 'fetch'"):
        RunConfig(resume_from="fetch").check_step_ids(["a"])
    config.replace(node_timeouts={"fetch": 10}).check_step_ids(["fetch"])


def test_run_id_helpers() -> None:
    assert new_run_id() != new_run_id()
    assert check_run_id("order:1/b c") == "order:1/b c"
    with pytest.raises(ConfigurationError, match=r"my\.setting"):
        check_run_id("", setting="my.setting")
    with pytest.raises(ConfigurationError):
        check_run_id(5)


class _Saved(BaseModel):
    text: str = "x"


@pytest.mark.parametrize(
    ("run_id", "valid"),
    [
        ("r-1", True),
        ("tenant:a/run 7", True),
        ("é" * 256, True),
        ("", False),
        ("a\nb", False),
        ("a\x7fb", False),
        ("x" * 257, False),
    ],
)
def test_one_run_id_rule_for_configuration_and_checkpoint_stores(run_id: str, valid: bool) -> None:
    # RunConfig, run(run_id=...) and every checkpoint store apply the same rule (stroma._ids)
    store = InMemoryStore()
    if valid:
        assert RunConfig(run_id=run_id).run_id == run_id
        assert check_run_id(run_id, setting="run(run_id=...)") == run_id
        store.save(run_id, "s", _Saved())
        assert store.load(run_id, "s") == _Saved()
    else:
        with pytest.raises(ConfigurationError, match=r"RunConfig\.run_id must"):
            RunConfig(run_id=run_id)
        with pytest.raises(ConfigurationError, match=r"run\(run_id=\.\.\.\) must"):
            check_run_id(run_id, setting="run(run_id=...)")
        with pytest.raises(ValueError, match="run_id must"):
            store.save(run_id, "s", _Saved())


def test_a_run_id_that_is_not_a_string_is_refused_everywhere() -> None:
    with pytest.raises(ConfigurationError, match="must be a string, got int"):
        RunConfig(run_id=7)
    with pytest.raises(TypeError, match="run_id must be a str"):
        InMemoryStore().save(7, "s", _Saved())  # type: ignore[arg-type]
