"""The native observability stack: collector, Jaeger, Prometheus and Alertmanager as real processes.

Users run the stack with ``docker compose``; the end-to-end tests and ``stroma stack up`` run the
same configuration files (``collector/``) with native programs, because no container engine is
available there (design §7, ``shared/stack-notes.md``):

* ``otelcol-stroma`` — a minimal collector built with the OpenTelemetry Collector Builder from
  ``collector/builder.yaml`` (:func:`build_collector`);
* ``jaeger`` — Jaeger v2 built from its Go module (:func:`build_jaeger`);
* ``prometheus``/``promtool`` and ``prometheus-alertmanager``/``amtool`` — Debian's packages,
  unpacked without starting daemons (:func:`prometheus`, :func:`alertmanager`, ...).

Binaries, the Go module cache and the Go build cache live in :func:`stroma._tools.tools_dir`
(``$STROMA_TOOLS_DIR``, default ``~/.cache/stroma-tools``), keyed by version, and are rebuilt only
when missing. Builds hold a cross-process lock and write their output to
``<tools>/logs/build-*.log``.

:class:`Stack` starts the four programs on loopback (by default on free ports), waits until each
answers its readiness probe and stops them by PID (SIGTERM, then SIGKILL). :func:`up`,
:func:`status` and :func:`down` run a detached stack for the CLI and remember it in a state file.

This module uses only the standard library (importing it still runs ``stroma/__init__``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from stroma import _tools
from stroma._tools import JAEGER_VERSION, debian_env, log_tail, tools_dir
from stroma.errors import StromaError

__all__ = [
    "COLLECTOR_VERSION",
    "DEFAULT_WEBHOOK_URL",
    "JAEGER_VERSION",
    "ComponentStatus",
    "Stack",
    "StackError",
    "StackInfo",
    "StackPorts",
    "StackStatus",
    "alertmanager",
    "amtool",
    "build_all",
    "build_collector",
    "build_jaeger",
    "config_dir",
    "down",
    "main",
    "prometheus",
    "promtool",
    "state_file",
    "status",
    "up",
]

_log = logging.getLogger(__name__)

#: OpenTelemetry Collector Builder version (the manifest's release line).
COLLECTOR_VERSION: Final = _tools.COLLECTOR_BUILDER_VERSION
#: The receiver URL written in collector/alertmanager.yml; replaced in per-run copies.
_REPO_WEBHOOK_URL: Final = "http://host.docker.internal:5001/alerts"
#: What that URL means on the Docker host, and the native stack's default.
DEFAULT_WEBHOOK_URL: Final = "http://127.0.0.1:5001/alerts"
_LOOPBACK: Final = "127.0.0.1"
_STATE_VERSION: Final = 1


class StackError(StromaError, RuntimeError):
    """The native stack could not be built, started, probed or stopped.

    The message says which component and step failed and, where a process was involved, ends
    with the last lines of its log.
    """


# --------------------------------------------------------------------------------------------
# Locating configuration and building / unpacking the programs
# --------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The directory with ``otelcol.yaml``, ``jaeger.yaml``, ``prometheus.yml``, ... and ``rules/``.

    ``$STROMA_STACK_CONFIG_DIR`` > the ``collector/`` directory of the source checkout this module
    is imported from. Raises :class:`StackError` when neither holds ``otelcol.yaml`` (an installed
    wheel does not ship the configuration: run from a checkout or set the variable).
    """
    configured = os.environ.get("STROMA_STACK_CONFIG_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parent.parent / "collector"
    if not (path / "otelcol.yaml").is_file():
        raise StackError(
            f"no stack configuration at {path} (otelcol.yaml missing); run from a Stroma source "
            "checkout or set STROMA_STACK_CONFIG_DIR to its collector/ directory"
        )
    return path


@contextlib.contextmanager
def _stack_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, StackError):
            raise
        raise StackError(f"{what}: {exc}") from exc


def build_collector(manifest: Path | None = None, *, force: bool = False) -> Path:
    """Path of ``otelcol-stroma`` built from *manifest* (default ``collector/builder.yaml``).

    Cached per manifest content and builder version under ``<tools>/otelcol/``; built (holding a
    cross-process lock) only when missing or when *force*. Go caches live under ``<tools>/go``.
    Measured on 2 cores: cold about 3 min (plus about 30 s to install the builder); with the
    module cache but no build cache about 2.5 min; with both caches about 5 s; binary present: no
    work. Raises :class:`StackError` with the build log's tail.
    """
    with _stack_errors("cannot build the collector"):
        return _tools.build_collector(manifest or config_dir() / "builder.yaml", force=force)


def build_jaeger(version: str = JAEGER_VERSION, *, force: bool = False) -> Path:
    """Path of a Jaeger v2 binary for Go module tag *version*, built when missing.

    Cached as ``<tools>/bin/jaeger-<version>``; see :func:`build_collector` for caching and errors.
    """
    with _stack_errors(f"cannot build Jaeger {version}"):
        return _tools.build_jaeger(version, force=force)


def _debian_program(name: str) -> Path:
    with _stack_errors(f"cannot unpack {name} from Debian's packages"):
        return _tools.prometheus_program(name)


def prometheus() -> Path:
    """Path of Debian's ``prometheus`` 2.42, unpacked into the tool cache when missing."""
    return _debian_program("prometheus")


def promtool() -> Path:
    """Path of Debian's ``promtool`` (``check config``, ``check rules``, ``test rules``)."""
    return _debian_program("promtool")


def alertmanager() -> Path:
    """Path of Debian's ``prometheus-alertmanager`` 0.25, with the templates it needs installed."""
    return _debian_program("prometheus-alertmanager")


def amtool() -> Path:
    """Path of Debian's ``amtool`` (``check-config``)."""
    return _debian_program("amtool")


def build_all() -> dict[str, Path]:
    """Build or unpack every program of the stack; returns their paths by name.

    The Go builds run one after the other: each already uses every core.
    """
    return {
        "otelcol": build_collector(),
        "jaeger": build_jaeger(),
        "prometheus": prometheus(),
        "promtool": promtool(),
        "alertmanager": alertmanager(),
        "amtool": amtool(),
    }


# --------------------------------------------------------------------------------------------
# Ports, URLs, processes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackPorts:
    """TCP ports on 127.0.0.1 used by one stack (all bound by the stack's processes)."""

    otlp_grpc: int
    otlp_http: int
    collector_health: int
    collector_metrics: int
    collector_telemetry: int
    jaeger_otlp_grpc: int
    jaeger_otlp_http: int
    jaeger_query_http: int
    jaeger_query_grpc: int
    prometheus: int
    alertmanager: int

    @classmethod
    def defaults(cls) -> StackPorts:
        """The well-known ports (``stack-notes.md``): an app's default OTLP endpoint reaches them."""
        return cls(4317, 4318, 13133, 8889, 18888, 14317, 14318, 16686, 16685, 19090, 19093)

    @classmethod
    def free(cls) -> StackPorts:
        """Ports the kernel reports free now (they could be taken before use; start retries once)."""
        sockets: list[socket.socket] = []
        try:
            for _ in range(len(cls.__dataclass_fields__)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.bind((_LOOPBACK, 0))
                sockets.append(sock)
            return cls(*(sock.getsockname()[1] for sock in sockets))
        finally:
            for sock in sockets:
                sock.close()

    def check_free(self) -> None:
        """Raise :class:`StackError` naming every port that something already listens on.

        Run before starting on fixed ports, so that a readiness probe never mistakes another
        program on the same port for ours.
        """
        busy = []
        for name, port in asdict(self).items():
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # As the Go servers do, so that TIME_WAIT leftovers do not count as busy.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((_LOOPBACK, port))
                except OSError:
                    busy.append(f"{port} ({name})")
        if busy:
            raise StackError(
                f"port(s) already in use on {_LOOPBACK}: {', '.join(busy)}; stop what listens there "
                "(another stack? `python -m stroma.stack down`) or start on free ports"
            )


@dataclass(frozen=True)
class StackInfo:
    """Where a running stack listens (base URLs have no trailing slash)."""

    ports: StackPorts
    run_dir: Path
    webhook_url: str
    host: str = _LOOPBACK

    @property
    def otlp_grpc_endpoint(self) -> str:
        """OTLP/gRPC endpoint for ``OTLPSpanExporter(endpoint=..., insecure=True)``."""
        return f"http://{self.host}:{self.ports.otlp_grpc}"

    @property
    def otlp_http_endpoint(self) -> str:
        """OTLP/HTTP base URL (``OTEL_EXPORTER_OTLP_ENDPOINT``; append ``/v1/traces`` for an exporter)."""
        return f"http://{self.host}:{self.ports.otlp_http}"

    @property
    def jaeger_url(self) -> str:
        """Jaeger query base URL (``/api/services``, ``/api/v3/traces``, ``/api/traces``)."""
        return f"http://{self.host}:{self.ports.jaeger_query_http}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.ports.prometheus}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.host}:{self.ports.alertmanager}"

    @property
    def collector_health_url(self) -> str:
        return f"http://{self.host}:{self.ports.collector_health}/"

    @property
    def collector_metrics_url(self) -> str:
        """The collector's prometheus exporter (what Prometheus scrapes)."""
        return f"http://{self.host}:{self.ports.collector_metrics}/metrics"

    def urls(self) -> dict[str, str]:
        """All endpoints by name, for printing and for the state file."""
        return {
            "otlp_grpc": self.otlp_grpc_endpoint,
            "otlp_http": self.otlp_http_endpoint,
            "jaeger": self.jaeger_url,
            "prometheus": self.prometheus_url,
            "alertmanager": self.alertmanager_url,
            "collector_health": self.collector_health_url,
            "collector_metrics": self.collector_metrics_url,
            "webhook": self.webhook_url,
        }

    def otel_env(self, protocol: str = "grpc") -> dict[str, str]:
        """``OTEL_*`` variables that point an SDK's auto-configuration at this stack's collector."""
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"protocol must be 'grpc' or 'http/protobuf', not {protocol!r}")
        endpoint = self.otlp_grpc_endpoint if protocol == "grpc" else self.otlp_http_endpoint
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}

    def to_json(self) -> dict[str, object]:
        return {"ports": asdict(self.ports), "run_dir": str(self.run_dir), "webhook_url": self.webhook_url}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> StackInfo:
        ports = data["ports"]
        if not isinstance(ports, dict):
            raise StackError("malformed stack state: ports")
        return cls(StackPorts(**ports), Path(str(data["run_dir"])), str(data["webhook_url"]))


@dataclass(frozen=True)
class _Process:
    """A started program, identified by PID and kernel start time (guards against PID reuse)."""

    name: str
    pid: int
    start_ticks: int
    log: Path
    probe_url: str


def _start_ticks(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def _alive(proc: _Process) -> bool:
    """True while *proc* runs. Reaps it if it is our child; a zombie or a reused PID is dead."""
    ours = True
    try:
        done, _ = os.waitpid(proc.pid, os.WNOHANG)
        if done == proc.pid:
            return False
    except ChildProcessError:
        ours = False  # started by another process (`up` in an earlier command), or reaped already
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    if state[state.rfind(")") + 2 :].startswith("Z"):
        # It became a zombie just after the WNOHANG poll: reap our child now (returns at once).
        if ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
        return False
    return _start_ticks(proc.pid) == proc.start_ticks


def _spawn(
    name: str, argv: list[str], env: Mapping[str, str], log: Path, probe_url: str, *, detached: bool
) -> _Process:
    """Start *argv* with stdin from /dev/null and stdout+stderr appended to *log*.

    *detached* starts it in a new session, so it outlives this interpreter and a terminal's
    Ctrl-C; otherwise it stays in our process group.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(argv[0], argv, dict(env), file_actions=actions, setsid=detached)
    except OSError as exc:
        raise StackError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    return _Process(name, pid, _start_ticks(pid) or 0, log, probe_url)


def _stop_processes(procs: Iterable[_Process], timeout: float) -> dict[str, str]:
    """SIGTERM every live process, wait up to *timeout* seconds, then SIGKILL the rest.

    Returns ``{name: "stopped" | "killed" | "not running"}``. Never raises for a process that is
    already gone.
    """
    outcome: dict[str, str] = {}
    live = []
    for proc in procs:
        if _alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            live.append(proc)
        else:
            outcome[proc.name] = "not running"
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        still = []
        for proc in live:
            if _alive(proc):
                still.append(proc)
            else:
                outcome[proc.name] = "stopped"
        live = still
        if live:
            time.sleep(0.05)
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        outcome[proc.name] = "killed"
    kill_deadline = time.monotonic() + 5.0
    while any(_alive(proc) for proc in live) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    return outcome


# Loopback probes must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _probe(url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """GET *url*: ``(True, "")`` on HTTP 200, else ``(False, reason)``."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


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


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------

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
        scrape_interval: Prometheus scrape and rule-evaluation interval in seconds; ``None``
            keeps the value in ``prometheus.yml`` (5 s).
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
        self._procs: list[_Process] = []
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
        return _probe_all(self._procs, self._info)

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
        return _stop_processes(reversed(procs), self._stop_timeout)

    def _start_once(self, binaries: Mapping[str, Path], configs: Path, info: StackInfo) -> None:
        ports = info.ports
        if self._fixed_ports is not None:
            ports.check_free()
        for sub in ("config", "logs", "data/prometheus", "data/alertmanager"):
            (info.run_dir / sub).mkdir(parents=True, exist_ok=True)
        base_env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        loop = _LOOPBACK
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
            self._procs.append(_spawn(name, argv, env, log, probe_url, detached=self._detached))
        self._wait_ready()

    def _write_prometheus_config(self, source: Path, target: Path, rules: Path, ports: StackPorts) -> None:
        replacements = {
            "otel-collector:8889": f"{_LOOPBACK}:{ports.collector_metrics}",
            "otel-collector:8888": f"{_LOOPBACK}:{ports.collector_telemetry}",
            "alertmanager:9093": f"{_LOOPBACK}:{ports.alertmanager}",
            "rules/*.rules.yml": str(rules / "*.rules.yml"),
        }
        if self._scrape_interval is not None:
            interval = _duration(self._scrape_interval)
            replacements["scrape_interval: 5s"] = f"scrape_interval: {interval}"
            replacements["evaluation_interval: 5s"] = f"evaluation_interval: {interval}"
        text = _substitute(source.read_text(encoding="utf-8"), replacements, source)
        target.write_text(text, encoding="utf-8")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        pending = {proc.name: proc for proc in self._procs}
        reasons: dict[str, str] = {}
        while pending:
            for name, proc in list(pending.items()):
                if not _alive(proc):
                    raise StackError(f"{name} exited during start-up; log {proc.log}:\n{log_tail(proc.log)}")
                ready, reasons[name] = _probe(proc.probe_url, timeout=0.5)
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


# --------------------------------------------------------------------------------------------
# Status, and the detached stack behind `stroma stack up|status|down`
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentStatus:
    """One component: its PID, whether the process runs and whether its probe answers 200."""

    name: str
    pid: int
    alive: bool
    healthy: bool
    probe_url: str
    detail: str
    log: Path


@dataclass(frozen=True)
class StackStatus:
    """The stack as probed now. ``running`` is true when every component is healthy."""

    running: bool
    components: dict[str, ComponentStatus] = field(default_factory=dict)
    info: StackInfo | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view (what ``stroma stack status --json`` would print)."""
        return {
            "running": self.running,
            "urls": self.info.urls() if self.info else {},
            "run_dir": str(self.info.run_dir) if self.info else None,
            "components": {name: {**asdict(comp), "log": str(comp.log)} for name, comp in self.components.items()},
        }


def _probe_all(procs: Iterable[_Process], info: StackInfo | None) -> StackStatus:
    components: dict[str, ComponentStatus] = {}
    for proc in procs:
        alive = _alive(proc)
        healthy, detail = _probe(proc.probe_url) if alive else (False, "process not running")
        components[proc.name] = ComponentStatus(
            proc.name, proc.pid, alive, healthy, proc.probe_url, detail or "ready", proc.log
        )
    running = bool(components) and all(comp.healthy for comp in components.values())
    return StackStatus(running, components, info)


def state_file() -> Path:
    """Where :func:`up` records its stack: ``$STROMA_STACK_STATE`` > ``<tools>/stack-state.json``."""
    configured = os.environ.get("STROMA_STACK_STATE")
    return Path(configured) if configured else tools_dir() / "stack-state.json"


def _read_state() -> tuple[StackInfo, list[_Process]] | None:
    path = state_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read the stack state file {path}: {exc}; delete it if stale") from exc
    try:
        info = StackInfo.from_json(data["info"])
        procs = [
            _Process(p["name"], int(p["pid"]), int(p["start_ticks"]), Path(p["log"]), p["probe_url"])
            for p in data["processes"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise StackError(f"malformed stack state file {path} ({exc}); delete it") from exc
    return info, procs


def _write_state(info: StackInfo, procs: Iterable[_Process]) -> None:
    path = state_file()
    data = {
        "version": _STATE_VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "info": info.to_json(),
        "processes": [
            {
                "name": p.name,
                "pid": p.pid,
                "start_ticks": p.start_ticks,
                "log": str(p.log),
                "probe_url": p.probe_url,
            }
            for p in procs
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(partial, path)


def up(
    *,
    free_ports: bool = False,
    webhook_url: str = DEFAULT_WEBHOOK_URL,
    scrape_interval: float | None = None,
    trace_sample_percent: float = 100.0,
    ready_timeout: float = 120.0,
) -> StackStatus:
    """Start a detached stack that keeps running after this process exits; returns its status.

    Uses the well-known ports (:meth:`StackPorts.defaults`: OTLP on 4317/4318, Jaeger on 16686,
    Prometheus on 19090, Alertmanager on 19093) unless *free_ports*. Files go to
    ``<tools>/stack/run-<time>/``. If a stack recorded in :func:`state_file` is already healthy,
    it is returned unchanged; a partly dead one is stopped first. Raises :class:`StackError`.
    """
    current = _read_state()
    if current is not None:
        info, procs = current
        existing = _probe_all(procs, info)
        if existing.running:
            return existing
        _stop_processes(procs, 10.0)
        state_file().unlink(missing_ok=True)
    run_dir = tools_dir() / "stack" / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    stack = Stack(
        ports=None if free_ports else StackPorts.defaults(),
        run_dir=run_dir,
        webhook_url=webhook_url,
        scrape_interval=scrape_interval,
        trace_sample_percent=trace_sample_percent,
        ready_timeout=ready_timeout,
        detached=True,
    )
    info = stack.start()
    _write_state(info, stack._procs)
    return stack.status()


def status() -> StackStatus:
    """Probe the stack recorded by :func:`up`; ``running=False`` with no components if there is none."""
    current = _read_state()
    if current is None:
        return StackStatus(False)
    info, procs = current
    return _probe_all(procs, info)


def down(*, timeout: float = 10.0, remove_files: bool = True) -> dict[str, str]:
    """Stop the stack recorded by :func:`up`, by PID; returns ``{component: outcome}``.

    Outcomes are ``stopped``, ``killed`` (did not exit within *timeout* seconds of SIGTERM) or
    ``not running``; an empty dict means no stack was recorded. Removes the state file and, if
    *remove_files*, the run directory (data and logs).
    """
    current = _read_state()
    if current is None:
        return {}
    info, procs = current
    outcome = _stop_processes(reversed(procs), timeout)
    state_file().unlink(missing_ok=True)
    if remove_files:
        shutil.rmtree(info.run_dir, ignore_errors=True)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """``python -m stroma.stack build|up|status|down``: a minimal front end for scripts and CI."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stroma.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "up", "status", "down"])
    parser.add_argument("--free-ports", action="store_true", help="up: pick free ports")
    parser.add_argument("--webhook-url", default=DEFAULT_WEBHOOK_URL, help="up: Alertmanager receiver")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "build":
            started = time.monotonic()
            for name, path in build_all().items():
                print(f"{name}: {path}")
            print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return 0
        if args.command == "down":
            print(json.dumps(down(), indent=2))
            return 0
        result = up(free_ports=args.free_ports, webhook_url=args.webhook_url) if args.command == "up" else status()
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.running else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
