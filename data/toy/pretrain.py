"""The toy world's starting checkpoints: tokenizer, the student at its pre-training stage, the text teacher.

    python -m data.toy.pretrain --corpus cache/toy/corpus-<key> --out cache/toy/models [--quick]

The paper starts from Phi-4MM's *pre-training stage*: a text decoder (Phi-4-mini, instruction
tuned) whose speech encoder and projector were aligned to it by large-scale ASR; its KD teacher
is a much stronger text model (GPT-4o in text mode). This script builds the toy stand-ins:

  1. tokenizer  SentencePiece (vocab 512) on `training_texts(corpus)`: training splits only.
  2. student    `model.toy()` sizes. (a) decoder: text-only instruction tuning
                (transcript + instruction -> reference, the prompt of
                rollout.teachers.teacher_prompt_ids) on teacher.jsonl and `--text-meetings`
                text-only meetings, `--student-text` steps: the toy "Phi-4-mini", which in text
                mode is also the weak teacher of the ablation; (b) ASR alignment on
                pretrain.jsonl (one turn per row), encoder + projector trained, decoder frozen,
                `--asr` steps.
  3. teacher    a wider, deeper decoder (hidden 256, 6 layers; its unused encoder is minimal),
                text-only on teacher.jsonl + sft.jsonl + the text-only meetings, `--teacher`
                steps: more capacity and more data, and it reads the transcript, never the audio.

Checkpoints are written with model.save_pretrained plus tokenizer.model, the layout the
recipes read (`model.checkpoint`, `kd.teacher = "local:DIR"`). A step log goes to stderr.
Plain AdamW loops over random batches (seeded); this stage is the toy's substitute for a
pre-trained model, not part of the paper's method, so it does not go through train/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from data.batching import Example, collate
from data.dataset import ManifestDataset
from losses.sft import masked_cross_entropy
from model import SpeechLM, save_pretrained, toy
from model.config import EncoderConfig
from model.tokenizer import config_token_ids, train_sentencepiece
from rollout.teachers import teacher_prompt_ids

from .corpus import text_items, training_texts

VOCAB_SIZE = 512


@dataclasses.dataclass(frozen=True)
class Steps:
    text_meetings: int = 4000  # text-only meetings (data.toy.corpus.text_items) added to the text data
    student_text: int = 1500
    asr: int = 3000
    teacher: int = 3000
    batch_size: int = 16
    lr: float = 2e-3


QUICK = Steps(text_meetings=40, student_text=40, asr=40, teacher=40, batch_size=8)


def student_config(tokenizer):
    return toy(**config_token_ids(tokenizer))


def teacher_config(tokenizer):
    config = toy(**config_token_ids(tokenizer))
    decoder = dataclasses.replace(config.decoder, hidden_size=256, intermediate_size=512, num_layers=6,
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


def _loss(model: SpeechLM, batch) -> torch.Tensor:
    logits = model(batch.input_ids, batch.attention_mask, batch.audio_features, batch.audio_lengths)  # (B, T, V)
    return masked_cross_entropy(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:])


def train(model: SpeechLM, next_batch, steps: int, lr: float, what: str, log) -> float:
    """AdamW on the trainable parameters, linear warm-up (5%) then cosine; returns the last loss."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
    model.train()
    started, average = time.perf_counter(), None
    for step in range(1, steps + 1):
        loss = _loss(model, next_batch())
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


def _text_batches(examples: list[Example], batch_size: int, pad: int, seed: int):
    rng = random.Random(seed)
    return lambda: collate(rng.sample(examples, min(batch_size, len(examples))), pad)


def _save(model: SpeechLM, tokenizer_file: Path, folder: Path) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial)
    shutil.copy2(tokenizer_file, partial / "tokenizer.model")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def build(corpus: Path, out: Path, steps: Steps = Steps(), *, seed: int = 0, log=print) -> dict[str, Path]:
    """Tokenizer, student and teacher checkpoints under `out` (module docstring); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_sentencepiece(training_texts(corpus), out / "tokenizer" / "toy", vocab_size=VOCAB_SIZE)
    pad = tokenizer.pad_token_id

    torch.manual_seed(seed)
    teacher = SpeechLM(teacher_config(tokenizer))
    examples = text_examples(tokenizer, corpus, ("teacher", "sft"), steps.text_meetings)
    train(teacher, _text_batches(examples, steps.batch_size, pad, seed), steps.teacher, steps.lr, "teacher (text)", log)
    _save(teacher, tokenizer.path, out / "teacher")

    torch.manual_seed(seed + 1)
    student = SpeechLM(student_config(tokenizer))
    for parameter in student.encoder.parameters():
        parameter.requires_grad_(False)
    examples = text_examples(tokenizer, corpus, ("teacher",), steps.text_meetings)
    train(student, _text_batches(examples, steps.batch_size, pad, seed + 1), steps.student_text, steps.lr,
          "student decoder (text)", log)

    for name, parameter in student.named_parameters():
        parameter.requires_grad_(not name.startswith("decoder."))
    asr = ManifestDataset.from_manifests([corpus / "pretrain.jsonl"], tokenizer, task="sft",
                                         feature_cache=str(out / "features"))
    rng = random.Random(seed + 2)
    indices = list(range(len(asr.entries)))
    train(student, lambda: asr.load(rng.sample(indices, steps.batch_size)), steps.asr, steps.lr,
          "student ASR (encoder + projector)", log)
    _save(student, tokenizer.path, out / "student")
    return {"tokenizer": tokenizer.path, "student": out / "student", "teacher": out / "teacher"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the toy tokenizer, pre-training-stage student and text teacher.")
    parser.add_argument("--corpus", required=True, help="a folder written by python -m data.toy.corpus")
    parser.add_argument("--out", default="cache/toy/models")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    for field in dataclasses.fields(Steps):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=float if field.name == "lr" else int,
                            default=None, help=f"default {getattr(Steps(), field.name)} ({getattr(QUICK, field.name)} with --quick)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = QUICK if args.quick else Steps()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Steps) if getattr(args, f.name) is not None}
    steps = dataclasses.replace(steps, **overrides)
    paths = build(Path(args.corpus), Path(args.out), steps, seed=args.seed,
                  log=lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
