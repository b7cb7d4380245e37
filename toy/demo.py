"""`make demo`: the paper's three stages end to end on the toy world, on CPU.

    python -m toy.demo [--quick] [--work runs/toy] [--out results/toy] [--pretrain]

Every training and evaluation step runs the user's own entry points as subprocesses (train.sft,
train.kd, eval.preferences, train.dpo, eval.run, rollout.server) with configs/toy/demo_*.toml,
which differ from the A100 recipes in configs/phi4mm/ in sizes only, so the demo exercises what
a user runs. This module is the plan: the stages (SFT, KD, the KD ablations, preference pairs,
DPO with and without KD, the evaluation of every checkpoint), the checks that a rerun uses the
same inputs, and the command line; toy/demo_schedule.py runs the stages, toy/report.py writes
the report. Everything is decided before the final evaluation, which alone reads the test
splits. --quick checks that the pipeline runs, not the claims.

Details (every stage, scheduling, reruns, the report): docs/demo.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from model.safeio import atomic_write_text
from rollout.child_server import ServerStartError, serving

from .corpus import PRESETS, TEST_SPLITS, build_corpus
from .demo_schedule import ROOT, DemoError, Stage, StageRunner
from .report import RUN_FILE, write_report
from .report_tables import VALIDATION

SHIPPED = ROOT / "toy" / "checkpoints"
SERVER_START_SECONDS = 300
EVAL_SPLITS = (VALIDATION, *TEST_SPLITS)  # eval.run's benchmark names, one manifest each in the corpus folder
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


@dataclass
class Demo(StageRunner):
    """The demo's plan on a `StageRunner`: its stages, in order, and what each runs."""

    out: Path
    mode: Mode
    corpus: Path
    models: Path

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
            Stage("kd_weak", lambda f: self.train("kd", f, sft, self.corpus / "kd.jsonl",
                                                  f'kd.teacher="local:{student}"'), after=("sft",)),
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
                  "--feature-cache", str(self.work / "features"),
                  "--judge", "oracle", "--out", str(self.work / "eval"), "--batch-size", str(self.mode.eval_batch),
                  "--max-new-tokens", str(self.mode.max_new_tokens), "--device", "cpu")


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


def shipped_models(pretrain: bool) -> bool:
    """Whether the demo uses the shipped checkpoints; then it needs no pre-training audio (only
    toy.pretrain reads it), and the corpus is built without it."""
    return not pretrain and (SHIPPED / "pretrain.json").exists()


def prepare_models(corpus: Path, work: Path, mode: Mode, pretrain: bool, python: str) -> Path:
    """The shipped pre-training-stage checkpoints (`check_provenance`), or (with --pretrain, or
    when none are shipped) checkpoints built here by toy/pretrain.py (--quick: a few steps;
    otherwise a few CPU-hours, see toy/checkpoints/README.md). The quick run reuses the shipped ones on
    its smaller corpus of the same world (same names, phrasings and voices)."""
    provenance = SHIPPED / "pretrain.json"
    if shipped_models(pretrain):
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
                                  leave_out=("pretrain",) if shipped_models(args.pretrain) else (),
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
