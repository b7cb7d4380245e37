"""`python -m rollout.server` as a child process for the server tests, and raw-socket helpers for
requests no client library would send."""
from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_server(checkpoint, log_path: Path, *flags: str, env: dict | None = None):
    """The server on a free port, its stderr in `log_path`; yields (process, base URL) and always
    terminates it."""
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "rollout.server", "--checkpoint", str(checkpoint), "--port", "0",
         "--served-model-name", "tiny", *flags],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE, stderr=log)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline().decode() if ready else ""
        assert line.startswith("speechsum server: serving tiny at http://127.0.0.1:"), (
            line + log_path.read_text(errors="replace")[-3000:])
        yield process, line.split(" at ")[1].strip()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


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
