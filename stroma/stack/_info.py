"""Value types describing a stack: the ports it binds, the endpoints it serves, its probed status."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

from stroma.stack._build import StackError

LOOPBACK: Final = "127.0.0.1"


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
                sock.bind((LOOPBACK, 0))
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
                    sock.bind((LOOPBACK, port))
                except OSError:
                    busy.append(f"{port} ({name})")
        if busy:
            raise StackError(
                f"port(s) already in use on {LOOPBACK}: {', '.join(busy)}; stop what listens there "
                "(another stack? `python -m stroma.stack down`) or start on free ports"
            )


@dataclass(frozen=True)
class StackInfo:
    """Where a running stack listens (base URLs have no trailing slash)."""

    ports: StackPorts
    run_dir: Path
    webhook_url: str
    host: str = LOOPBACK

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
