"""The ``stroma`` command end to end, as a subprocess: demo, runs, show, prices, stack, errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from cli_support import Cli, DemoSession

STEPS = ["triage", "retrieve", "draft", "check", "revise", "summarise"]
ANSI = re.compile(r"\x1b\[")


def assert_ok(result: object) -> None:
    assert getattr(result, "returncode", None) == 0, str(result)


# --- demo ----------------------------------------------------------------------------------------


def test_the_demo_completes_and_prints_the_tree(demo_session: DemoSession) -> None:
    out = demo_session.result.stdout
    assert demo_session.result.stderr == ""
    first = demo_session.run_ids[0]
    assert first.startswith("tkt-4812-")
    # Progress: a line per attempt, the retried rate limit and the fallback as they happen.
    assert "RateLimitError (recoverable)" in out
    assert "claude-haiku-4-5 (fallback: budget threshold)" in out
    assert out.count("= COMPLETED") == 2
    # The tree of the first run.
    assert f"run {first}  (support-ticket)" in out
    for step in STEPS:
        assert re.search(rf"[├└]─ ✓ {step}\b", out), step
    assert "✗ attempt 1" in out and "recoverable: demo_provider.RateLimitError" in out
    assert "fallback claude-sonnet-4-5 → claude-haiku-4-5 (budget >= 60%)" in out
    assert re.search(r"budget\s+cost \$0\.\d{4} of \$0\.12 \(\d+%\)", out)
    # Not a terminal: plain text.
    assert not ANSI.search(out)
    # Where to look next.
    assert "stroma runs" in out and f"stroma show {first}" in out


def test_runs_lists_what_the_demo_stored(demo_session: DemoSession) -> None:
    result = demo_session.cli("runs")
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["RUN", "ID", "WORKFLOW", "STATUS", "STARTED", "(UTC)", "DURATION", "COST", "TOKENS"]
    # Newest first.
    assert lines[1].startswith(demo_session.run_ids[1]) and lines[2].startswith(demo_session.run_ids[0])
    assert all("support-ticket" in line and "COMPLETED" in line for line in lines[1:3])
    assert re.search(r"\$0\.\d{4}\s+[\d,]+$", lines[1])


def test_runs_json(demo_session: DemoSession) -> None:
    result = demo_session.cli("runs", "--json", "--limit", "1")
    assert_ok(result)
    [run] = result.json()
    assert run["run_id"] == demo_session.run_ids[1]
    assert run["status"] == "completed"
    assert run["workflow"] == "support-ticket"
    assert run["total_tokens"] == run["input_tokens"] + run["output_tokens"] > 10_000
    assert 0 < run["cost_usd"] < 0.12
    assert run["budget"]["max_cost_usd"] == 0.12
    assert {"duration_s", "started_at", "trace_id", "retries", "fallbacks", "steps", "attempts"} <= set(run)


def test_show_reads_the_stored_run_by_prefix(demo_session: DemoSession) -> None:
    run_id = demo_session.run_ids[0]
    result = demo_session.cli("show", run_id[:12])
    assert_ok(result)
    out = result.stdout
    assert out.startswith(f"run {run_id}  (support-ticket)\n")
    assert re.search(r"status\s+COMPLETED", out)
    for step in STEPS:
        assert f" {step} " in out
    assert "2 attempts" in out and "after " in out and "backoff" in out
    assert "claude-haiku-4-5" in out and "gpt-4o-mini" in out and "claude-sonnet-4-5" in out
    assert re.search(r"checkpoints\s+6 of 6 steps saved \(sqlite\)", out)


def test_show_json(demo_session: DemoSession) -> None:
    run_id = demo_session.run_ids[0]
    result = demo_session.cli("show", run_id, "--json")
    assert_ok(result)
    tree = result.json()
    assert tree["run_id"] == run_id and tree["status"] == "completed" and tree["source"] == "local"
    assert [step["step_id"] for step in tree["steps"]] == STEPS
    steps = {step["step_id"]: step for step in tree["steps"]}
    draft = steps["draft"]
    assert [a["status"] for a in draft["attempts"]] == ["error", "ok"]
    assert draft["attempts"][0]["failure_class"] == "recoverable"
    assert draft["attempts"][0]["error_type"] == "demo_provider.RateLimitError"
    assert draft["model"] == "claude-sonnet-4-5" and draft["cost_usd"] > 0.04
    assert steps["summarise"]["fallback"] == {
        "from_model": "claude-sonnet-4-5",
        "to_model": "claude-haiku-4-5",
        "reason": "budget_threshold",
        "threshold": 0.6,
    }
    assert steps["retrieve"]["model"] is None and steps["retrieve"]["cost_usd"] == 0
    assert sum(step["cost_usd"] for step in tree["steps"]) == pytest.approx(tree["cost_usd"])
    budget = tree["budget"]
    assert budget["cost_limit_usd"] == 0.12
    assert budget["cost_utilization"] == pytest.approx(tree["cost_usd"] / 0.12)
    assert tree["budget_exceeded"] == []


def test_demo_json_output_parses(cli: Cli) -> None:
    result = cli("demo", "--json")
    assert_ok(result)
    data = result.json()
    assert data["store"] == str(cli.store.resolve())
    assert data["otlp_endpoint"] is None
    [run] = data["runs"]
    assert run["ticket"] == 4812 and run["status"] == "completed"
    assert [step["step_id"] for step in run["steps"]] == STEPS


def test_a_small_budget_is_breached_and_the_run_resumes(cli: Cli) -> None:
    breached = cli("demo", "--budget", "0.05")
    assert_ok(breached)
    out = breached.stdout
    assert "= PARTIAL" in out
    assert "cost budget exceeded at step 'draft'" in out
    assert re.search(r"status\s+PARTIAL", out)
    match = re.search(r"stroma demo --resume (tkt-4812-[0-9a-f]{8}) --budget 0\.12", out)
    assert match, out
    run_id = match.group(1)

    stored = cli("show", run_id, "--json").json()
    assert stored["status"] == "partial"
    assert stored["budget_exceeded"][0]["dimension"] == "cost"
    assert [step["step_id"] for step in stored["steps"]] == ["triage", "retrieve", "draft"]

    resumed = cli("demo", "--resume", run_id, "--budget", "0.12")
    assert_ok(resumed)
    assert "= COMPLETED" in resumed.stdout
    assert "3 restored from checkpoints" in resumed.stdout
    tree = cli("show", run_id, "--json").json()
    assert tree["status"] == "completed"
    assert [step["status"] for step in tree["steps"]][:3] == ["restored"] * 3

    again = cli("demo", "--resume", run_id)
    assert again.returncode == 2 and "already completed" in again.stderr


def test_runs_on_an_empty_store(cli: Cli) -> None:
    result = cli("runs")
    assert_ok(result)
    assert "No runs recorded" in result.stdout and "stroma demo" in result.stdout
    assert cli("runs", "--json").json() == []


def test_store_option_overrides_the_environment(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere.sqlite3"
    assert_ok(cli("demo", "--store", str(other), "--json"))
    assert other.exists()
    assert cli("runs", "--json").json() == []
    assert len(cli("runs", "--store", str(other), "--json").json()) == 1
    assert len(cli("--store", str(other), "runs", "--json").json()) == 1


# --- prices --------------------------------------------------------------------------------------


def test_prices(cli: Cli) -> None:
    result = cli("prices", "gpt-4o", "claude-sonnet-4-5")
    assert_ok(result)
    assert "gpt-4o  (openai / gpt-4o, genai-prices)" in result.stdout
    assert "input    $2.50 per 1M tokens" in result.stdout
    assert "$6.00 when a call has more than 200,000 input tokens" in result.stdout
    data = cli("prices", "gpt-4o-mini", "--json").json()
    assert data == [
        {
            "model": "gpt-4o-mini",
            "input_usd_per_1m": 0.15,
            "output_usd_per_1m": 0.6,
            "per_request_usd": 0.0,
            "input_tiers": [],
            "output_tiers": [],
            "source": "genai-prices",
            "provider_id": "openai",
            "model_id": "gpt-4o-mini",
        }
    ]


def test_prices_prints_the_known_models_and_names_the_unknown(cli: Cli) -> None:
    result = cli("prices", "gpt-4o", "no-such-model-xyz", "gpt-4o-mini")
    assert result.returncode == 2, str(result)
    assert "gpt-4o  (openai / gpt-4o, genai-prices)" in result.stdout
    assert "gpt-4o-mini  (openai / gpt-4o-mini, genai-prices)" in result.stdout
    assert "no-such-model-xyz" not in result.stdout
    [line] = result.stderr.splitlines()
    assert line.startswith("stroma: error: no known price for model 'no-such-model-xyz' (1 of the 3 models")
    assert "stroma.pricing.set_price('no-such-model-xyz'" in line

    data = cli("prices", "gpt-4o", "no-such-model-xyz", "--json")
    assert data.returncode == 2 and data.stderr == "", str(data)
    document = data.json()
    assert document["error"]["kind"] == "usage" and document["error"]["exit_status"] == 2
    assert "'no-such-model-xyz'" in document["error"]["message"]
    assert document["unknown_models"] == ["no-such-model-xyz"]
    assert [entry["model"] for entry in document["prices"]] == ["gpt-4o"]
    assert document["prices"][0]["input_usd_per_1m"] == 2.5


def test_prices_print_amounts_in_fixed_point(cli: Cli) -> None:
    result = cli("prices", "gpt-4o-mini", "gemini-1.5-flash-8b")
    assert_ok(result)
    amounts = re.findall(r"\$\S+", result.stdout)
    assert amounts and all(re.fullmatch(r"\$[0-9,]+\.[0-9]+", amount) for amount in amounts), amounts


# --- stack ---------------------------------------------------------------------------------------


def test_stack_status_when_nothing_runs(cli: Cli) -> None:
    result = cli("stack", "status")
    assert result.returncode == 1, str(result)
    assert "No stack is running" in result.stdout
    assert result.stderr == ""
    data = cli("stack", "status", "--json")
    assert data.returncode == 1 and data.json()["running"] is False


def test_stack_down_when_nothing_runs(cli: Cli) -> None:
    result = cli("stack", "down")
    assert_ok(result)
    assert "No stack was running" in result.stdout


# --- errors --------------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (["show", "no-such-run"], "no run 'no-such-run'"),
    (["show", "tkt"], "ambiguous"),
    (["show", "x", "--jaeger", "localhost:16686"], "not an http(s) URL"),
    (["show", "x", "--jaeger", "http://"], "not an http(s) URL"),
    (["show", "x", "--service", "svc"], "--service only applies with --jaeger"),
    (["show"], "required: RUN_ID"),
    (["demo", "--otlp", "not a url"], "not an http(s) URL"),
    (["demo", "--otlp", "ftp://collector:4318"], "not an http(s) URL"),
    (["demo", "--otlp", "http://collector:99999"], "not an http(s) URL"),
    (["demo", "--budget", "-1"], "amount in USD of 0 or more"),
    (["demo", "--budget", "nan"], "amount in USD of 0 or more"),
    (["demo", "--budget", "lots"], "not an amount in USD"),
    (["demo", "--runs", "0"], "between 1 and 1000"),
    (["demo", "--runs", "2", "--resume", "tkt-4812-00000000"], "leave out --runs"),
    (["demo", "--resume", "no-such-run"], "no run 'no-such-run'"),
    (["demo", "--otlp-protocol", "grpc"], "needs --otlp"),
    (["runs", "--limit", "-3"], "between 1 and 10000"),
    (["prices", "no-such-model-xyz"], "no known price for model 'no-such-model-xyz'"),
    (["stack", "sideways"], "invalid choice"),
    (["stack", "status", "--free-ports"], "only applies to 'stack up'"),
    (["frobnicate"], "invalid choice"),
    (["runs", "--bogus"], "unrecognized arguments"),
    (["runs", "--store", "."], "is a directory"),
    (["demo", "--store", "."], "is a directory"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_give_one_line_and_exit_2(demo_session: DemoSession, argv: list[str], message: str) -> None:
    result = demo_session.cli(*argv)
    assert result.returncode == 2, str(result)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("stroma: error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


JSON_ERRORS = [
    (["show", "no-such-run", "--json"], "no run 'no-such-run'"),
    (["--json", "runs", "--bogus"], "unrecognized arguments"),
    (["demo", "--json", "--budget", "lots"], "not an amount in USD"),
    (["prices", "no-such-model-xyz", "--json"], "no known price for model 'no-such-model-xyz'"),
    (["stack", "status", "--free-ports", "--json"], "only applies to 'stack up'"),
]


@pytest.mark.parametrize(("argv", "message"), JSON_ERRORS, ids=[" ".join(a) for a, _ in JSON_ERRORS])
def test_json_errors_are_one_json_document_on_stdout(cli: Cli, argv: list[str], message: str) -> None:
    result = cli(*argv)
    assert result.returncode == 2, str(result)
    assert result.stderr == ""
    error = result.json()["error"]
    assert error["kind"] == "usage" and error["exit_status"] == 2
    assert message in error["message"]


def test_json_failures_are_json_too(demo_session: DemoSession, tmp_path: Path) -> None:
    result = demo_session.cli("show", demo_session.run_ids[0], "--jaeger", "http://127.0.0.1:9", "--json")
    assert result.returncode == 1 and result.stderr == "", str(result)
    error = result.json()["error"]
    assert error == {"kind": "failed", "message": error["message"], "exit_status": 1}
    assert error["message"].startswith("cannot reach Jaeger at http://127.0.0.1:9: ")
    bad = tmp_path / "garbage.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    unreadable = demo_session.cli("runs", "--store", str(bad), "--json")
    assert unreadable.returncode == 1 and unreadable.stderr == "", str(unreadable)
    assert unreadable.json()["error"]["message"] == f"cannot use the run store {bad}: file is not a database"


def test_jaeger_unreachable_is_one_line_and_exit_1(demo_session: DemoSession) -> None:
    result = demo_session.cli("show", demo_session.run_ids[0], "--jaeger", "http://127.0.0.1:9")
    assert result.returncode == 1, str(result)
    assert result.stderr.startswith("stroma: error: cannot reach Jaeger at http://127.0.0.1:9: ")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_an_unreadable_store_is_an_error_not_a_traceback(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "garbage.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    result = cli("runs", "--store", str(bad))
    assert result.returncode == 1, str(result)
    assert result.stderr == f"stroma: error: cannot use the run store {bad}: file is not a database\n"


def test_help_version_and_no_command(cli: Cli) -> None:
    helped = cli("--help")
    assert_ok(helped)
    for command in ("demo", "runs", "show", "prices", "stack"):
        assert command in helped.stdout
    assert_ok(cli("show", "--help"))
    version = cli("--version")
    assert_ok(version)
    assert re.fullmatch(r"stroma \d+\.\d+\.\d+\S*\n", version.stdout)
    bare = cli()
    assert bare.returncode == 2 and "usage: stroma" in bare.stdout


def test_the_console_script(cli: Cli) -> None:
    script = Path(sys.executable).with_name("stroma")
    if not script.exists():
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    result = cli.run_command([str(script), "prices", "gpt-4o", "--json"], ["prices"], 60.0)
    assert_ok(result)
    assert result.json()[0]["input_usd_per_1m"] == 2.5


def test_an_unreachable_collector_from_the_environment_never_fails_the_demo(cli: Cli) -> None:
    env = cli.env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    result = cli("demo", env=env, timeout=120)
    assert_ok(result)
    assert "= COMPLETED" in result.stdout
    assert "Spans and metrics were exported over OTLP to http://127.0.0.1:9" in result.stdout
    # The SDK's retry messages are folded into one warning line.
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stroma: warning: exporting to http://127.0.0.1:9: "), result.stderr


def test_a_zero_budget_is_accepted_and_nothing_is_spent(cli: Cli) -> None:
    """Issue 8 C13: one rule for library and CLI — a limit of 0 is legal and lets nothing start."""
    result = cli("demo", "--budget", "0", "--json")
    assert_ok(result)
    [run] = result.json()["runs"]
    assert run["status"] == "partial"
    assert run["cost_usd"] == 0 and run["total_tokens"] == 0
    assert run["budget_exceeded"][0]["step_id"] == "triage"  # nothing started
