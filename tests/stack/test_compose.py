"""docker-compose.yml, Grafana provisioning and dashboards agree with each other and the configs.

No Docker engine runs here, so the compose stack is checked statically: mounts, image tags,
ports against the collector/Tempo/Prometheus configs, datasource uids, and every PromQL
expression parsed by a real promtool.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from queries import (
    VARIABLE_RE,
    dashboard_files,
    dashboard_queries,
    iter_panels,
    known_metric_names,
    load_dashboard,
    metric_names,
    raw_targets,
    substitute,
    variable_queries,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
OTELCOL = REPO / "collector" / "otelcol.yaml"
TEMPO = REPO / "collector" / "tempo.yaml"
DATASOURCES = REPO / "dashboards" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = REPO / "dashboards" / "provisioning" / "dashboards" / "dashboards.yaml"
COST_DASHBOARD = REPO / "dashboards" / "stroma-cost-per-step.json"

COLLECTOR = "otel-collector"  # the scrape target host in collector/prometheus.yml
EXPECTED_SERVICES = {COLLECTOR, "jaeger", "tempo", "prometheus", "alertmanager", "grafana"}
# service -> container port users reach on the same host port
UI_PORTS = {"jaeger": 16686, "prometheus": 9090, "alertmanager": 9093, "grafana": 3000}
EXACT_TAG = re.compile(r"^[a-z0-9][a-z0-9._/-]*:v?\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?(?:@sha256:[0-9a-f]{64})?$")
ENV_REF = re.compile(r"\$\{env:(\w+)(?::-([^}]*))?\}")
GRAFANA_BUILTIN_DATASOURCES = {"-- Grafana --", "grafana", "-- Dashboard --", "-- Mixed --"}


# --- helpers ---------------------------------------------------------------------------------
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE_FILE)


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host source, container target) of a service's volumes, short or long syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        mounts.append((source, target))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file that a container path of *service* comes from (through its mounts)."""
    wanted = PurePosixPath(container_path)
    for source, target in _mounts(service):
        target_path = PurePosixPath(target)
        if wanted == target_path or target_path in wanted.parents:
            return (COMPOSE_FILE.parent / source / wanted.relative_to(target_path)).resolve()
    raise AssertionError(f"{container_path} is not mounted from the repository")


def _ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of a service's published ports."""
    published = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"publish ports as HOST:CONTAINER, got {entry!r}"
        published.append((int(parts[-2]), int(parts[-1])))
    return published


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _otelcol_env_defaults() -> dict[str, str]:
    return {name: default for name, default in ENV_REF.findall(OTELCOL.read_text(encoding="utf-8"))}


def _compose_prometheus_config(compose: dict[str, Any]) -> tuple[dict[str, Any], Path, str]:
    """(config, host path, container path) of the Prometheus config the compose service runs."""
    prometheus = _services(compose)["prometheus"]
    flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    container_path = flag.split("=", 1)[1]
    host = _host_path(prometheus, container_path)
    return _yaml(host), host, container_path


def _datasource_uids_in(node: Any) -> set[str]:
    """Every datasource uid referenced anywhere in a dashboard or provisioning structure."""
    uids: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and isinstance(value, dict) and "uid" in value:
                uids.add(str(value["uid"]))
            elif key in {"datasource", "datasourceUid", "alertmanagerUid"} and isinstance(value, str):
                uids.add(value)
            elif key == "url" and isinstance(value, str) and "/explore" in value:
                uids |= _explore_link_uids(value)
            else:
                uids |= _datasource_uids_in(value)
    elif isinstance(node, list):
        for item in node:
            uids |= _datasource_uids_in(item)
    return uids - GRAFANA_BUILTIN_DATASOURCES


def _explore_link_uids(url: str) -> set[str]:
    panes = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["panes"][0]
    panes = VARIABLE_RE.sub("x", panes)  # ${__field.labels...} placeholders
    return _datasource_uids_in(json.loads(panes))


def _grafana_datasources() -> list[dict[str, Any]]:
    return _yaml(DATASOURCES)["datasources"]


# --- compose ---------------------------------------------------------------------------------
def test_services(compose):
    assert set(_services(compose)) == EXPECTED_SERVICES


def test_every_mount_is_a_repository_file(compose):
    for name, service in _services(compose).items():
        for source, target in _mounts(service):
            assert source.startswith("./"), f"{name}: mount {source} is not a repository path"
            host = (COMPOSE_FILE.parent / source).resolve()
            assert REPO in (host, *host.parents), f"{name}: {source} leaves the repository"
            assert host.exists(), f"{name}: mounted {source} does not exist"
            assert target.startswith("/"), f"{name}: mount target {target} is not absolute"


def test_every_image_has_an_exact_tag(compose):
    for name, service in _services(compose).items():
        image = service["image"]
        assert EXACT_TAG.match(image), f"{name}: image {image} is not pinned to an exact version"
        assert ":latest" not in image


def test_host_ports_are_unique_and_match_container_ports(compose):
    seen: dict[int, str] = {}
    for name, service in _services(compose).items():
        for host, container in _ports(service):
            assert host not in seen, f"host port {host} published by {seen[host]} and {name}"
            seen[host] = name
            assert host == container, f"{name}: {host}:{container}, documented URLs use one port"


def test_user_interface_ports(compose):
    services = _services(compose)
    for name, port in UI_PORTS.items():
        assert port in {container for _, container in _ports(services[name])}, name


def test_collector_ports_and_env_agree_with_otelcol_yaml(compose):
    defaults = _otelcol_env_defaults()
    collector = _services(compose)[COLLECTOR]
    env = _env(collector)
    # every variable compose sets is one the collector config reads
    assert set(env) <= set(defaults), sorted(set(env) - set(defaults))
    published = {container for _, container in _ports(collector)}
    for variable in (
        "OTELCOL_OTLP_GRPC_ENDPOINT",
        "OTELCOL_OTLP_HTTP_ENDPOINT",
        "OTELCOL_PROMETHEUS_ENDPOINT",
    ):
        port = _port_of(defaults[variable])
        assert env[variable] == f"0.0.0.0:{port}", variable
        assert port in published, f"{variable}: port {port} not published"
    assert {4317, 4318} <= published


def test_collector_mounts_and_runs_otelcol_yaml(compose):
    collector = _services(compose)[COLLECTOR]
    flag = next(arg for arg in collector["command"] if arg.startswith("--config="))
    assert _host_path(collector, flag.split("=", 1)[1]) == OTELCOL


def test_collector_exports_traces_to_jaeger_and_tempo(compose):
    env = _env(_services(compose)[COLLECTOR])
    exporters = set(_yaml(OTELCOL)["exporters"])
    trace_exporters = yaml.safe_load(env["STROMA_TRACES_EXPORTERS"])
    assert set(trace_exporters) <= exporters
    assert {"otlp_grpc/jaeger", "otlp_grpc/tempo"} <= set(trace_exporters)
    tempo_grpc = _yaml(TEMPO)["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert env["TEMPO_OTLP_ENDPOINT"] == f"tempo:{_port_of(tempo_grpc)}"
    # the jaeger image listens for OTLP/gRPC on its default port 4317 (JAEGER_LISTEN_HOST=0.0.0.0)
    assert env["JAEGER_OTLP_ENDPOINT"] == "jaeger:4317"


def test_tempo_config_and_port(compose):
    tempo = _services(compose)["tempo"]
    config_flag = next(arg for arg in tempo["command"] if arg.startswith("-config.file="))
    assert _host_path(tempo, config_flag.split("=", 1)[1]) == TEMPO
    http_port = _yaml(TEMPO)["server"]["http_listen_port"]
    assert http_port == 3200
    assert (http_port, http_port) in _ports(tempo)


def test_compose_prometheus_scrapes_the_collector_exporter(compose):
    config, _, _ = _compose_prometheus_config(compose)
    exporter_port = _port_of(_otelcol_env_defaults()["OTELCOL_PROMETHEUS_ENDPOINT"])
    targets = {
        target: job
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    wanted = f"{COLLECTOR}:{exporter_port}"
    assert wanted in targets, f"no scrape job for {wanted}: {sorted(targets)}"
    assert targets[wanted].get("honor_labels") is True  # keep `job` = service.name
    alertmanagers = {
        target
        for am in config["alerting"]["alertmanagers"]
        for static in am["static_configs"]
        for target in static["targets"]
    }
    assert alertmanagers == {"alertmanager:9093"}


def test_compose_prometheus_loads_the_rules_but_not_their_tests(compose):
    config, _, container_config = _compose_prometheus_config(compose)
    prometheus = _services(compose)["prometheus"]
    config_dir = PurePosixPath(container_config).parent
    loaded = set()
    for pattern in config["rule_files"]:
        container_pattern = config_dir / pattern
        host_dir = _host_path(prometheus, str(container_pattern.parent))
        loaded |= {path.name for path in host_dir.iterdir() if fnmatch(path.name, container_pattern.name)}
    assert "stroma.rules.yml" in loaded
    assert "stroma.rules.test.yml" not in loaded


def test_compose_prometheus_config_is_valid(compose, promtool):
    _, host, _ = _compose_prometheus_config(compose)
    promtool.run("check", "config", str(host))


def test_prometheus_flags(compose):
    command = _services(compose)["prometheus"]["command"]
    assert "--web.enable-remote-write-receiver" in command
    assert "--enable-feature=exemplar-storage" in command


def test_alertmanager_runs_the_repository_config(compose):
    alertmanager = _services(compose)["alertmanager"]
    flag = next(arg for arg in alertmanager["command"] if arg.startswith("--config.file="))
    assert _host_path(alertmanager, flag.split("=", 1)[1]) == REPO / "collector" / "alertmanager.yml"


# --- Grafana provisioning --------------------------------------------------------------------
def test_datasources_have_fixed_uids_and_point_at_compose_services(compose):
    by_uid = {ds["uid"]: ds for ds in _grafana_datasources()}
    assert set(by_uid) == {"prometheus", "jaeger", "tempo", "alertmanager"}
    tempo_port = _yaml(TEMPO)["server"]["http_listen_port"]
    expected = {
        "prometheus": "http://prometheus:9090",
        "jaeger": "http://jaeger:16686",
        "tempo": f"http://tempo:{tempo_port}",
        "alertmanager": "http://alertmanager:9093",
    }
    for uid, url in expected.items():
        assert by_uid[uid]["url"] == url
        host = urllib.parse.urlsplit(url).hostname
        assert host in _services(compose)


def test_datasource_cross_references_exist():
    uids = {ds["uid"] for ds in _grafana_datasources()}
    for ds in _grafana_datasources():
        assert _datasource_uids_in(ds.get("jsonData", {})) <= uids, ds["uid"]


def test_provisioning_literal_dollars_are_escaped():
    text = DATASOURCES.read_text(encoding="utf-8")
    # Grafana expands $VAR / ${VAR} from the environment in provisioning files.
    assert not re.search(r"(?<!\$)\$(?!\$)(?:\{|\w)", text.replace("$$", ""))


def test_grafana_mounts_provisioning_and_dashboards(compose):
    grafana = _services(compose)["grafana"]
    assert _host_path(grafana, "/etc/grafana/provisioning/datasources/datasources.yaml") == DATASOURCES
    assert _host_path(grafana, "/etc/grafana/provisioning/dashboards/dashboards.yaml") == DASHBOARD_PROVIDERS
    providers = _yaml(DASHBOARD_PROVIDERS)["providers"]
    for provider in providers:
        assert _host_path(grafana, provider["options"]["path"]) == REPO / "dashboards"
    home = _env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _host_path(grafana, home) == COST_DASHBOARD
    assert _env(grafana)["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert _env(grafana)["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# --- dashboards ------------------------------------------------------------------------------
def test_dashboards_load():
    assert COST_DASHBOARD in dashboard_files()
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        assert dashboard["uid"] and dashboard["title"] and dashboard["panels"], path.name


def test_cost_dashboard_identity():
    dashboard = load_dashboard(COST_DASHBOARD)
    assert dashboard["uid"] == "stroma-cost-per-step"
    assert dashboard["title"] == "Stroma — cost per step"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"workflow", "step"} <= variables


def test_dashboard_datasource_uids_are_provisioned():
    provisioned = {ds["uid"] for ds in _grafana_datasources()}
    for path in dashboard_files():
        used = _datasource_uids_in(load_dashboard(path))
        assert used, f"{path.name} references no datasource by uid"
        assert used <= provisioned, f"{path.name}: unprovisioned uids {sorted(used - provisioned)}"


def test_every_panel_target_has_an_expr():
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        panel_ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]
        assert len(panel_ids) == len(set(panel_ids)), f"{path.name}: duplicate panel ids"
        for panel in iter_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            assert panel.get("targets"), f"{path.name}: panel {panel['title']!r} has no targets"
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{panel['title']!r} {target.get('refId')}"
                assert target["datasource"]["uid"] == "prometheus", panel["title"]


def test_template_variables_are_only_used_in_regex_matchers():
    # `.*` (what "All" expands to, and what queries.py substitutes) only works after =~ or !~.
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        exprs = [target["expr"] for _, target in raw_targets(dashboard)]
        exprs += [query for _, query in variable_queries(dashboard)]
        for expr in exprs:
            for match in VARIABLE_RE.finditer(expr):
                name = next(g for g in match.groups() if g)
                if name.startswith("__"):
                    continue
                before = expr[: match.start()]
                assert re.search(r'[=!]~\s*"[^"]*$', before), f"${name} outside a regex matcher in {expr}"


def test_dashboard_queries_substitute_every_variable():
    queries = dashboard_queries()
    assert len(queries) >= 20
    for query in queries:
        assert "$" not in query.expr and "[[" not in query.expr, query
    assert any(query.needs_firing_alert for query in queries)


def test_dashboard_promql_parses(promtool, tmp_path):
    exprs = [query.expr for query in dashboard_queries()]
    for path in dashboard_files():
        for name, query in variable_queries(load_dashboard(path)):
            match = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
            assert match, f"variable {name}: expected label_values(<selector>, <label>), got {query}"
            exprs.append(substitute(match.group(1)))
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)],
            }
        ]
    }
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(yaml.safe_dump(rules, sort_keys=False, allow_unicode=True), encoding="utf-8")
    output = promtool.run("check", "rules", str(rule_file))
    assert f"{len(exprs)} rules found" in output


def test_dashboard_metric_names_are_known():
    for query in dashboard_queries():
        unknown = metric_names(query.expr) - known_metric_names() - {"ALERTS"}
        assert not unknown, f"{query.title!r} uses unknown metrics {sorted(unknown)}"


def test_step_panels_link_to_jaeger_and_tempo():
    dashboard = load_dashboard(COST_DASHBOARD)
    linked = 0
    for panel in iter_panels(dashboard["panels"]):
        exprs = " ".join(target.get("expr", "") for target in panel.get("targets", []))
        keeps_step = re.search(r"by \([^)]*\bstroma_step_id\b", exprs) and "job" in exprs
        links = panel.get("fieldConfig", {}).get("defaults", {}).get("links", [])
        if not keeps_step:
            continue
        urls = [link["url"] for link in links]
        jaeger = next((u for u in urls if "/search?" in u), None)
        tempo = next((u for u in urls if u.startswith("/explore?")), None)
        assert jaeger and tempo, f"panel {panel['title']!r} has no trace links"
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(jaeger).query)
        assert query["service"] == ["${__field.labels.job:percentencode}"]
        tags = json.loads(VARIABLE_RE.sub("STEP", query["tags"][0]))
        assert tags == {"stroma.step.id": "STEP"}
        panes = json.loads(VARIABLE_RE.sub("X", urllib.parse.parse_qs(urllib.parse.urlsplit(tempo).query)["panes"][0]))
        (pane,) = panes.values()
        assert pane["queries"][0]["query"] == '{ span.stroma.step.id = "X" }'
        linked += 1
    assert linked >= 8
