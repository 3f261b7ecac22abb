"""The :class:`Stack`: per-run configuration copies and the four programs running on loopback."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from stroma.stack._build import StackError, alertmanager, build_collector, build_jaeger, config_dir, prometheus
from stroma.stack._info import LOOPBACK, StackInfo, StackPorts, StackStatus
from stroma.stack._native import debian_env, log_tail
from stroma.stack._process import Process, alive, probe, probe_all, spawn, stop_processes

# Named after the package, not this module: `stroma` (the CLI) sets that logger's level and prints its name.
_log = logging.getLogger("stroma.stack")

#: The receiver URL written in collector/alertmanager.yml; replaced in per-run copies.
_REPO_WEBHOOK_URL: Final = "http://host.docker.internal:5001/alerts"
#: What that URL means on the Docker host, and the native stack's default.
DEFAULT_WEBHOOK_URL: Final = "http://127.0.0.1:5001/alerts"


def _duration(seconds: float) -> str:
    """A Go/Prometheus duration string (milliseconds) for *seconds*."""
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {seconds!r} s")
    return f"{max(1, round(seconds * 1000))}ms"


def _substitute(text: str, replacements: Mapping[str, str], source: Path) -> str:
    """Replace each key of *replacements* in the non-comment lines of *text*.

    Raises :class:`StackError` naming *source* and the key when a key does not occur, so that an
    edit of the repository file cannot silently leave the generated copy pointing elsewhere.
    """
    lines = text.splitlines(keepends=True)
    for old, new in replacements.items():
        found = False
        for index, line in enumerate(lines):
            if not line.lstrip().startswith("#") and old in line:
                lines[index] = line.replace(old, new)
                found = True
        if not found:
            raise StackError(f"{source} no longer contains {old!r}, which the native stack replaces")
    return "".join(lines)


# Attached stacks still running; strong references, so a stack dropped without stop() is still
# stopped at interpreter exit.
_ATTACHED: set[Stack] = set()


def _stop_attached_stacks() -> None:
    for stack in list(_ATTACHED):
        with contextlib.suppress(Exception):
            stack.stop()


atexit.register(_stop_attached_stacks)


class Stack:
    """Collector, Jaeger, Prometheus and Alertmanager running natively on 127.0.0.1.

    ``Stack(...).start()`` (or ``with Stack(...) as stack:``) builds or unpacks what is missing,
    writes per-run configuration copies into *run_dir* (``config/``, ``data/``,
    ``logs/<component>.log``; by default a new temporary directory, removed again by
    :meth:`stop`), starts the programs and returns once every
    one answers its readiness probe: collector ``GET /`` on the health_check port, Jaeger
    ``GET /api/services``, Prometheus and Alertmanager ``GET /-/ready`` (each HTTP 200).

    Arguments:
        ports: fixed ports; ``None`` picks free ones (start retries once on a port clash).
        webhook_url: where Alertmanager posts notifications (:data:`DEFAULT_WEBHOOK_URL`).
            It must be known before start: Alertmanager reads it from its config file.
        scrape_interval: Prometheus scrape and rule-evaluation interval in seconds, for every
            job and every rule group without an ``interval:`` of its own; ``None`` keeps the
            shipped values (``prometheus.yml``: Stroma's metrics scraped every 2 s, the rest
            every 15 s; the budget rule group evaluated every 2 s).
        trace_sample_percent: share (0..100) of traces without error, breach, fallback or retry
            that the collector's tail sampler keeps.
        tail_decision_wait: seconds the tail sampler waits for a trace whose root span never
            arrives; tail_decision_wait_after_root: seconds after the root span arrived.
        ready_timeout: seconds to wait for all components to become ready.
        stop_timeout: seconds between SIGTERM and SIGKILL when stopping.
        collector_env: extra environment for the collector (overrides the variables this class
            sets; e.g. ``{"STROMA_TRACES_EXPORTERS": "[otlp_grpc/jaeger, debug]"}``).
        config: directory holding the configuration files (default :func:`config_dir`).
        detached: start the processes in their own session and do not stop them at interpreter
            exit (what :func:`up` uses); otherwise an ``atexit`` hook stops them.

    Raises :class:`StackError` (start, with the failing component's log tail). Not thread-safe:
    start and stop it from one thread.
    """

    def __init__(
        self,
        *,
        ports: StackPorts | None = None,
        run_dir: Path | None = None,
        webhook_url: str = DEFAULT_WEBHOOK_URL,
        scrape_interval: float | None = None,
        trace_sample_percent: float = 100.0,
        tail_decision_wait: float = 5.0,
        tail_decision_wait_after_root: float = 1.0,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        collector_env: Mapping[str, str] | None = None,
        config: Path | None = None,
        detached: bool = False,
    ) -> None:
        if not 0.0 <= trace_sample_percent <= 100.0:
            raise ValueError(f"trace_sample_percent must be within 0..100, got {trace_sample_percent!r}")
        for label, value in (
            ("ready_timeout", ready_timeout),
            ("stop_timeout", stop_timeout),
            ("tail_decision_wait", tail_decision_wait),
            ("tail_decision_wait_after_root", tail_decision_wait_after_root),
            ("scrape_interval", scrape_interval if scrape_interval is not None else 1.0),
        ):
            if value <= 0:
                raise ValueError(f"{label} must be positive seconds, got {value!r}")
        if not webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL, got {webhook_url!r}")
        self._fixed_ports = ports
        self._run_dir = run_dir
        self._webhook_url = webhook_url
        self._scrape_interval = scrape_interval
        self._sample_percent = trace_sample_percent
        self._decision_wait = tail_decision_wait
        self._decision_wait_after_root = tail_decision_wait_after_root
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._collector_env = dict(collector_env or {})
        self._config = config
        self._detached = detached
        self._procs: list[Process] = []
        self._info: StackInfo | None = None
        self._temp_dir: Path | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def info(self) -> StackInfo:
        """Endpoints of the running stack. Raises :class:`StackError` before :meth:`start`."""
        if self._info is None:
            raise StackError("the stack is not running; call start() first")
        return self._info

    @property
    def pids(self) -> dict[str, int]:
        return {proc.name: proc.pid for proc in self._procs}

    @property
    def processes(self) -> tuple[Process, ...]:
        """The started programs (what :func:`stroma.stack.up` records to find them again)."""
        return tuple(self._procs)

    def log_path(self, component: str) -> Path:
        """The log file of *component* (``otelcol``, ``jaeger``, ``prometheus``, ``alertmanager``)."""
        return self.info.run_dir / "logs" / f"{component}.log"

    def start(self) -> StackInfo:
        """Build what is missing, start every component and wait until all are ready."""
        if self._procs:
            raise StackError("the stack is already started")
        binaries = {
            "otelcol": build_collector(),
            "jaeger": build_jaeger(),
            "prometheus": prometheus(),
            "alertmanager": alertmanager(),
        }
        configs = self._config or config_dir()
        run_dir = self._run_dir
        if run_dir is None:
            run_dir = self._temp_dir = Path(tempfile.mkdtemp(prefix="stroma-stack-"))
        attempts = 1 if self._fixed_ports else 2
        for attempt in range(1, attempts + 1):
            ports = self._fixed_ports or StackPorts.free()
            self._info = StackInfo(ports, run_dir, self._webhook_url)
            try:
                self._start_once(binaries, configs, self._info)
            except StackError as exc:
                self._halt()
                if attempt < attempts and "address already in use" in str(exc):
                    _log.warning("port clash while starting the stack; retrying with other ports")
                    continue
                self.stop()
                raise
            except BaseException:  # Ctrl-C during start-up: leave nothing running, then re-raise
                self.stop()
                raise
            break
        return self.info

    def stop(self) -> dict[str, str]:
        """Stop every process this stack started (SIGTERM, SIGKILL after ``stop_timeout``).

        Idempotent; returns ``{component: "stopped" | "killed" | "not running"}``.
        """
        outcome = self._halt()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None
        return outcome

    def status(self) -> StackStatus:
        """Probe every component now (no waiting)."""
        return probe_all(self._procs, self._info)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _halt(self) -> dict[str, str]:
        procs, self._procs = self._procs, []
        _ATTACHED.discard(self)
        # Stop in reverse start order: Prometheus before the collector it scrapes, and so on.
        return stop_processes(reversed(procs), self._stop_timeout)

    def _start_once(self, binaries: Mapping[str, Path], configs: Path, info: StackInfo) -> None:
        ports = info.ports
        if self._fixed_ports is not None:
            ports.check_free()
        for sub in ("config", "logs", "data/prometheus", "data/alertmanager"):
            (info.run_dir / sub).mkdir(parents=True, exist_ok=True)
        base_env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        loop = LOOPBACK
        jaeger_env = {
            **base_env,
            "JAEGER_OTLP_GRPC_ENDPOINT": f"{loop}:{ports.jaeger_otlp_grpc}",
            "JAEGER_OTLP_HTTP_ENDPOINT": f"{loop}:{ports.jaeger_otlp_http}",
            "JAEGER_QUERY_HTTP_ENDPOINT": f"{loop}:{ports.jaeger_query_http}",
            "JAEGER_QUERY_GRPC_ENDPOINT": f"{loop}:{ports.jaeger_query_grpc}",
        }
        collector_env = {
            **base_env,
            "OTELCOL_OTLP_GRPC_ENDPOINT": f"{loop}:{ports.otlp_grpc}",
            "OTELCOL_OTLP_HTTP_ENDPOINT": f"{loop}:{ports.otlp_http}",
            "OTELCOL_HEALTH_ENDPOINT": f"{loop}:{ports.collector_health}",
            "OTELCOL_PROMETHEUS_ENDPOINT": f"{loop}:{ports.collector_metrics}",
            "OTELCOL_TELEMETRY_HOST": loop,
            "OTELCOL_TELEMETRY_PORT": str(ports.collector_telemetry),
            "JAEGER_OTLP_ENDPOINT": f"{loop}:{ports.jaeger_otlp_grpc}",
            # No Tempo natively: traces go to Jaeger only (see collector/otelcol.yaml).
            "STROMA_TRACES_EXPORTERS": "[otlp_grpc/jaeger]",
            "STROMA_METRICS_EXPORTERS": "[prometheus]",
            "STROMA_TRACE_SAMPLE_PERCENT": repr(float(self._sample_percent)),
            "STROMA_TAIL_DECISION_WAIT": _duration(self._decision_wait),
            "STROMA_TAIL_DECISION_WAIT_AFTER_ROOT": _duration(self._decision_wait_after_root),
            **self._collector_env,
        }
        prom_config = info.run_dir / "config" / "prometheus.yml"
        am_config = info.run_dir / "config" / "alertmanager.yml"
        self._write_prometheus_config(configs / "prometheus.yml", prom_config, configs / "rules", ports)
        source = configs / "alertmanager.yml"
        am_text = _substitute(source.read_text(encoding="utf-8"), {_REPO_WEBHOOK_URL: info.webhook_url}, source)
        am_config.write_text(am_text, encoding="utf-8")

        logs = info.run_dir / "logs"
        data = info.run_dir / "data"
        launches: list[tuple[str, list[str], Mapping[str, str], str]] = [
            (
                "jaeger",
                [str(binaries["jaeger"]), "--config", str(configs / "jaeger.yaml")],
                jaeger_env,
                f"{info.jaeger_url}/api/services",
            ),
            (
                "alertmanager",
                [
                    str(binaries["alertmanager"]),
                    f"--config.file={am_config}",
                    f"--storage.path={data / 'alertmanager'}",
                    f"--web.listen-address={loop}:{ports.alertmanager}",
                    "--cluster.listen-address=",
                ],
                debian_env(),
                f"{info.alertmanager_url}/-/ready",
            ),
            (
                "otelcol",
                [str(binaries["otelcol"]), f"--config={configs / 'otelcol.yaml'}"],
                collector_env,
                info.collector_health_url,
            ),
            (
                "prometheus",
                [
                    str(binaries["prometheus"]),
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={data / 'prometheus'}",
                    f"--web.listen-address={loop}:{ports.prometheus}",
                    "--web.enable-lifecycle",
                    "--web.enable-remote-write-receiver",
                    "--enable-feature=exemplar-storage",
                ],
                debian_env(),
                f"{info.prometheus_url}/-/ready",
            ),
        ]
        if not self._detached:
            _ATTACHED.add(self)
        for name, argv, env, probe_url in launches:
            log = logs / f"{name}.log"
            self._procs.append(spawn(name, argv, env, log, probe_url, detached=self._detached))
        self._wait_ready()

    def _write_prometheus_config(self, source: Path, target: Path, rules: Path, ports: StackPorts) -> None:
        replacements = {
            "otel-collector:8889": f"{LOOPBACK}:{ports.collector_metrics}",
            "otel-collector:8888": f"{LOOPBACK}:{ports.collector_telemetry}",
            "alertmanager:9093": f"{LOOPBACK}:{ports.alertmanager}",
            "rules/*.rules.yml": str(rules / "*.rules.yml"),
        }
        if self._scrape_interval is not None:
            interval = _duration(self._scrape_interval)
            replacements["scrape_interval: 15s"] = f"scrape_interval: {interval}"
            replacements["scrape_interval: 2s"] = f"scrape_interval: {interval}"
            replacements["evaluation_interval: 15s"] = f"evaluation_interval: {interval}"
        text = _substitute(source.read_text(encoding="utf-8"), replacements, source)
        target.write_text(text, encoding="utf-8")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        pending = {proc.name: proc for proc in self._procs}
        reasons: dict[str, str] = {}
        while pending:
            for name, proc in list(pending.items()):
                if not alive(proc):
                    raise StackError(f"{name} exited during start-up; log {proc.log}:\n{log_tail(proc.log)}")
                ready, reasons[name] = probe(proc.probe_url, timeout=0.5)
                if ready:
                    del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                details = "\n".join(
                    f"--- {name}: {proc.probe_url} -> {reasons.get(name)}; log {proc.log}:\n{log_tail(proc.log, 25)}"
                    for name, proc in pending.items()
                )
                raise StackError(f"not ready after {self._ready_timeout:.0f} s: {', '.join(pending)}\n{details}")
            time.sleep(0.1)
