"""The toy world's starting checkpoints: tokenizer, text teacher, speech encoder, and the student
at its pre-training stage.

Kept in one module: its four parts are one resumable procedure sharing a training loop and checks.

    python -m toy.pretrain --corpus cache/toy/demo --out toy/checkpoints [--quick]   # make pretrain-toy
    python -m toy.pretrain ... --only teacher|encoder|student                      # one part

The paper starts from Phi-4MM's *pre-training stage*: a text decoder whose speech encoder and
projector were aligned to it by large-scale ASR, and its KD teacher is a much stronger text
model. This script builds the toy stand-ins, in order: a SentencePiece tokenizer on the
training splits, a wider text-only teacher, the student's Conformer trained alone as a CTC
recognizer (toy/encoder_ctc.py), then the student (that encoder frozen; projector and decoder
on ASR spans and text instruction tuning). Each is checked on the validation splits (word error,
the oracle judge's scores) and recorded in OUT/pretrain.json. Plain seeded AdamW loops that
checkpoint under `--work` and resume, so a killed run goes on where it stopped; this stage is
the toy's substitute for a pre-trained model, not part of the paper's method, so it does not go
through train/. How the shipped ones were made: toy/checkpoints/README.md.

Details (each part, the checks, the two choices carried over from the first toy student):
docs/toy-world.md ("The starting checkpoints").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from data.batching import Batch, Example, collate
from losses.sft import masked_cross_entropy
from model import SpeechLM, load_pretrained, save_pretrained, toy
from model.config import EncoderConfig
from model.safeio import atomic_write_text, replace_directory
from model.tokenizer import config_token_ids, load_tokenizer, train_sentencepiece
from rollout.sampler import SamplingParams, generate
from rollout.teachers import teacher_prompt_ids

from .corpus import ASR_INSTRUCTION, CorpusIncomplete, require_rendered, text_items, text_stream, training_texts
from .encoder_ctc import (CTCRecognizer, CTCSteps, MeetingAudio, asr_report, build_encoder, load_meetings, max_turns_at,
                          sample_span)
from .loop_state import load_state, save_state, warmup_cosine

VOCAB_SIZE = 512


@dataclasses.dataclass(frozen=True)
class Steps:
    text_meetings: int = 6000  # text-only meetings (toy.corpus.text_items) added to the text data
    encoder: int = 2400  # CTC steps of the encoder alone (toy/encoder_ctc.py)
    asr_frames: int = 6000  # log-mel frames (60 s of audio) per ASR batch of the encoder's CTC training
    student_asr_frames: int = 12000  # log-mel frames (120 s) per ASR batch of the student (cut from encoder states)
    student: int = 1200  # two ASR batches (spans of turns up to whole meetings) to one text batch
    teacher: int = 1500
    teacher_stream_from: int = 0  # > 0: the teacher reads never-repeated text meetings from this index (toy.corpus.text_stream)
    batch_size: int = 16  # text rows per text batch
    lr: float = 2e-3  # decoders
    encoder_lr: float = 2e-3  # the encoder's CTC training


QUICK = Steps(text_meetings=40, encoder=20, asr_frames=1500, student_asr_frames=1500, student=20, teacher=20,
              batch_size=4)


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
    return teacher_rows(tokenizer, triples)


def teacher_rows(tokenizer, triples: list[tuple[str, str, str]]) -> list[Example]:
    """(transcript, instruction, reference) -> the teacher's prompt and response ids."""
    return [Example(id=str(i), prompt_ids=teacher_prompt_ids(tokenizer, transcript, instruction),
                    response_ids=tokenizer.encode_response(reference, add_eos=True))
            for i, (transcript, instruction, reference) in enumerate(triples)]


def _loss(model: SpeechLM, batch: Batch) -> torch.Tensor:
    logits = model(batch.input_ids, batch.attention_mask, batch.audio_features, batch.audio_lengths)  # (B, T, V)
    return masked_cross_entropy(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask[:, 1:])


def train(model: SpeechLM, next_batch, steps: int, groups: list[dict], what: str, log, *,
          rng: random.Random | None = None, work: Path | None = None, save_every: int = 50) -> float:
    """AdamW (no weight decay) on `groups`, linear warm-up (5%) then cosine, gradient norm
    clipped at 1; `next_batch(step)` gives the batch (drawing from `rng`). Returns the smoothed
    last loss. With `work`, the model, optimizer, schedule, `rng` and step are saved there every
    `save_every` steps (atomically) and a run finds and resumes them: a run killed at any moment
    loses at most `save_every` steps."""
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    start, average = 0, None
    state_file = None if work is None else work / "state.pt"
    state = None if state_file is None else load_state(state_file, model, optimizer, schedule, rng)
    if state is not None:
        start, average = int(state["step"]), state["average"]
        log(f"[toy pretrain] {what}: resumed at step {start} from {state_file}")
    model.train()
    started = time.perf_counter()
    for step in range(start + 1, steps + 1):
        loss = _loss(model, next_batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        average = value if average is None else 0.95 * average + 0.05 * value
        if step % max(1, steps // 20) == 0 or step == steps:
            log(f"[toy pretrain] {what}: step {step}/{steps} loss {average:.3f} "
                f"({time.perf_counter() - started:.0f} s)")
        if state_file is not None and (step % save_every == 0 or step == steps):
            save_state(state_file, model, optimizer, schedule, rng, step, average=average)
    model.eval()
    return average


@torch.no_grad()
def text_quality(model: SpeechLM, tokenizer, rows: list[dict], *, batch_size: int = 16,
                 max_new_tokens: int = 192) -> dict:
    """The oracle judge's view of `model` reading each row's transcript (the teacher prompt),
    greedy: mean score, share at the floor 1.0, hallucination rate, fact recall."""
    from .oracle import OracleJudge

    judge, outputs = OracleJudge(), []
    for i in range(0, len(rows), batch_size):
        prompts = [torch.tensor(teacher_prompt_ids(tokenizer, row["transcript"], row["instruction"]))
                   for row in rows[i:i + batch_size]]
        rollout = generate(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
        outputs += [tokenizer.decode(rollout.tokens[j][rollout.mask[j]].tolist()) for j in range(len(prompts))]
    scores = [judge.details(row["judge_source"], row["instruction"], text) for row, text in zip(rows, outputs)]
    count = len(scores)
    if not count:
        return {"rows": 0}
    return {"rows": count, "score": sum(s.overall for s in scores) / count,
            "floor": sum(s.overall == 1.0 for s in scores) / count,
            "hallucination": sum(s.hallucination for s in scores) / count,
            "recall": sum(s.recall for s in scores) / count,
            "example": {"instruction": rows[0]["instruction"], "output": outputs[0], "reference": rows[0]["summary"]}}


def read_rows(corpus: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (corpus / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def _save(model: SpeechLM, tokenizer_file: Path, folder: Path) -> None:
    """The checkpoint and its tokenizer.model, built beside `folder` and swapped in whole."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial)
    shutil.copy2(tokenizer_file, partial / "tokenizer.model")
    replace_directory(partial, folder)


def build_teacher(tokenizer, corpus: Path, out: Path, steps: Steps, seed: int, log, work: Path,
                  start_from: Path | None = None) -> dict:
    """The text teacher: `teacher_config`, text-only on teacher.jsonl + sft.jsonl + the text-only
    meetings; `start_from` continues a teacher checkpoint (same tokenizer) instead of a fresh one.
    Checked on the validation split (`text_quality`)."""
    torch.manual_seed(seed)
    teacher = SpeechLM(teacher_config(tokenizer)) if start_from is None else load_pretrained(start_from)
    rng = random.Random(seed)
    if steps.teacher_stream_from:  # batch_size rows of fresh text meetings per step
        info = json.loads((corpus / "corpus.json").read_text())
        per_meeting = info["sizes"]["instructions"]
        stream = text_stream(info["seed"], steps.teacher_stream_from, max(1, steps.batch_size // per_meeting), per_meeting)
        next_batch = lambda step: collate(teacher_rows(tokenizer, stream(step)), tokenizer.pad_token_id)  # noqa: E731
    else:
        examples = text_examples(tokenizer, corpus, ("teacher", "sft"), steps.text_meetings)
        next_batch = lambda step: collate(rng.sample(examples, min(steps.batch_size, len(examples))),  # noqa: E731
                                          tokenizer.pad_token_id)
    loss = train(teacher, next_batch,
                 steps.teacher, [{"params": list(teacher.decoder.parameters()), "lr": steps.lr}], "teacher (text)", log,
                 rng=rng, work=work / "teacher")
    _save(teacher, tokenizer.path, out / "teacher")
    record = {"loss": loss, "validation": text_quality(teacher, tokenizer, read_rows(corpus, "validation"))}
    log(f"[toy pretrain] teacher on validation: {_brief(record['validation'])}")
    return record


def _brief(quality: dict) -> str:
    if not quality.get("rows"):
        return "no validation rows"
    return (f"score {quality['score']:.2f}, floor {quality['floor']:.2f}, "
            f"hallucination {quality['hallucination']:.2f}, "
            f"recall {quality['recall']:.2f}")


def asr_example(tokenizer, features: torch.Tensor, text: str, num_audio_tokens) -> Example:
    """An ASR row: the clip, `ASR_INSTRUCTION`, the words as the response."""
    prompt = tokenizer.build_chat_prompt(ASR_INSTRUCTION, [num_audio_tokens(features.shape[0])])
    return Example(id="asr", prompt_ids=prompt.prompt_ids, response_ids=tokenizer.encode_response(text, add_eos=True),
                   features=features.float(), instruction=ASR_INSTRUCTION, transcript=text)


def decoder_asr(student: SpeechLM, tokenizer, max_new_tokens: int = 400, batch_size: int = 8):
    """`transcribe(clips) -> texts` by the student's greedy decoding (the ASR prompt), at most
    16 + (encoder frames) / 2 new tokens per clip (this world's speech gives about 0.37 pieces
    per 80 ms frame) and never more than `max_new_tokens`."""
    frames = student.encoder.num_output_frames

    @torch.no_grad()
    def transcribe(clips: list[torch.Tensor]) -> list[str]:
        texts = []
        for i in range(0, len(clips), batch_size):
            rows = [asr_example(tokenizer, clip, "", frames) for clip in clips[i:i + batch_size]]
            batch = collate(rows, tokenizer.pad_token_id)
            budget = min(max_new_tokens, 16 + max(frames(clip.shape[0]) for clip in clips[i:i + batch_size]) // 2)
            rollout = generate(student, batch.prompts, SamplingParams(max_new_tokens=budget, temperature=0.0),
                               audio_features=batch.audio_features, audio_lengths=batch.audio_lengths)
            texts += [tokenizer.decode(rollout.tokens[j][rollout.mask[j]].tolist()) for j in range(len(rows))]
        return texts
    return transcribe


class EncodedClips:
    """Stands in for `model.encoder_cache` while the student aligns: the clips handed to the
    model are already the frozen encoder's states (frames / 8, D_enc), so `SpeechLM.embed` takes
    them as they are (projector, standardization and decoder run as always)."""

    def encode(self, encoder, states: torch.Tensor, lengths: torch.Tensor | None, *, mask_padding: bool):
        if lengths is None:
            lengths = torch.full((states.shape[0],), states.shape[1], dtype=torch.long, device=states.device)
        return states, lengths


@torch.no_grad()
def encode_meetings(encoder, meetings: list[MeetingAudio]) -> list[MeetingAudio]:
    """Each whole meeting through the frozen encoder once: its states (frames / 8, D_enc) float32,
    with the turn bounds moved to state frames, as a MeetingAudio (so `sample_span` cuts spans
    of states as it cuts spans of log-mel). A span then keeps the context the encoder saw around
    it in the whole meeting, which is what SFT, KD and DPO give the student."""
    encoded = []
    for meeting in meetings:
        frames = meeting.features.shape[0]
        states, counts = encoder(meeting.features.float()[None], torch.tensor([frames]), mask_padding=True)
        count = int(counts[0])
        scale = count / frames
        turns = [(min(count - 1, int(start * scale)), min(count, math.ceil(end * scale)), text)
                 for start, end, text in meeting.turns]
        encoded.append(MeetingAudio(meeting.id, states[0, :count].clone(), turns))
    return encoded


def build_student(tokenizer, corpus: Path, out: Path, steps: Steps, seed: int, log, work: Path,
                  recognizer: CTCRecognizer, decoder_from: Path | None = None) -> dict:
    """The pre-training-stage student: `student_config`, its encoder the CTC-trained one (frozen),
    projector and decoder trained on two ASR batches to one text batch. ASR rows are spans of
    the pretrain meetings (the curriculum of toy/encoder_ctc.py, one turn growing to whole
    meetings by 30% of the steps, then a quarter of the rows whole meetings) cut from encoder
    states computed once per whole meeting (`encode_meetings`): the encoder is frozen, so this
    is exact for whole meetings, gives spans the context they have in SFT, and makes a step
    cost the decoder alone. Text rows are instruction tuning (transcript + instruction ->
    reference). `decoder_from`: start the decoder (and projector) from a student checkpoint's
    (same tokenizer) instead of from scratch."""
    torch.manual_seed(seed + 1)
    student = SpeechLM(student_config(tokenizer))
    student.encoder.load_state_dict(recognizer.encoder.state_dict())
    student.encoder.requires_grad_(False)
    if decoder_from is not None:
        earlier = load_pretrained(decoder_from)
        student.decoder.load_state_dict(earlier.decoder.state_dict())
        student.projector.load_state_dict(earlier.projector.state_dict())
    texts = text_examples(tokenizer, corpus, ("teacher",), steps.text_meetings)
    started = time.perf_counter()
    meetings = encode_meetings(student.encoder.eval(), load_meetings(corpus, "pretrain"))
    log(f"[toy pretrain] student: {len(meetings)} pretrain meetings encoded once "
        f"({time.perf_counter() - started:.0f} s)")
    longest = max(len(m.turns) for m in meetings)
    budget = max(1, steps.student_asr_frames // student.config.encoder.time_reduction)  # state frames per batch
    rng = random.Random(seed + 2)

    def next_batch(step: int) -> Batch:
        if step % 3 == 0:
            return collate(rng.sample(texts, min(steps.batch_size, len(texts))), tokenizer.pad_token_id)
        limit = max_turns_at(step, round(steps.student * 0.6), longest)  # whole meetings from 30% of the steps
        rows, total = [], 0
        while total < budget:
            meeting = rng.choice(meetings)
            states, text = sample_span(meeting, limit, rng, whole=limit >= longest and rng.random() < 0.25)
            rows.append(asr_example(tokenizer, states, text, lambda count: count))
            total += states.shape[0]
        return collate(rows, tokenizer.pad_token_id)

    trainable = [p for p in student.parameters() if p.requires_grad]
    student.encoder_cache = EncodedClips()
    try:
        loss = train(student, next_batch, steps.student, [{"params": trainable, "lr": steps.lr}],
                     "student (ASR spans of encoder states + text)", log, rng=rng, work=work / "student")
    finally:
        student.encoder_cache = None
    _save(student, tokenizer.path, out / "student")
    record = {"loss": loss, **asr_checks(decoder_asr(student, tokenizer), corpus)}
    record["validation_text"] = text_quality(student, tokenizer, read_rows(corpus, "validation"))
    log(f"[toy pretrain] student ASR: {json.dumps({k: v for k, v in record.items() if 'word_error' in k})}; "
        f"backbone (text) on validation: {_brief(record['validation_text'])}")
    return record


def asr_checks(transcribe, corpus: Path) -> dict:
    """Word error of `transcribe` on the validation splits' whole meetings and single turns:
    training voices (`validation`) and unseen voices (`validation_voices`)."""
    record = {}
    for split, voices in (("validation", "train_voices"), ("validation_voices", "unseen_voices")):
        report = asr_report(transcribe, load_meetings(corpus, split))
        if report:  # a corpus without the split (a test's tiny one) has nothing to check
            for measure in ("meeting", "window", "turn"):
                record[f"{measure}_word_error_{voices}"] = report[f"{measure}_word_error"]
            record[f"asr_{voices}"] = report
    return record


def build(corpus: Path, out: Path, steps: Steps = Steps(), *, seed: int = 0, log=print,
          which: tuple[str, ...] = ("teacher", "encoder", "student"), work: Path = Path("cache/toy/pretrain_work"),
          tokenizer_file: Path | None = None, teacher_from: Path | None = None,
          decoder_from: Path | None = None) -> dict[str, Path]:
    """Tokenizer, encoder, student and teacher under `out` (docs/toy-world.md); returns their paths.
    Every training loop checkpoints under `work` and resumes from it."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_file is None:
        tokenizer = train_sentencepiece(training_texts(corpus), out / "tokenizer", vocab_size=VOCAB_SIZE)
    else:
        if tokenizer_file.resolve() != (out / "tokenizer.model").resolve():
            shutil.copy2(tokenizer_file, out / "tokenizer.model")
        tokenizer = load_tokenizer(out / "tokenizer.model")
    info = json.loads((corpus / "corpus.json").read_text())
    summary = {"corpus_key": corpus.resolve().name, "corpus_seed": info["seed"],
               "generator_version": info["generator_version"], "corpus_sizes": info["sizes"],
               "steps": dataclasses.asdict(steps), "seed": seed}
    if "teacher" in which:
        started = time.perf_counter()
        summary["teacher"] = build_teacher(tokenizer, corpus, out, steps, seed, log, work, teacher_from)
        summary["teacher"]["seconds"] = round(time.perf_counter() - started)
        summary["teacher"]["continued_from"] = None if teacher_from is None else str(teacher_from)
    recognizer = None
    if "encoder" in which or "student" in which:
        started = time.perf_counter()
        ctc = CTCSteps(steps=steps.encoder, frames_per_batch=steps.asr_frames, lr=steps.encoder_lr)
        recognizer, record = build_encoder(corpus, tokenizer, student_config(tokenizer).encoder, work / "encoder_ctc",
                                           ctc, seed=seed, log=log)
        summary["encoder_ctc"] = {**record, "seconds": round(time.perf_counter() - started)}
    if "student" in which:
        started = time.perf_counter()
        summary["student"] = build_student(tokenizer, corpus, out, steps, seed, log, work, recognizer, decoder_from)
        summary["student"]["decoder_from"] = None if decoder_from is None else str(decoder_from)
        summary["student"]["seconds"] = round(time.perf_counter() - started)
    previous = out / "pretrain.json"
    merged = json.loads(previous.read_text()) if previous.exists() else {}
    if merged.get("corpus_key") != summary["corpus_key"]:  # another corpus: nothing of the old record holds
        merged = {}
    merged.update(summary)
    atomic_write_text(previous, json.dumps(merged, indent=1))
    return {"tokenizer": tokenizer.path, "student": out / "student", "teacher": out / "teacher"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the toy tokenizer, speech encoder, pre-training-stage student "
                                                 "and text teacher (resumable).")
    parser.add_argument("--corpus", required=True, help="a folder written by python -m toy.corpus")
    parser.add_argument("--out", default="cache/toy/models")
    parser.add_argument("--work", default="cache/toy/pretrain_work", help="checkpoints of every loop (resumed)")
    parser.add_argument("--tokenizer", default=None, help="use this SentencePiece model instead of training one")
    parser.add_argument("--teacher-from", default=None, help="continue this teacher checkpoint (same tokenizer)")
    parser.add_argument("--decoder-from", default=None, help="start the student's decoder from this checkpoint's")
    parser.add_argument("--quick", action="store_true", help="a few steps of each (smoke test)")
    parser.add_argument("--only", choices=("teacher", "encoder", "student"), default=None,
                        help="build one part (default all; student trains or resumes the encoder first)")
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
    optional = lambda value: Path(value) if value else None  # noqa: E731
    streaming_teacher = args.only == "teacher" and steps.teacher_stream_from and args.tokenizer
    if steps.teacher_stream_from and steps.teacher_stream_from < steps.text_meetings:
        print(f"error: --teacher-stream-from {steps.teacher_stream_from} overlaps the {steps.text_meetings} text-only "
              f"meetings of the text data (indices 0..{steps.text_meetings - 1}); start the stream at "
              f"{steps.text_meetings} or later", file=sys.stderr)
        return 2
    try:
        if not streaming_teacher:  # the tokenizer, the teacher's rows and the student read the pre-training split
            require_rendered(args.corpus, ("pretrain",))
    except CorpusIncomplete as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = build(Path(args.corpus), Path(args.out), steps, seed=args.seed,
                  log=lambda message: print(message, file=sys.stderr, flush=True),
                  which=(args.only,) if args.only else ("teacher", "encoder", "student"), work=Path(args.work),
                  tokenizer_file=optional(args.tokenizer), teacher_from=optional(args.teacher_from),
                  decoder_from=optional(args.decoder_from))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
