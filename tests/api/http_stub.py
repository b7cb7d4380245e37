"""A scripted OpenAI-like HTTP server for fault tests: real sockets on 127.0.0.1, one thread.

    with StubServer(responder, script=[Reply(429), Reply(500), Reply(delay_s=5), Reply(body=b"{oops")]) as stub:
        ...  # point a client at stub.base_url
        assert len(stub.requests) == 5

Each incoming request is recorded (`StubRequest`: method, path, headers, parsed JSON body).
The first requests are answered by `script`, one Reply each, in order; once the script is used
up, `responder(request)` answers. A Reply with `delay_s` waits that long before answering (a
client with a shorter timeout sees a timeout); `close()` cuts such waits short, so the stub
never holds a test up. `max_in_flight` is the largest number of requests handled at once.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; bytes -> sent as is; None -> an OpenAI-style error for status >= 400
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class StubRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes if not JSON


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up (timeouts, a killed process) are part of the tests


class StubServer:
    def __init__(self, responder: Callable[[StubRequest], Reply] | None = None, script: list[Reply] = ()):
        self.responder = responder or (lambda request: Reply(404))
        self.script = list(script)
        self.requests: list[StubRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                stub._handle(self)

            def do_POST(self):
                stub._handle(self)

            def log_message(self, format, *args):
                pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def count(self, path_suffix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.endswith(path_suffix))

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "StubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        request = StubRequest(handler.command, handler.path, {k.lower(): v for k, v in handler.headers.items()}, body)
        with self._lock:
            self.requests.append(request)
            reply = self.script.pop(0) if self.script else None
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if reply is None:
                reply = self.responder(request)
            if reply.delay_s and self._closing.wait(reply.delay_s):
                return
            payload = reply.body
            if payload is None and reply.status >= 400:
                payload = {"error": {"message": f"stub error {reply.status}", "type": "server_error",
                                     "param": None, "code": None}}
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            handler.send_response(reply.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer
        finally:
            with self._lock:
                self.in_flight -= 1
