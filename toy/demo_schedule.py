"""The toy demo's stage scheduler: each stage runs once the stages it needs have finished, up to
`jobs` at a time, and is stamped DONE so a rerun reuses it.

Why stages run side by side: decoding a small model (most of KD, the preference pairs and the
evaluation) gains little from a second thread, so two such stages on one thread each finish
sooner than one after the other on two; a `solo` stage (SFT, which every later stage needs) runs
alone with every core. Each stage runs entry points as subprocesses with its share of torch
threads; with several jobs their output goes to WORK/STAGE/log.txt, whose last lines are shown
when a stage fails. The demo's plan of stages: toy/demo.py; the whole run: docs/demo.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from model.safeio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]  # entry points run from the repository root
LOG_FILE = "log.txt"  # a stage's output when several run at once


class DemoError(RuntimeError):
    """A demo step that cannot go on; the message says which and what to do."""


@dataclass(frozen=True)
class Stage:
    """One stage of the run: `run(folder)` once every stage named in `after` has finished.
    `always`: run even when its DONE stamp exists (an entry point that caches its own work).
    `solo`: run with nothing beside it and `jobs * threads` torch threads."""

    name: str
    run: Callable[[Path], None]
    after: tuple[str, ...] = ()
    always: bool = False
    solo: bool = False  # runs alone, with every core's threads (a stage everything else waits for)


@dataclass
class StageRunner:
    """Runs stages in folders under `work` (`run_stages`) and entry points inside them (`call`),
    with this stage's torch threads; toy/demo.py's `Demo` is the plan built on it."""

    work: Path
    python: str = field(default=sys.executable, kw_only=True)
    jobs: int = field(default=1, kw_only=True)  # stages at a time
    threads: int | None = field(default=None, kw_only=True)  # torch threads per entry point (None: torch's default)
    timings: dict[str, float] = field(default_factory=dict, kw_only=True)
    _local: threading.local = field(default_factory=threading.local, repr=False, kw_only=True)  # this stage's threads

    def log(self, message: str) -> None:
        print(f"[demo] {message}", flush=True)

    def stage(self, name: str, run, *, always: bool = False, threads: int | None = None) -> Path:
        """Run `run(folder)` unless folder/DONE holds a finished stamp (or `always`: a stage whose
        entry point caches its own work, like eval.run, runs every time and redoes only what
        changed); stamp DONE (atomically) with the wall time. `threads`: this stage's torch
        threads (default `self.threads`)."""
        self._local.threads = threads or self.threads
        folder = self.work / name
        done = folder / "DONE"
        seconds = _stamp_seconds(done)
        if seconds is not None and not always:
            self.timings[name] = seconds
            self.log(f"{name}: done before, reused ({folder})")
            return folder
        self.log(f"{name}: running" + (f" (log: {folder / LOG_FILE})" if self.jobs > 1 else ""))
        started = time.perf_counter()
        run(folder)
        last = round(time.perf_counter() - started, 1)
        first = _stamp_seconds(done)  # an `always` stage keeps its first run's time (the report's wall time)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(done, json.dumps({"seconds": last if first is None else first, "last_seconds": last}) + "\n")
        self.timings[name] = last if first is None else first
        self.log(f"{name}: finished in {last:.0f} s")
        return folder

    def run_stages(self, stages: list[Stage]) -> None:
        """Run `stages`, up to `self.jobs` at a time, each as soon as the stages it needs are done;
        among the ready ones, list order first (the longest chain is listed first). A `solo`
        stage waits until nothing runs, then runs alone with every core's threads. After a
        failure nothing new starts; the running stages finish, then the first error is raised."""
        pending, finished, errors = list(stages), set(), []
        solo_threads = self.jobs * self.threads if self.threads else None
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            running = {}
            while True:
                ready = [s for s in pending if set(s.after) <= finished] if not errors else []
                for stage in ready:
                    if len(running) >= self.jobs or any(s.solo for s in running.values()):
                        break
                    if stage.solo and running:
                        break  # list order: nothing jumps ahead of a solo stage that waits for the others
                    pending.remove(stage)
                    threads = solo_threads if stage.solo else None
                    running[pool.submit(self.stage, stage.name, stage.run, always=stage.always,
                                        threads=threads)] = stage
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    stage = running.pop(future)
                    try:
                        future.result()
                        finished.add(stage.name)
                    except Exception as error:  # noqa: BLE001 - re-raised below, once the others finish
                        errors.append(error)
        if errors:
            raise errors[0]
        if pending:  # a bug in the plan: a stage waits for one that does not exist
            raise RuntimeError(f"stages never started: {[s.name for s in pending]}")

    def thread_env(self) -> dict[str, str]:
        """OMP/MKL thread counts for this stage's processes (empty: torch's default)."""
        threads = getattr(self._local, "threads", None) or self.threads
        return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}

    @contextlib.contextmanager
    def stage_log(self, folder: Path):
        """folder/log.txt opened for appending when several stages run at once; else None (the terminal)."""
        if self.jobs == 1:
            yield None
            return
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOG_FILE, "a", encoding="utf-8") as log:
            yield log

    def call(self, folder: Path, module: str, *args: str) -> None:
        """`python -m module args` from the repository root, with this stage's torch threads;
        with several jobs its output is appended to folder/log.txt."""
        command = [self.python, "-m", module, *args]
        env = {**os.environ, **self.thread_env()}
        with self.stage_log(folder) as log:
            if log is not None:
                log.write(f"$ {' '.join(command)}\n")
                log.flush()
            result = subprocess.run(command, cwd=ROOT, env=env, stdout=log,
                                    stderr=None if log is None else subprocess.STDOUT)
        if result.returncode != 0:
            raise DemoError(f"`{' '.join(command)}` failed with exit status {result.returncode}"
                            f"{_log_tail(folder / LOG_FILE) if self.jobs > 1 else ''}; fix the cause "
                            f"and rerun: finished stages are reused")


def _log_tail(log: Path, lines: int = 25) -> str:
    """The last `lines` lines of a stage's log, for an error message."""
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"; the end of {log}:\n" + "\n".join(f"    {line}" for line in tail) + "\n"


def _stamp_seconds(done: Path) -> float | None:
    """The seconds in a DONE stamp; None when it is missing or unreadable (a torn write: not done)."""
    try:
        return float(json.loads(done.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
