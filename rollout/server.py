"""An OpenAI-compatible HTTP server over a local model of this project (teacher or student).

    python -m rollout.server --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--api-key-env VAR]
                             [--served-model-name NAME] [--device cpu] [--dtype float32]

The model is served in text mode: prompts are text or token ids, never audio. That is what a
teacher or judge reading transcripts needs: /v1/completions scores supplied token ids with
vLLM's `prompt_logprobs`, so a checkpoint of this project can be a KD teacher, and
/v1/chat/completions applies the Phi-4MM chat template, so it can be a judge. Standard library
only; the model runs one call at a time, a bounded number of requests may wait for it (one more
gets 503), and a request whose client hangs up or that outlives its deadline is cancelled.

Layout: this file is the HTTP layer (routing, auth, body limits, error bodies, the command
line); rollout/server_requests.py validates requests (every field's type and range, the chat
template, deadlines and cancellation); rollout/server_service.py is the model behind the
endpoints (`ModelService`, `load_service`).

Details (endpoints and their wire formats, error statuses, load and cancellation):
docs/server.md.
"""
import argparse
import hmac
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from model.errors import report_error

from .server_requests import ClientGone, RequestError, lone_surrogate, reject_constant
from .server_service import DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT_S, ModelService, load_service

logger = logging.getLogger("rollout.server")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    """Routing, auth, body limits and error bodies; the endpoints live in ModelService."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # answer garbage with a status line, not an HTTP/0.9 bare body
    server_version = "speechsum-server"
    error_content_type = "application/json"

    # set per server by make_server
    service: ModelService
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout = DEFAULT_READ_TIMEOUT_S  # socket timeout for every read and write (StreamRequestHandler)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, oversize headers, ...) as OpenAI-style JSON."""
        self.close_connection = True
        self._reply(code, RequestError(code, message or explain or self.responses.get(code, ("error",))[0]).body())

    def log_request(self, code="-", size="-"):
        pass  # one line per request is written by _dispatch, without headers or query

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        started = time.monotonic()
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        status, retry_after = 500, None
        try:
            status, payload = self._route(method, path)
        except ClientGone:
            self.close_connection = True
            logger.info("%s %s cancelled: the client closed the connection (%.3fs)", method, path,
                        time.monotonic() - started)
            return
        except RequestError as error:
            status, payload, retry_after = error.status, error.body(), error.retry_after
        except Exception:  # a bug must not take the server down: log it, answer 500
            logger.exception("internal error on %s %s", method, path)
            status, payload = 500, RequestError(500, "internal server error; see the server log",
                                                type="server_error").body()
        try:
            self._reply(status, payload, allow="POST" if path.endswith("completions") else "GET",
                        retry_after=retry_after)
        finally:
            logger.info("%s %s %d %.3fs", method, path, status, time.monotonic() - started)

    def _route(self, method: str, path: str) -> tuple[int, dict]:
        if path == "/health":
            return self._only(method, "GET") or (200, {"status": "ok"})
        if not (path == "/v1" or path.startswith("/v1/")):
            raise RequestError(404, f"unknown path {path}; this server has /v1/models, /v1/completions, "
                               "/v1/chat/completions and /health", code="not_found")
        self._authenticate()
        service = self.service
        if path == "/v1/models":
            return self._only(method, "GET") or (200, service.models())
        if path.startswith("/v1/models/"):
            self._only(method, "GET")
            if path[len("/v1/models/"):] != service.model_name:
                raise RequestError(404, f"The model '{path[len('/v1/models/'):]}' does not exist",
                                   code="model_not_found")
            return 200, service.model_card()
        if path in ("/v1/completions", "/v1/chat/completions"):
            self._only(method, "POST")
            body = self._read_json()
            context = service.context(self._client_gone)
            if path == "/v1/completions":
                return 200, service.completions(body, context)
            return 200, service.chat_completions(body, context)
        raise RequestError(404, f"unknown path {path}", code="not_found")

    def _client_gone(self) -> bool:
        """The peer closed the connection: its socket reads as end-of-file (a pipelined next
        request would read as data, not as gone)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            self.close_connection = True
            raise RequestError(405, f"method {method} is not allowed here; use {allowed}", code="method_not_allowed")

    def _authenticate(self) -> None:
        if self.api_key is None:
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required (chunked bodies are not accepted)")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "Content-Length is not an integer") from None
        if length < 0:
            self.close_connection = True
            raise RequestError(400, "Content-Length is negative")
        if length > self.max_body_bytes:
            self.close_connection = True
            raise RequestError(413, f"the body has {length} bytes; this server accepts at most {self.max_body_bytes}",
                               code="request_too_large")
        try:
            raw = self.rfile.read(length)
        except (TimeoutError, OSError):
            self.close_connection = True
            raise RequestError(408, f"the body did not arrive within {self.timeout} s", code="timeout") from None
        if len(raw) != length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(raw)} of {length} bytes")
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=reject_constant)
        except UnicodeDecodeError as error:
            raise RequestError(400, f"the body is not UTF-8 ({error.reason} at byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise RequestError(400, f"the body is not valid JSON: {error.msg} at line {error.lineno} column "
                               f"{error.colno}") from None
        except (ValueError, RecursionError) as error:
            raise RequestError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        where = lone_surrogate(body)
        if where is not None:
            raise RequestError(400, f"'{where[0]}' holds a lone surrogate (\\u{where[1]:04x}), which is not a "
                               "character and cannot be tokenized; send valid Unicode text", param=where[0])
        return body

    def _reply(self, status: int, payload: dict, allow: str | None = None, retry_after: int | None = None) -> None:
        data = json.dumps(payload, allow_nan=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 405 and allow:
                self.send_header("Allow", allow)
            if retry_after is not None:
                self.send_header("Retry-After", str(retry_after))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client went away; nothing else to do


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        """Errors outside a handler's own try (a client that hangs up mid-request): log, keep serving."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.info("%s: connection dropped (%s)", client_address[0], type(error).__name__)
        else:
            logger.exception("error while serving %s", client_address[0])


def make_server(service: ModelService, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> Server:
    """A bound (not yet serving) server; call `serve_forever()` on it, `shutdown()` from another thread."""
    handler = type("BoundHandler", (Handler,), {"service": service, "api_key": api_key,
                                                "max_body_bytes": max_body_bytes, "timeout": read_timeout_s})
    return Server((host, port), handler)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollout.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (config.json, *.safetensors, tokenizer.json or tokenizer.model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed on stdout)")
    parser.add_argument("--api-key-env", default=None,
                        help="name of an environment variable holding the key clients must send as a Bearer token")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: DIR's name)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                        help="seconds a client may stall while sending a request")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help="generation requests running or waiting at once; more are answered 503 + Retry-After")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help="seconds a request may wait and generate before it is cancelled (503); 0: no limit")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.max_queue < 1 or args.request_timeout < 0:
        parser.error(f"--max-queue must be >= 1 and --request-timeout >= 0, got {args.max_queue} and "
                     f"{args.request_timeout}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    if not _is_loopback(args.host) and api_key is None:
        logger.warning("binding %s (not loopback) without --api-key-env: anyone who can reach it can use the model",
                       args.host)
    from model.checkpoint import CheckpointError

    try:
        service = load_service(args.checkpoint, model_name=args.served_model_name, device=args.device,
                               dtype=args.dtype, max_queue=args.max_queue,
                               request_timeout_s=args.request_timeout or None)
    except (CheckpointError, OSError) as error:  # a missing or damaged checkpoint: one line, no traceback
        return report_error("rollout.server", CheckpointError(f"--checkpoint {args.checkpoint}: {error}"))
    server = make_server(service, args.host, args.port, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         read_timeout_s=args.read_timeout)
    host, port = server.server_address[:2]
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM -> KeyboardInterrupt -> clean exit
    print(f"speechsum server: serving {service.model_name} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
