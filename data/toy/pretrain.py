"""The toy world's starting checkpoints: tokenizer, the student at its pre-training stage, the text teacher.

    python -m data.toy.pretrain --corpus cache/toy/demo --out data/toy/checkpoints [--quick]   # make pretrain-toy

The paper starts from Phi-4MM's *pre-training stage*: a text decoder (Phi-4-mini, instruction
tuned) whose speech encoder and projector were aligned to it by large-scale ASR; its KD teacher
is a much stronger text model (GPT-4o in text mode). This script builds the toy stand-ins:

  1. tokenizer  SentencePiece (vocab 512) on `training_texts(corpus)`: training splits only.
  2. student    `model.toy()` sizes, everything trainable, loops whose batches alternate
                between (a) text-only instruction tuning (transcript + instruction -> reference,
                the prompt of rollout.teachers.teacher_prompt_ids) on teacher.jsonl and
                `--text-meetings` text-only meetings: the toy "Phi-4-mini", which in text mode is
                also the weak teacher of the ablation; and (b) ASR, as Phi-4MM's pre-training
                stage aligns its encoder and projector: phase 1 on pretrain.jsonl (one turn, about
                2 s, per row), phase 2 (`--student-long` steps, half the learning rates) on
                windows of 6 consecutive turns (about 10 s, `asr_windows`), long-form
                recognition closer to what a 50 s meeting asks of the decoder.
                `--student-from DIR` runs phase 2 only, from a phase-1 checkpoint.
  3. teacher    a wider decoder (hidden 256; its unused encoder is minimal), text-only on
                teacher.jsonl + sft.jsonl + the text-only meetings: more capacity and more
                data, and it reads the transcript, never the audio.

Two choices make the from-scratch alignment work on a CPU budget (measured on the demo corpus,
400 ASR-only steps of 16 turns, held-out word error 0.80 without (2), 0.49 with it):
  (1) the encoder's feature statistics (`global_mean`, `global_invstd`, buffers of every Phi-4MM
      checkpoint) are set from 300 training clips (toy log-mel: mean about 15, std about 5)
      instead of toy()'s 0 / 1;
  (2) `standardize_audio_embeddings` (model/projector.py): each clip's projected audio minus its
      time mean, over its RMS. Not in Phi-4MM; without it the tiny encoder's output collapses to
      one constant vector and the decoder learns the sentence templates only. The encoder also
      masks padding for real (`mask_padding`), as a model trained from scratch should.
The student ends with a held-out check: word error of greedy transcripts of the last two
pre-training meetings' turns, which it never trains on (printed and written to pretrain.json).

Checkpoints are written with model.save_pretrained plus tokenizer.model (OUT/student,
OUT/teacher; the tokenizer also as OUT/tokenizer.model), and OUT/pretrain.json records the
corpus they came from (its cache key), the steps, the final losses and the ASR check. `make
pretrain-toy` writes the copies the project ships in data/toy/checkpoints/, one process, teacher
then student; the shipped ones were made by two processes in parallel, `--only teacher` and
`--only student`, one CPU thread each: 3060 s and 1332 s, then the student's phase 2 with
`--student-from` (528 s, 2 threads). `make demo` starts from them. The
layout is the one the recipes read (`model.checkpoint`, `kd.teacher = "local:DIR"`). A step log goes to stderr.
Plain AdamW loops over random batches (seeded); this stage is the toy's substitute for a
pre-trained model, not part of the paper's method, so it does not go through train/.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from data.batching import Batch, Example, collate
from data.dataset import ManifestDataset
from losses.sft import masked_cross_entropy
from model import SpeechLM, load_pretrained, save_pretrained, toy
from model.config import EncoderConfig
from model.safeio import atomic_write_text
from model.tokenizer import config_token_ids, train_sentencepiece
from rollout.sampler import SamplingParams, generate
from rollout.teachers import teacher_prompt_ids

from .corpus import text_items, training_texts

VOCAB_SIZE = 512
HELD_OUT_MEETINGS = 2  # the last pre-training meetings: the student's ASR check, never trained on


@dataclasses.dataclass(frozen=True)
class Steps:
    text_meetings: int = 6000  # text-only meetings (data.toy.corpus.text_items) added to the text data
    student: int = 2400  # half ASR batches (single turns), half text batches
    student_long: int = 800  # then: half ASR of windows of WINDOW_TURNS turns, half text
    teacher: int = 1500
    batch_size: int = 16
    lr: float = 2e-3  # decoders
    encoder_lr: float = 5e-3  # the student's encoder and projector


QUICK = Steps(text_meetings=40, student=40, student_long=10, teacher=40, batch_size=8)
WINDOW_TURNS, WINDOW_STRIDE = 6, 3


def student_config(tokenizer):
    config = toy(**config_token_ids(tokenizer))
    return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, mask_padding=True),
                               standardize_audio_embeddings=True)


def teacher_config(tokenizer):
    config = toy(**config_token_ids(tokenizer))
    decoder = dataclasses.replace(config.decoder, hidden_size=256, intermediate_size=640, num_layers=4,
                                  num_heads=8, num_kv_heads=4, head_dim=32)
    encoder = EncoderConfig(hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2, nemo_conv_channels=8,
                            ext_pw_out_channel=32, depthwise_separable_out_channel=32, bias_max_distance=20)
    return dataclasses.replace(config, decoder=decoder, encoder=encoder)


def text_examples(tokenizer, corpus: Path, manifests: tuple[str, ...], text_meetings: int) -> list[Example]:
    """transcript + instruction -> reference, as the text teacher is prompted (no audio): the rows
    of `manifests` plus `text_meetings` text-only meetings of the corpus's seed."""
    triples = []
    for name in manifests:
        for line in (corpus / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            triples.append((row["transcript"], row["instruction"], row["summary"]))
    info = json.loads((corpus / "corpus.json").read_text())
    triples += text_items(info["seed"], text_meetings, info["sizes"]["instructions"])
    return [Example(id=str(i), prompt_ids=teacher_prompt_ids(tokenizer, transcript, instruction),
                    response_ids=tokenizer.encode_response(reference, add_eos=True))
            for i, (transcript, instruction, reference) in enumerate(triples)]


def _loss(model: SpeechLM, batch: Batch) -> torch.Tensor:
    logits = model(batch.input_ids, batch.attention_mask, batch.audio_features, batch.audio_lengths)  # (B, T, V)
    return masked_cross_entropy(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:])


def train(model: SpeechLM, next_batch, steps: int, groups: list[dict], what: str, log) -> float:
    """AdamW (no weight decay) on `groups`, linear warm-up (5%) then cosine, gradient norm
    clipped at 1; `next_batch(step)` gives the batch. Returns the smoothed last loss."""
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
    model.train()
    started, average = time.perf_counter(), None
    for step in range(1, steps + 1):
        loss = _loss(model, next_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        average = value if average is None else 0.95 * average + 0.05 * value
        if step % max(1, steps // 20) == 0 or step == steps:
            log(f"[toy pretrain] {what}: step {step}/{steps} loss {average:.3f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    return average


def set_feature_statistics(model: SpeechLM, clips: list[torch.Tensor]) -> tuple[float, float]:
    """The encoder's per-bin `global_mean` / `global_invstd` from (frames, 80) clips; returns the
    average mean and standard deviation (for the log)."""
    frames = torch.cat(clips)  # (sum frames, 80)
    mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-3)
    embedding = model.encoder.encoder_embedding
    embedding.global_mean.copy_(mean)
    embedding.global_invstd.copy_(1.0 / std)
    return mean.mean().item(), std.mean().item()


def word_error(hypothesis: str, reference: str) -> float:
    """1 - difflib's matching ratio over words: 0 when equal, 1 when nothing matches (a cheap,
    symmetric stand-in for WER, enough to tell an aligned encoder from a collapsed one)."""
    return 1.0 - difflib.SequenceMatcher(None, hypothesis.split(), reference.split()).ratio()


@torch.no_grad()
def asr_check(model: SpeechLM, dataset: ManifestDataset, indices: list[int], tokenizer,
              max_new_tokens: int = 48) -> dict:
    """Greedy transcripts of the held-out turns: mean word error and three examples."""
    batch = dataset.load(indices)
    rollout = generate(model, batch.prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                       audio_features=batch.audio_features, audio_lengths=batch.audio_lengths)
    pairs = [(tokenizer.decode(rollout.tokens[i][rollout.mask[i]].tolist()), example.transcript)
             for i, example in enumerate(batch.examples)]
    return {"turns": len(pairs), "word_error": sum(word_error(h, r) for h, r in pairs) / len(pairs),
            "examples": [{"hypothesis": h, "reference": r} for h, r in pairs[:3]]}


def window_check(student: SpeechLM, corpus: Path, meetings: set[str], tokenizer, feature_cache: str) -> dict:
    """`asr_check` on the WINDOW_TURNS-turn windows of `meetings` (held out from training)."""
    manifest = asr_windows(corpus, Path(feature_cache), lambda meeting: meeting in meetings, name="held-out")
    windows = ManifestDataset.from_manifests([manifest], tokenizer, task="sft", feature_cache=feature_cache)
    return asr_check(student, windows, list(range(min(32, len(windows.entries)))), tokenizer, max_new_tokens=160)


def _save(model: SpeechLM, tokenizer_file: Path, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial)
    shutil.copy2(tokenizer_file, partial / "tokenizer.model")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def build_teacher(tokenizer, corpus: Path, out: Path, steps: Steps, seed: int, log) -> float:
    torch.manual_seed(seed)
    teacher = SpeechLM(teacher_config(tokenizer))
    examples = text_examples(tokenizer, corpus, ("teacher", "sft"), steps.text_meetings)
    rng = random.Random(seed)
    loss = train(teacher, lambda step: collate(rng.sample(examples, min(steps.batch_size, len(examples))),
                                               tokenizer.pad_token_id),
                 steps.teacher, [{"params": list(teacher.decoder.parameters()), "lr": steps.lr}], "teacher (text)", log)
    _save(teacher, tokenizer.path, out / "teacher")
    return loss


def asr_windows(corpus: Path, folder: Path, keep, name: str = "train") -> Path:
    """A manifest of ASR rows spanning WINDOW_TURNS consecutive turns of one meeting (every
    WINDOW_STRIDE turns): offset of the first, up to the end of the last, transcripts joined.
    Long-form recognition over ~10 s clips, closer to what summarising 50 s meetings asks of the
    decoder than single turns (about 2 s). Only the meetings `keep(meeting_id)` accepts; written
    to `folder` (file name with `name`) with absolute audio paths."""
    by_meeting: dict[str, list[dict]] = {}
    for line in (corpus / "pretrain.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if keep(row["meeting_id"]):
            by_meeting.setdefault(row["meeting_id"], []).append(row)
    windows = []
    for meeting, turns in by_meeting.items():
        for start in range(0, max(1, len(turns) - WINDOW_TURNS + 1), WINDOW_STRIDE):
            span = turns[start:start + WINDOW_TURNS]
            text = " ".join(turn["transcript"] for turn in span)
            end = span[-1]["offset"] + span[-1]["duration"]
            windows.append({**span[0], "id": f"{meeting}/w{start:02d}", "audio_filepath": str(corpus.resolve() / span[0]["audio_filepath"]),
                            "duration": round(end - span[0]["offset"], 4), "transcript": text, "summary": text})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"asr_windows-{name}-{corpus.resolve().name}.jsonl"
    atomic_write_text(path, "".join(json.dumps(w, sort_keys=True) + "\n" for w in windows))
    return path


def build_student(tokenizer, corpus: Path, out: Path, steps: Steps, seed: int, log,
                  feature_cache: str = "cache/toy/features", start_from: Path | None = None) -> dict:
    """Phase 1 (`steps.student`): single-turn ASR alternating with text; phase 2
    (`steps.student_long`, half the learning rates): ASR of `asr_windows` alternating with text.
    `start_from`: a phase-1 student checkpoint; phase 1 and the feature statistics are skipped."""
    torch.manual_seed(seed + 1)
    student = SpeechLM(student_config(tokenizer)) if start_from is None else load_pretrained(start_from)
    texts = text_examples(tokenizer, corpus, ("teacher",), steps.text_meetings)
    asr = ManifestDataset.from_manifests([corpus / "pretrain.jsonl"], tokenizer, task="sft",
                                         feature_cache=feature_cache)
    meetings = sorted({entry.extra.get("meeting_id", "") for entry in asr.entries})
    held_meetings = set(meetings[-HELD_OUT_MEETINGS:]) if len(meetings) > HELD_OUT_MEETINGS else set()
    held = [i for i, entry in enumerate(asr.entries) if entry.extra.get("meeting_id") in held_meetings]
    trained = sorted(set(range(len(asr.entries))) - set(held))
    checked = held or trained  # a corpus too small to hold meetings out is checked on training turns
    rng = random.Random(seed + 2)
    if start_from is None:
        clips = [asr.load([i]).audio_features[0] for i in rng.sample(trained, min(300, len(trained)))]
        mean, std = set_feature_statistics(student, clips)
        log(f"[toy pretrain] feature statistics from {len(clips)} clips: log-mel mean {mean:.2f}, std {std:.2f}")

    def alternate(audio_rows: ManifestDataset, indices: list[int]):
        def next_batch(step: int) -> Batch:  # a corpus smaller than a batch gives smaller batches
            if step % 2:
                return audio_rows.load(rng.sample(indices, min(steps.batch_size, len(indices))))
            return collate(rng.sample(texts, min(steps.batch_size, len(texts))), tokenizer.pad_token_id)
        return next_batch

    decoder = list(student.decoder.parameters())
    audio = [p for name, p in student.named_parameters() if not name.startswith("decoder.")]
    loss = None
    if start_from is None:
        loss = train(student, alternate(asr, trained), steps.student, [{"params": decoder, "lr": steps.lr},
                                                                        {"params": audio, "lr": steps.encoder_lr}],
                     "student (ASR + text)", log)
    if steps.student_long:
        windows = ManifestDataset.from_manifests(
            [asr_windows(corpus, Path(feature_cache), lambda meeting: meeting not in held_meetings)], tokenizer,
            task="sft", feature_cache=feature_cache)
        loss = train(student, alternate(windows, list(range(len(windows.entries)))), steps.student_long,
                     [{"params": decoder, "lr": steps.lr / 2}, {"params": audio, "lr": steps.encoder_lr / 2}],
                     f"student (ASR of {WINDOW_TURNS}-turn windows + text)", log)
    check = {**asr_check(student, asr, checked[:32], tokenizer), "held_out": bool(held)}
    log(f"[toy pretrain] student ASR on {check['turns']} {'held-out' if held else 'training'} turns: "
        f"word error {check['word_error']:.2f}")
    if steps.student_long and held:
        check["windows"] = window_check(student, corpus, held_meetings, tokenizer, feature_cache)
        log(f"[toy pretrain] student ASR on {check['windows']['turns']} held-out {WINDOW_TURNS}-turn windows: "
            f"word error {check['windows']['word_error']:.2f}")
    _save(student, tokenizer.path, out / "student")
    return {"loss": loss, "asr": check}


def build(corpus: Path, out: Path, steps: Steps = Steps(), *, seed: int = 0, log=print,
          which: tuple[str, ...] = ("teacher", "student"), feature_cache: str = "cache/toy/features",
          student_from: Path | None = None) -> dict[str, Path]:
    """Tokenizer, student and teacher checkpoints under `out` (module docstring); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_sentencepiece(training_texts(corpus), out / "tokenizer", vocab_size=VOCAB_SIZE)
    info = json.loads((corpus / "corpus.json").read_text())
    summary = {"corpus_key": corpus.resolve().name, "corpus_seed": info["seed"],
               "generator_version": info["generator_version"], "corpus_sizes": info["sizes"],
               "steps": dataclasses.asdict(steps), "seed": seed}
    if "teacher" in which:
        started = time.perf_counter()
        summary["teacher"] = {"loss": build_teacher(tokenizer, corpus, out, steps, seed, log),
                              "seconds": round(time.perf_counter() - started)}
    if "student" in which:
        started = time.perf_counter()
        summary["student"] = build_student(tokenizer, corpus, out, steps, seed, log, feature_cache, student_from)
        if student_from is not None:
            summary["student"]["phase_1_from"] = str(student_from)
        summary["student"]["seconds"] = round(time.perf_counter() - started)
    previous = out / "pretrain.json"
    merged = json.loads(previous.read_text()) if previous.exists() else {}
    if merged.get("corpus_key") != summary["corpus_key"]:  # another corpus: nothing of the old record holds
        merged = {}
    merged.update(summary)
    atomic_write_text(previous, json.dumps(merged, indent=1))
    return {"tokenizer": tokenizer.path, "student": out / "student", "teacher": out / "teacher"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the toy tokenizer, pre-training-stage student and text teacher.")
    parser.add_argument("--corpus", required=True, help="a folder written by python -m data.toy.corpus")
    parser.add_argument("--out", default="cache/toy/models")
    parser.add_argument("--feature-cache", default="cache/toy/features", help="log-mel cache of the ASR clips")
    parser.add_argument("--student-from", default=None,
                        help="a phase-1 student checkpoint: run the student's phase 2 (long windows) only")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (smoke test)")
    parser.add_argument("--only", choices=("teacher", "student"), default=None, help="build one model (default both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for field in dataclasses.fields(Steps):
        kind = float if field.name.endswith("lr") else int
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None,
                            help=f"default {getattr(Steps(), field.name)} ({getattr(QUICK, field.name)} with --quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = QUICK if args.quick else Steps()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Steps) if getattr(args, f.name) is not None}
    steps = dataclasses.replace(steps, **overrides)
    paths = build(Path(args.corpus), Path(args.out), steps, seed=args.seed,
                  log=lambda message: print(message, file=sys.stderr, flush=True),
                  which=(args.only,) if args.only else ("teacher", "student"), feature_cache=args.feature_cache,
                  student_from=Path(args.student_from) if args.student_from else None)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
