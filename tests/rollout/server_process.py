"""The server as a child process for its tests (rollout.child_server, its log in a file), and
raw-socket helpers for requests no client library would send."""
from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from rollout.child_server import serving

@contextlib.contextmanager
def running_server(checkpoint, log_path: Path, *flags: str, env: dict | None = None):
    """The server on a free port, its stderr in `log_path`; yields (process, base URL)."""
    with open(log_path, "w") as log, serving(checkpoint, *flags, model_name="tiny", stderr=log, start_timeout_s=60,
                                             stop_timeout_s=10, env={"OMP_NUM_THREADS": "1", **(env or {})}) as served:
        assert served[1].startswith("http://127.0.0.1:"), served[1]  # loopback unless told otherwise
        yield served


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def raw_exchange(url, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send raw bytes, return whatever the server answers before closing or `wait_s` passes."""
    with socket.create_connection(address(url), timeout=wait_s) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks)


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
