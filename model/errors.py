"""The error boundary every command shares (python -m data.check, train.sft, eval.run, ...).

An error the project raises on purpose (ConfigError, DataError, CheckpointError, NonFiniteLoss,
RetriesExhaustedError, ...) carries a message that says what is wrong, where, and what to do. A
command catches those at its top and prints `PROGRAM: message` on standard error, once: under
torchrun only rank 0 prints (every rank meets the same error). It then exits with status 2, the
status argparse gives a bad command line. A traceback is for bugs, so anything else still shows
one; `SPEECHSUM_DEBUG=1` shows it for the expected errors as well.
"""
from __future__ import annotations

import os
import sys

DEBUG_VARIABLE = "SPEECHSUM_DEBUG"
EXIT_STATUS = 2


def report_error(program: str, error: BaseException, status: int = EXIT_STATUS) -> int:
    """Call inside the `except` block of an expected error: prints it once and returns `status`
    (or re-raises it, traceback and all, with SPEECHSUM_DEBUG=1)."""
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        raise error
    if os.environ.get("RANK", "0") == "0":
        print(f"{program}: {error}", file=sys.stderr, flush=True)
    return status
