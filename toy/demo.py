"""`make demo`: the paper's three stages end to end on the toy world, on CPU.

    python -m toy.demo [--quick] [--work runs/toy] [--out results/toy] [--pretrain]

Every training and evaluation step runs the user's own entry points as subprocesses, with
configs/toy/demo_*.toml (the A100 recipes in configs/phi4mm/ differ in sizes only):

  corpus      toy.corpus.build_corpus (cached; --quick: the "quick" preset)
  models      the pre-training-stage student, the text teacher and the tokenizer: the small
              checkpoints shipped in toy/checkpoints/ (made by `make pretrain-toy`, which
              runs toy/pretrain.py on the demo corpus), or built here with --pretrain
  sft         train.sft on sft.jsonl (references) from the student
  kd          train.kd on kd.jsonl (no references) from SFT, the text teacher local, full vocabulary
  kd_top20    ablation: the same with the teacher behind rollout.server on 127.0.0.1, read through
              the OpenAI-compatible top-20 logprob adapter (kd.teacher = openai:..., kd.top_k = 20)
  kd_weak     ablation: the same with the weak teacher, the student's own backbone in text mode
  pairs       eval.preferences on dpo.jsonl: two samples of the KD student per item, the oracle
              judge (toy/oracle.py) picks, ties dropped
  dpo         train.dpo on those pairs, the KD checkpoint as policy start and reference
  pairs_sft, dpo_sft
              ablation: the same from SFT, without KD (Table 3's "+ DPO")
  eval        eval.run --judge oracle on validation and the three test splits (test_in, test_voices,
              test_shifted) for every stage and ablation, the teacher and the student backbone in
              text mode (`text:DIR`) included; frozen-encoder outputs are cached in WORK/encoder_cache
  report      OUT/REPORT.md, OUT/results.json, OUT/results.png (this module's `write_report`)

Stages run as soon as the ones they need have finished, `--jobs` at a time (default: up to 4,
one per CPU core), each entry point with `--threads` torch threads (default: the cores shared
out, one each on a 2-core laptop). Decoding a small model (most of KD, the preference pairs
and the evaluation) gains little from a second thread, so two such stages side by side on one
thread each finish sooner than one after the other on two; SFT, which every later training
stage needs, runs first and alone, with every core. The evaluation is split the
same way: `eval_NAME` decodes and judges one checkpoint as soon as it exists (into WORK/eval,
eval.run's caches), and the final `eval` stage reads them all back, decoding nothing, to
write the tables. With more than one job, a stage's output goes to WORK/STAGE/log.txt (its
last lines are printed if it fails); with `--jobs 1`, to the terminal.

A stage whose folder holds a `DONE` stamp is skipped, so a rerun reuses finished stages (and a
killed training stage resumes from its last checkpoint, train/loop.py); eval runs every time,
eval.run's own caches re-decoding only checkpoints that changed. WORK/run.json records the
corpus, the models and the mode; a rerun with other inputs is refused (--fresh starts over). Progress: one line per
stage on stdout (plus, with `--jobs 1`, the entry points' own output). Everything is decided before the final
evaluation: the oracle judge, the splits and the hyper-parameters in the configs were fixed on
training losses and the validation split, never on test scores (the test splits are read by the
eval stage only); the report states each claim's outcome as measured.

--quick (the test suite runs it, under 5 minutes on 2 cores) uses the quick corpus preset and a
few steps per stage: it checks that the pipeline runs, not the claims; its report says so.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from model.safeio import atomic_write_text
from rollout.child_server import ServerStartError, serving

from .corpus import PRESETS, TEST_SPLITS, build_corpus
from .report import RUN_FILE, VALIDATION, write_report

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "toy" / "checkpoints"
SERVER_START_SECONDS = 300
EVAL_SPLITS = (VALIDATION, *TEST_SPLITS)  # eval.run's benchmark names, one manifest each in the corpus folder
LOG_FILE = "log.txt"  # a stage's output when several run at once
EVALUATED = {  # eval.run's checkpoint names -> the stage that makes each (None: shipped)
    "teacher_text": None, "student_text": None, "pretrain": None, "sft": "sft", "sft_kd": "kd", "sft_kd_dpo": "dpo",
    "sft_dpo": "dpo_sft", "sft_kd_weak": "kd_weak", "sft_kd_top20": "kd_top20",
}


@dataclass(frozen=True)
class Mode:
    """What differs between the demo and its --quick smoke run."""

    preset: str
    sft: tuple[str, ...] = ()  # extra config overrides per stage
    kd: tuple[str, ...] = ()
    dpo: tuple[str, ...] = ()
    preferences: tuple[str, ...] = ()
    eval_batch: int = 16
    max_new_tokens: int = 160
    quick: bool = False


DEMO = Mode("demo")
QUICK = Mode("quick", sft=("optim.epochs=1.0",), kd=("optim.epochs=0.5", "kd.max_new_tokens=48"),
             dpo=("optim.epochs=1.0",), preferences=("--max-new-tokens", "48"), max_new_tokens=48, quick=True)


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
class Demo:
    work: Path
    out: Path
    mode: Mode
    corpus: Path
    models: Path
    python: str = sys.executable
    jobs: int = 1  # stages at a time
    threads: int | None = None  # torch threads per entry point (None: torch's default)
    timings: dict[str, float] = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local, repr=False)  # this stage's threads

    # -- helpers -------------------------------------------------------------------------------

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

    def train(self, stage: str, folder: Path, start: Path, manifest: Path, *overrides: str) -> None:
        """train.STAGE with configs/toy/demo_STAGE.toml; SFT logs its loss on the validation split
        (data.eval), the measure its epochs were chosen by."""
        config = ROOT / "configs" / "toy" / f"demo_{stage}.toml"
        held_out = (f'data.eval=["{self.corpus / "validation.jsonl"}"]',) if stage == "sft" else ()
        self.call(folder, f"train.{stage}", "--config", str(config), f'model.checkpoint="{start}"',
                  f'data.train=["{manifest}"]', f'run.out_dir="{folder}"',
                  f'data.feature_cache="{self.work / "features"}"', f'model.encoder_cache="{self.encoder_cache}"',
                  *held_out, *getattr(self.mode, stage), *overrides)

    @property
    def encoder_cache(self) -> Path:
        """Frozen-encoder outputs per clip (model/encoder_cache.py), shared by training and eval."""
        return self.work / "encoder_cache"

    # -- stages --------------------------------------------------------------------------------

    def plan(self) -> list[Stage]:
        """Every stage, the chain SFT -> KD -> pairs -> DPO first (the longest), each checkpoint's
        evaluation as soon as it exists, the tables last."""
        models, work = self.models, self.work
        student, teacher = models / "student", models / "teacher"
        sft, kd = work / "sft" / "merged", work / "kd" / "merged"
        stages = [
            Stage("sft", lambda f: self.train("sft", f, student, self.corpus / "sft.jsonl"), solo=True),
            Stage("kd", lambda f: self.train("kd", f, sft, self.corpus / "kd.jsonl", f'kd.teacher="local:{teacher}"'),
                  after=("sft",)),
            Stage("pairs", lambda f: self.preferences(f, kd), after=("kd",)),
            Stage("dpo", lambda f: self.dpo(f, kd, work / "pairs" / "pairs.jsonl"), after=("pairs",)),
            Stage("kd_top20", lambda f: self.kd_through_server(f, sft, teacher), after=("sft",)),
            Stage("kd_weak", lambda f: self.train("kd", f, sft, self.corpus / "kd.jsonl", f'kd.teacher="local:{student}"'),
                  after=("sft",)),
            Stage("pairs_sft", lambda f: self.preferences(f, sft), after=("sft",)),
            Stage("dpo_sft", lambda f: self.dpo(f, sft, work / "pairs_sft" / "pairs.jsonl"), after=("pairs_sft",)),
        ]
        evaluations = [Stage(f"eval_{name}", lambda f, name=name: self.evaluate(f, (name,)),
                             after=() if made_by is None else (made_by,))
                       for name, made_by in EVALUATED.items()]
        by_chain = {"sft_kd_dpo": 0, "sft_kd": 1, "sft": 2}  # the longest chain's evaluations before the others'
        evaluations.sort(key=lambda s: by_chain.get(s.name.removeprefix("eval_"), 3))
        tables = Stage("eval", lambda f: self.evaluate(f, tuple(EVALUATED)), after=tuple(s.name for s in evaluations),
                       always=True)
        return [*stages, *evaluations, tables]

    def run(self) -> Path:
        started = time.perf_counter()
        self.run_stages(self.plan())
        self.timings["all stages, wall clock"] = round(time.perf_counter() - started, 1)
        return write_report(self.work, self.out, self.corpus, self.models, self.timings, quick=self.mode.quick)

    def kd_through_server(self, folder: Path, start: Path, teacher: Path) -> None:
        """KD with the teacher served by rollout.server (loopback, any free port) and read through the
        top-20 logprob API adapter, as a GPT-4o-style endpoint would be."""
        try:
            with self.stage_log(folder) as log, serving(
                    teacher, "--log-level", "WARNING", model_name="toy-teacher", python=self.python,
                    env=self.thread_env(), stderr=log, start_timeout_s=SERVER_START_SECONDS) as (_, base_url):
                self.log(f"kd_top20: teacher served at {base_url}")
                self.train("kd", folder, start, self.corpus / "kd.jsonl", 'kd.teacher="openai:toy-teacher"',
                           f'kd.base_url="{base_url}"', "kd.top_k=20", 'kd.api_key_env=""')
        except ServerStartError as error:
            raise DemoError(str(error)) from None

    def preferences(self, folder: Path, start: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.call(folder, "eval.preferences", "--checkpoint", str(start), "--manifest", str(self.corpus / "dpo.jsonl"),
                  "--judge", "oracle", "--out", str(folder / "pairs.jsonl"), "--seed", "0",
                  "--feature-cache", str(self.work / "features"), "--encoder-cache", str(self.encoder_cache),
                  *self.mode.preferences)

    def dpo(self, folder: Path, start: Path, pairs: Path) -> None:
        """train.dpo on `pairs`; with no pair kept (every sample pair tied), DPO has nothing to learn
        from: the stage is skipped, said in skipped.txt and in the report."""
        if not pairs.exists() or not pairs.read_text(encoding="utf-8").strip():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "skipped.txt").write_text(f"no preference pair kept in {pairs}: every pair tied\n")
            self.log(f"{folder.name}: skipped, the judge kept no pair in {pairs}")
            return
        self.train("dpo", folder, start, pairs)

    def checkpoints(self) -> dict[str, str]:
        """eval.run names -> checkpoint specs, in the report's order."""
        models, work = self.models, self.work
        return {
            "teacher_text": f"text:{models / 'teacher'}",
            "student_text": f"text:{models / 'student'}",
            "pretrain": str(models / "student"),
            "sft": str(work / "sft" / "merged"),
            "sft_kd": str(work / "kd" / "merged"),
            "sft_kd_dpo": str(work / "dpo" / "merged"),
            "sft_dpo": str(work / "dpo_sft" / "merged"),
            "sft_kd_weak": str(work / "kd_weak" / "merged"),
            "sft_kd_top20": str(work / "kd_top20" / "merged"),
        }

    def evaluate(self, folder: Path, names: tuple[str, ...]) -> None:
        """eval.run on validation and the three test splits for the checkpoints `names` that exist
        (a skipped DPO stage leaves none), into WORK/eval: its per-checkpoint caches let several
        of these run side by side and the last one, over every name, decode nothing."""
        present = {name: spec for name, spec in self.checkpoints().items()
                   if name in names and (Path(spec.removeprefix("text:")) / "config.json").exists()}
        if not present:
            folder.mkdir(parents=True, exist_ok=True)
            return
        benchmarks = [f"{split}=jsonl:{self.corpus / f'{split}.jsonl'}" for split in EVAL_SPLITS]
        self.call(folder, "eval.run", "--checkpoint", *(f"{name}={spec}" for name, spec in present.items()),
                  "--benchmark", *benchmarks, "--encoder-cache", str(self.encoder_cache),
                  "--judge", "oracle", "--out", str(self.work / "eval"), "--batch-size", str(self.mode.eval_batch),
                  "--max-new-tokens", str(self.mode.max_new_tokens), "--device", "cpu")


class DemoError(RuntimeError):
    """A demo step that cannot go on; the message says which and what to do."""


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


def check_work_folder(work: Path, inputs: dict) -> None:
    """WORK/run.json records what a run's stages were made from (corpus, models, mode); a rerun
    whose `inputs` differ from the recorded ones would mix stages of two runs, so it is refused."""
    run_file = work / RUN_FILE
    if run_file.exists():
        try:
            before = json.loads(run_file.read_text())
        except ValueError:
            before = None
        if not isinstance(before, dict) or {key: before.get(key) for key in inputs} != inputs:
            raise DemoError(f"{work} holds stages of a run with other inputs ({before} vs {inputs}); "
                            f"pass --fresh to start over or --work to use another folder")


def check_provenance(made: dict, corpus: dict, *, same_pretraining_split: bool = True) -> None:
    """The shipped checkpoints record the corpus they came from (pretrain.json: `corpus_key`,
    seed, generator version, split sizes): they were trained on its `pretrain` split, the
    `teacher` rows of those meetings, SFT references (the teacher's text) and the text-only
    meetings. Meetings are seeded per split and index, so a corpus with the same seed,
    generator version and pre-training split holds those same meetings whatever the sizes of
    its other splits; the demo checks that much (the quick run, whose pre-training split is
    smaller, only seed and generator version). The tokenizer inside the checkpoints is theirs,
    trained on that corpus's text, so a rebuild with `make pretrain-toy` on a corpus of other
    sizes is not byte-identical."""
    names = ("seed", "generator version", "pre-training meetings", "instructions per meeting")
    ours = (corpus["seed"], corpus["generator_version"], corpus["sizes"]["pretrain"], corpus["sizes"]["instructions"])
    theirs = (made.get("corpus_seed"), made.get("generator_version"), made.get("corpus_sizes", {}).get("pretrain"),
              made.get("corpus_sizes", {}).get("instructions"))
    count = len(names) if same_pretraining_split else 2
    if ours[:count] != theirs[:count]:
        raise DemoError(f"the checkpoints in {SHIPPED} were pre-trained with ({', '.join(names[:count])}) = "
                        f"{theirs[:count]}, this corpus has {ours[:count]}; rebuild them with `make pretrain-toy` "
                        f"or pass --pretrain")


def prepare_models(corpus: Path, work: Path, mode: Mode, pretrain: bool, python: str) -> Path:
    """The shipped pre-training-stage checkpoints (`check_provenance`), or (with --pretrain, or
    when none are shipped) checkpoints built here by toy/pretrain.py (--quick: a few steps;
    otherwise a few CPU-hours, see toy/checkpoints/README.md). The quick run reuses the shipped ones on
    its smaller corpus of the same world (same names, phrasings and voices)."""
    provenance = SHIPPED / "pretrain.json"
    if not pretrain and provenance.exists():
        check_provenance(json.loads(provenance.read_text()), json.loads((corpus / "corpus.json").read_text()),
                         same_pretraining_split=not mode.quick)
        return SHIPPED
    target = work / "models"
    if (target / "DONE").exists():
        return target
    print(f"[demo] models: building with toy.pretrain{' --quick' if mode.quick else ''} "
          f"(no shipped checkpoints in {SHIPPED}, or --pretrain)", flush=True)
    command = [python, "-m", "toy.pretrain", "--corpus", str(corpus), "--out", str(target),
               "--work", str(work / "pretrain_work")]
    if mode.quick:
        command.append("--quick")
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise DemoError(f"`{' '.join(command)}` failed; see its output above")
    atomic_write_text(target / "DONE", json.dumps({"seconds": None}) + "\n")
    return target


def parallelism(jobs: int | None, threads: int | None) -> tuple[int, int]:
    """(stages at a time, torch threads each): by default one stage per CPU core this process may
    use, at most 4 (the widest point of the plan after SFT), and the cores shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if jobs is not None and jobs < 1 or threads is not None and threads < 1:
        raise DemoError(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    jobs = jobs or max(1, min(4, cores))
    return jobs, threads or max(1, cores // jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SFT -> on-policy KD -> DPO on the toy spoken-meetings world, on CPU.")
    parser.add_argument("--quick", action="store_true", help="the quick preset and a few steps (a smoke run)")
    parser.add_argument("--work", default=None, help="stage folders (default runs/toy, runs/toy-quick with --quick)")
    parser.add_argument("--out", default=None, help="report folder (default results/toy, results/toy-quick)")
    parser.add_argument("--corpus-root", default="cache/toy", help="where the corpus is generated and cached")
    parser.add_argument("--pretrain", action="store_true",
                        help="build the pre-training-stage checkpoints here instead of using the shipped ones")
    parser.add_argument("--fresh", action="store_true", help="delete the stage folders first (the corpus stays)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="stages at a time (default: one per CPU core, at most 4)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per stage (default: the CPU cores divided by --jobs)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else DEMO
    suffix = "-quick" if args.quick else ""
    work = Path(args.work or f"runs/toy{suffix}").resolve()
    out = Path(args.out or f"results/toy{suffix}").resolve()
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    try:
        from .speech import EspeakMissing

        try:
            corpus = build_corpus(0, PRESETS[mode.preset], args.corpus_root, alias=mode.preset,
                                  log=lambda m: print(m, flush=True)).resolve()
        except EspeakMissing as error:
            raise DemoError(str(error)) from None
        inputs = {"corpus": str(corpus), "pretrain_here": args.pretrain, "quick": mode.quick}
        check_work_folder(work, inputs)
        models = prepare_models(corpus, work, mode, args.pretrain, sys.executable)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / RUN_FILE, json.dumps({**inputs, "models": str(models)}, indent=1) + "\n")
        jobs, threads = parallelism(args.jobs, args.threads)
        demo = Demo(work, out, mode, corpus, models, jobs=jobs, threads=threads)
        demo.log(f"{jobs} stage(s) at a time, {threads} torch thread(s) each")
        report = demo.run()
    except DemoError as error:
        print(f"[demo] error: {error}", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError, subprocess.SubprocessError) as error:  # a damaged cache or run folder
        print(f"[demo] error: {type(error).__name__}: {error}; rerun with --fresh if a run folder is damaged",
              file=sys.stderr)
        return 1
    print(f"[demo] wrote {report} ({time.perf_counter() - started:.0f} s in all)", flush=True)
    print(report.read_text(encoding="utf-8"))
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
