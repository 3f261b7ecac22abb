"""``stroma demo --otlp`` into a real Jaeger, and ``stroma show --jaeger`` reading it back.

Jaeger v2 runs natively (built by ``python -m stroma.stack build``, cached) with the project's
``collector/jaeger.yaml`` on free loopback ports; the demo exports straight to Jaeger's OTLP/HTTP
receiver, so this needs no collector. Marked ``e2e``.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_support import Cli

pytestmark = pytest.mark.e2e

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Jaeger:
    query_url: str
    otlp_http_url: str


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    from stroma.stack import build_jaeger, config_dir

    binary = build_jaeger()
    grpc, http, query, query_grpc = _free_ports(4)
    env = {
        "JAEGER_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc}",
        "JAEGER_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http}",
        "JAEGER_QUERY_HTTP_ENDPOINT": f"127.0.0.1:{query}",
        "JAEGER_QUERY_GRPC_ENDPOINT": f"127.0.0.1:{query_grpc}",
        "JAEGER_LOG_LEVEL": "warn",
        "PATH": "/usr/bin:/bin",
    }
    log_path = tmp_path_factory.mktemp("jaeger") / "jaeger.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(binary), "--config", str(config_dir() / "jaeger.yaml")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    query_url = f"http://127.0.0.1:{query}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with _OPENER.open(f"{query_url}/api/services", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Jaeger did not start; log:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield Jaeger(query_url, f"http://127.0.0.1:{http}")
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _show_when_there(cli: Cli, run_id: str, jaeger: Jaeger, *extra: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        result = cli("show", run_id, "--jaeger", jaeger.query_url, "--json", *extra)
        if result.returncode == 0:
            tree = result.json()
            # Spans arrive in batches: wait until the whole run is there.
            if tree["status"] != "unknown" and len(tree["steps"]) == 6:
                return tree
        elif result.returncode != 2:
            pytest.fail(str(result))
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} did not appear in Jaeger: {result}")
        time.sleep(0.5)


def _comparable(tree: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in tree.items() if key not in ("source", "error")}


def test_demo_exports_to_jaeger_and_show_reads_it_back(cli: Cli, jaeger: Jaeger, tmp_path: Path) -> None:
    demo = cli("demo", "--otlp", jaeger.otlp_http_url, "--json", timeout=120)
    assert demo.returncode == 0, str(demo)
    data = demo.json()
    assert data["otlp_endpoint"] == jaeger.otlp_http_url
    assert data["telemetry_delivered"] is True
    run_id = data["runs"][0]["run_id"]

    # The local store knows the trace id: one GET of the trace.
    remote = _show_when_there(cli, run_id, jaeger)
    assert remote["source"] == "jaeger"
    local = cli("show", run_id, "--json").json()
    assert _comparable(remote) == _comparable(local)

    # Without the local store, the run is found by its stroma.run.id tag.
    elsewhere = tmp_path / "empty.sqlite3"
    searched = _show_when_there(cli, run_id, jaeger, "--store", str(elsewhere))
    assert _comparable(searched) == _comparable(local)

    text = cli("show", run_id, "--jaeger", jaeger.query_url)
    assert text.returncode == 0, str(text)
    assert f"run {run_id}  (support-ticket)" in text.stdout
    assert "fallback claude-sonnet-4-5 → claude-haiku-4-5" in text.stdout


def test_an_unknown_run_in_jaeger_is_exit_2(cli: Cli, jaeger: Jaeger) -> None:
    result = cli("show", "tkt-0000-00000000", "--jaeger", jaeger.query_url)
    assert result.returncode == 2, str(result)
    assert result.stderr.startswith("stroma: error: no run 'tkt-0000-00000000' in Jaeger")
    assert len(result.stderr.splitlines()) == 1


def test_wrong_service_name_finds_nothing(cli: Cli, jaeger: Jaeger) -> None:
    result = cli("show", "anything", "--jaeger", jaeger.query_url, "--service", "not-stroma")
    assert result.returncode == 2, str(result)
    assert "for service 'not-stroma'" in result.stderr


def test_something_that_is_not_jaeger(cli: Cli, jaeger: Jaeger) -> None:
    # Jaeger's OTLP/HTTP receiver answers, but not with a trace search.
    result = cli("show", "x", "--jaeger", jaeger.otlp_http_url)
    assert result.returncode == 1, str(result)
    assert result.stderr.startswith(f"stroma: error: {jaeger.otlp_http_url} has no Jaeger query API")
    assert len(result.stderr.splitlines()) == 1
