"""A local stand-in for the OpenAI and Anthropic HTTP APIs (stdlib server on 127.0.0.1 only).

It answers ``POST /v1/chat/completions``, ``/v1/embeddings`` and ``/v1/messages`` in the
providers' wire format with the usage scripted for it, and keeps what it reported so a test can
compare Stroma's totals with what "the provider" billed. Scripted failures answer with an HTTP
error status (the client raises, as it would against the real API).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stroma import ContractRegistry, FailureClass, FailurePolicy, ReliabilityContext, RunConfig
from stroma.testing import TelemetryCapture

FAST = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0.0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0.0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
}


def run_ctx(capture: TelemetryCapture, **config: Any) -> ReliabilityContext:
    """A run context recording into *capture*, with fast retry policies."""
    config.setdefault("telemetry", capture.settings)
    config.setdefault("policy_map", FAST)
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


@dataclass
class Served:
    """What the server reported for one answered request."""

    path: str
    model: str
    input_tokens: int
    output_tokens: int
    cache_read: int = 0
    cache_write: int = 0


@dataclass
class Reply:
    """One scripted answer: usage (input tokens include cached ones, as the APIs count them for
    OpenAI; for Anthropic the server splits them as that API does) or an HTTP error status."""

    input_tokens: int = 10
    output_tokens: int = 5
    cache_read: int = 0
    cache_write: int = 0
    model: str | None = None
    status: int = 200
    text: str = "ok"


class FakeAPI:
    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.served: list[Served] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._clients: dict[Any, Any] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, payload = api.answer(self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def client(self, factory: Any, **options: Any) -> Any:
        """A client made by *factory* for this server, closed with it (created once per factory)."""
        made = self._clients.get(factory)
        if made is None:
            made = self._clients[factory] = factory(**options)
        return made

    def close(self) -> None:
        for made in self._clients.values():
            closer = getattr(made, "close", None)
            if closer is not None and not asyncio.iscoroutinefunction(closer):
                closer()
        self.server.shutdown()
        self.server.server_close()

    @property
    def input_tokens(self) -> int:
        return sum(s.input_tokens for s in self.served)

    @property
    def output_tokens(self) -> int:
        return sum(s.output_tokens for s in self.served)

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests += 1
            reply = self.replies.popleft() if self.replies else Reply()
        if reply.status != 200:
            return reply.status, {"error": {"message": "scripted failure", "type": "server_error", "code": None}}
        requested = str(body.get("model", "m"))
        model = reply.model or requested
        with self._lock:
            self.served.append(
                Served(path, model, reply.input_tokens, reply.output_tokens, reply.cache_read, reply.cache_write)
            )
        if path.endswith("/chat/completions"):
            usage: dict[str, Any] = {
                "prompt_tokens": reply.input_tokens,
                "completion_tokens": reply.output_tokens,
                "total_tokens": reply.input_tokens + reply.output_tokens,
            }
            if reply.cache_read:
                usage["prompt_tokens_details"] = {"cached_tokens": reply.cache_read}
            return 200, {
                "id": f"chatcmpl-{self.requests}",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": "stop"}
                ],
                "usage": usage,
            }
        if path.endswith("/embeddings"):
            return 200, {
                "object": "list",
                "model": model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": reply.input_tokens, "total_tokens": reply.input_tokens},
            }
        if path.endswith("/messages"):
            # Anthropic reports uncached input apart from cache reads and writes
            uncached = reply.input_tokens - reply.cache_read - reply.cache_write
            return 200, {
                "id": f"msg_{self.requests}",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": reply.text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": uncached,
                    "output_tokens": reply.output_tokens,
                    "cache_read_input_tokens": reply.cache_read,
                    "cache_creation_input_tokens": reply.cache_write,
                },
            }
        return 404, {"error": {"message": f"no route {path}"}}
