"""`python -m rollout.server` as a child process: what the toy demo's top-20 KD stage and the
server tests both need. The server binds loopback on a free port and prints its base URL as the
first line of stdout; `serving` waits for that line, yields the URL and always terminates the
child (SIGTERM, then SIGKILL after `stop_timeout_s`)."""
from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import IO, Iterator

ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The child did not print its URL in time (it died, or is still loading)."""


@contextlib.contextmanager
def serving(checkpoint: str | Path, *flags: str, model_name: str, python: str = sys.executable,
            stderr: IO | None = None, env: dict[str, str] | None = None, start_timeout_s: float = 300.0,
            stop_timeout_s: float = 30.0) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run the server over `checkpoint` with `flags`; yields (process, base URL like
    http://127.0.0.1:PORT/v1). `stderr`: where its log goes (default: inherited)."""
    process = subprocess.Popen(
        [python, "-m", "rollout.server", "--checkpoint", str(checkpoint), "--port", "0",
         "--served-model-name", model_name, *flags],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], start_timeout_s)
        line = process.stdout.readline() if ready else ""
        if " at http://" not in line:
            raise ServerStartError(f"rollout.server did not start within {start_timeout_s:g} s (said "
                                   f"{line.strip()!r}); run it by hand to see why: python -m rollout.server "
                                   f"--checkpoint {checkpoint}")
        yield process, line.strip().split(" at ", 1)[1]
    finally:
        process.terminate()
        try:
            process.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
