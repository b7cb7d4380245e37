"""Toy pre-training, step 1: the speech encoder alone, trained as a CTC recognizer.

Phi-4MM's speech encoder was an ASR model in its own right before the language model saw it.
The toy student's encoder is made the same way: a linear CTC head over the toy tokenizer's
pieces (plus a blank) on top of the Conformer, trained on the pre-training meetings, then
dropped; the encoder's weights go on to the decoder alignment (toy/pretrain.py), which
keeps them frozen, as SFT, KD and DPO do.

Why pieces, not characters: the encoder gives one frame per 80 ms (12.5 frames/s) and this
world's speech runs about 15.5 characters/s, more labels than frames; the toy tokenizer's
pieces come at about 4 per second, so CTC's one-label-per-frame limit is far away.

What it trains on (`sample_span`): spans of consecutive turns of one meeting, cut from the
meeting's log-mel with a random part of the pauses around them, so it hears what it will be
asked to hear later: pauses, noise, voices changing mid-clip. A curriculum grows the longest
span from one turn to the whole meeting over the first half of the steps (`max_turns_at`);
after that a quarter of the spans are whole meetings. SpecAugment-style masking
(`spec_augment`: two frequency bands, one time mask per 5 s) on every span.

Batches hold about `frames_per_batch` log-mel frames, so a step costs about the same whatever
the span lengths. bf16 autocast where the CPU has bf16 kernels (float32 master weights and
CTC loss). `train_encoder` checkpoints every `save_every` steps (encoder, head, optimizer,
step, random states; atomic) and resumes from its folder, so a run killed at a session's end
goes on where it stopped.

Check (`recognize`): greedy CTC (argmax, collapse repeats, drop blanks) on whole meetings and
single turns of held-out splits, word error as in toy/pretrain.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from data.audio import load_audio
from model.config import EncoderConfig
from model.encoder import ConformerEncoder
from model.features import log_mel
from model.safeio import atomic_write_text

from .corpus import plan_meeting
from .loop_state import load_state, save_state, warmup_cosine

FRAMES_PER_SECOND = 100  # log-mel hop 10 ms


@dataclasses.dataclass
class MeetingAudio:
    """One meeting's log-mel and where each turn lies in it."""

    id: str
    features: torch.Tensor  # (frames, 80) log-mel, bfloat16; or encoder states (frames / 8, D): pretrain.encode_meetings
    turns: list[tuple[int, int, str]]  # (first frame, end frame, words) per turn

    @property
    def transcript(self) -> str:
        return " ".join(text for _, _, text in self.turns)


def load_meetings(corpus: Path, split: str, limit: int | None = None) -> list[MeetingAudio]:
    """The meetings of `split` with their turn segments (audio/ID.json) and turn words
    (toy.corpus.plan_meeting: the corpus is a pure function of its seed)."""
    info = json.loads((corpus / "corpus.json").read_text())
    count = info["sizes"][split] if limit is None else min(limit, info["sizes"][split])
    meetings = []
    for index in range(count):
        planned = plan_meeting(info["seed"], split, index, info["sizes"]["instructions"])
        segments = json.loads((corpus / "audio" / f"{planned.id}.json").read_text())["segments"]
        waveform = load_audio(corpus / "audio" / f"{planned.id}.wav").waveform
        features = log_mel(waveform).to(torch.bfloat16)  # (frames, 80)
        turns = [(int(start * FRAMES_PER_SECOND), math.ceil(end * FRAMES_PER_SECOND), turn.text)
                 for (start, end), turn in zip(segments, planned.turns)]
        meetings.append(MeetingAudio(planned.id, features, turns))
    return meetings


def max_turns_at(step: int, steps: int, longest: int) -> int:
    """The curriculum: the longest span grows linearly from 1 turn to `longest` at half the steps."""
    return max(1, min(longest, 1 + round((longest - 1) * step / max(1, steps // 2))))


def sample_span(meeting: MeetingAudio, max_turns: int, rng: random.Random, whole: bool) -> tuple[torch.Tensor, str]:
    """A span of 1..max_turns consecutive turns (the whole meeting when `whole`): its log-mel
    (frames, 80) with a random part of the pauses on each side, and its words."""
    turns = meeting.turns
    if whole:
        return meeting.features, meeting.transcript
    count = rng.randint(1, min(max_turns, len(turns)))
    first = rng.randrange(len(turns) - count + 1)
    span = turns[first:first + count]
    before = turns[first - 1][1] if first else 0
    after = turns[first + count][0] if first + count < len(turns) else meeting.features.shape[0]
    start = span[0][0] - rng.randint(0, max(0, span[0][0] - before))
    end = span[-1][1] + rng.randint(0, max(0, after - span[-1][1]))
    return meeting.features[start:end], " ".join(text for _, _, text in span)


def spec_augment(features: torch.Tensor, fill: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """SpecAugment-style masks on (frames, 80): two frequency bands of up to 10 bins and one time
    mask of up to 0.25 s per 5 s, filled with `fill` (80,), the features' mean (0 once the
    encoder normalizes)."""
    features = features.clone()
    for _ in range(2):
        width = rng.randint(0, 10)
        low = rng.randint(0, features.shape[1] - width)
        features[:, low:low + width] = fill[low:low + width]
    for _ in range(features.shape[0] // 500):
        width = rng.randint(0, 25)
        low = rng.randint(0, max(0, features.shape[0] - width))
        features[low:low + width] = fill
    return features


class CTCRecognizer(nn.Module):
    """The encoder plus a linear CTC head over `vocab_size` pieces + blank (index vocab_size)."""

    def __init__(self, config: EncoderConfig, vocab_size: int):
        super().__init__()
        self.encoder = ConformerEncoder(config)
        self.head = nn.Linear(config.hidden_size, vocab_size + 1)
        self.blank = vocab_size

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T, 80), (N,) -> log-probabilities (N, T', V + 1) float32 and their lengths (N,)."""
        encoded, out_lengths = self.encoder(features, lengths, mask_padding=True)  # (N, T', D)
        return self.head(encoded).float().log_softmax(-1), out_lengths


def pad(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([clip.shape[0] for clip in clips])
    batch = clips[0].new_zeros(len(clips), int(lengths.max()), clips[0].shape[1])  # (N, T, 80)
    for i, clip in enumerate(clips):
        batch[i, :clip.shape[0]] = clip
    return batch.float(), lengths


def ctc_loss(recognizer: CTCRecognizer, clips: list[torch.Tensor], labels: list[list[int]],
             autocast: bool) -> torch.Tensor:
    """Mean CTC loss per label (F.ctc_loss, sum over the batch / number of labels)."""
    features, lengths = pad(clips)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        log_probs, out_lengths = recognizer(features, lengths)
    targets = torch.tensor([piece for row in labels for piece in row])
    loss = F.ctc_loss(log_probs.transpose(0, 1), targets, out_lengths, torch.tensor([len(r) for r in labels]),
                      blank=recognizer.blank, reduction="sum", zero_infinity=True)
    return loss / targets.numel()


@dataclasses.dataclass(frozen=True)
class CTCSteps:
    steps: int = 3000
    frames_per_batch: int = 12000  # log-mel frames (120 s of audio) per step
    lr: float = 2e-3
    save_every: int = 100


def _bf16_kernels() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def train_encoder(recognizer: CTCRecognizer, meetings: list[MeetingAudio], tokenizer, folder: Path,
                  steps: CTCSteps = CTCSteps(), *, seed: int = 0, log=print, check=None) -> dict:
    """CTC training of `recognizer` on spans of `meetings` (module docstring); resumes from
    `folder`. `check(recognizer)` runs after every checkpoint and its dict goes to the log file.
    Returns the final state's record."""
    folder.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(recognizer.parameters(), lr=steps.lr, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, steps.steps)
    rng, start, average, earlier = random.Random(seed), 0, None, 0.0
    state_file = folder / "state.pt"
    state = load_state(state_file, recognizer, optimizer, schedule, rng)
    if state is not None:
        start, average = int(state["step"]), state.get("average")
        earlier = float(state.get("train_seconds", 0.0))
        log(f"[toy encoder] resumed at step {start} from {state_file}")
    fill = torch.cat([m.features for m in meetings[:50]]).float().mean(0)  # (80,)
    longest = max(len(m.turns) for m in meetings)
    labels_of = {}
    autocast = _bf16_kernels()
    recognizer.train()
    started = time.perf_counter()
    for step in range(start + 1, steps.steps + 1):
        clips, labels, frames = [], [], 0
        limit = max_turns_at(step, steps.steps, longest)
        while frames < steps.frames_per_batch:
            meeting = rng.choice(meetings)
            whole = limit >= longest and rng.random() < 0.25
            clip, text = sample_span(meeting, limit, rng, whole)
            ids = labels_of.setdefault(text, tokenizer.encode(text))
            clips.append(spec_augment(clip.float(), fill, rng))
            labels.append(ids)
            frames += clip.shape[0]
        loss = ctc_loss(recognizer, clips, labels, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(recognizer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
        if step % 20 == 0:
            log(f"[toy encoder] step {step}/{steps.steps} loss {average:.3f} spans<= {limit} turns "
                f"({time.perf_counter() - started:.0f} s)")
        if step % steps.save_every == 0 or step == steps.steps:
            save_state(state_file, recognizer, optimizer, schedule, rng, step, average=average,
                       train_seconds=earlier + time.perf_counter() - started)
            record = {"step": step, "loss": average, "seconds": round(time.perf_counter() - started)}
            if check is not None:
                recognizer.eval()
                record.update(check(recognizer))
                recognizer.train()
            with open(folder / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            errors = {split: {k: round(v, 3) for k, v in report.items() if k.endswith("word_error")}
                      for split, report in record.items() if isinstance(report, dict)}
            log(f"[toy encoder] checkpoint at step {step} (loss {average:.3f}): word error {errors}")
    recognizer.eval()
    seconds = earlier + (time.perf_counter() - started if start < steps.steps else 0.0)
    return {"steps": steps.steps, "loss": average, "train_seconds": round(seconds)}


def greedy_ctc(log_probs: torch.Tensor, length: int, blank: int) -> list[int]:
    """Best path: argmax per frame, repeats collapsed, blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    return [piece for i, piece in enumerate(best) if piece != blank and (i == 0 or piece != best[i - 1])]


@torch.no_grad()
def recognize(recognizer: CTCRecognizer, clips: list[torch.Tensor], tokenizer, batch_size: int = 8) -> list[str]:
    """Greedy CTC transcripts of (frames, 80) clips."""
    texts = []
    for i in range(0, len(clips), batch_size):
        features, lengths = pad([c.float() for c in clips[i:i + batch_size]])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16_kernels()):
            log_probs, out_lengths = recognizer(features, lengths)
        texts += [tokenizer.decode(greedy_ctc(log_probs[j], int(out_lengths[j]), recognizer.blank))
                  for j in range(features.shape[0])]
    return texts


def word_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Word error rate: word-level edit distance summed over clips / reference words."""
    errors = words = 0
    for hypothesis, reference in zip(hypotheses, references):
        h, r = hypothesis.split(), reference.split()
        row = list(range(len(h) + 1))
        for i, word in enumerate(r, start=1):
            previous, row[0] = row[0], i
            for j in range(1, len(h) + 1):
                previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != h[j - 1]))
        errors += row[len(h)]
        words += len(r)
    return errors / max(1, words)


WINDOW_TURNS = 6


def asr_report(transcribe, meetings: list[MeetingAudio], *, turns: int = 40, windows: int = 30) -> dict:
    """Word error of `transcribe(list of (frames, 80) clips) -> texts` on `meetings` whole, on
    their first `windows` windows of WINDOW_TURNS consecutive turns and on their first `turns`
    single turns (both cut at the turns' segment bounds). Empty for no meetings."""
    if not meetings:
        return {}
    whole = transcribe([m.features for m in meetings])
    cut = [(m.features[a:b], text) for m in meetings for a, b, text in m.turns][:turns]
    spans = [(m.features[m.turns[k][0]:m.turns[k + WINDOW_TURNS - 1][1]],
              " ".join(text for _, _, text in m.turns[k:k + WINDOW_TURNS]))
             for m in meetings for k in range(0, len(m.turns) - WINDOW_TURNS + 1, WINDOW_TURNS)][:windows]
    single, windowed = transcribe([clip for clip, _ in cut]), transcribe([clip for clip, _ in spans])
    return {"meeting_word_error": word_error_rate(whole, [m.transcript for m in meetings]),
            "window_word_error": word_error_rate(windowed, [text for _, text in spans]),
            "turn_word_error": word_error_rate(single, [text for _, text in cut]),
            "meetings": len(meetings), "windows": len(spans), "turns": len(cut),
            "example": {"hypothesis": whole[0], "reference": meetings[0].transcript}}


def write_json(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1))


def set_feature_statistics(encoder: ConformerEncoder, clips: list[torch.Tensor]) -> tuple[float, float]:
    """The encoder's per-bin `global_mean` / `global_invstd` (buffers of every Phi-4MM checkpoint)
    from (frames, 80) clips; returns the average mean and standard deviation (for the log)."""
    frames = torch.cat([clip.float() for clip in clips])  # (sum frames, 80)
    mean, std = frames.mean(dim=0), frames.std(dim=0).clamp_min(1e-3)
    encoder.encoder_embedding.global_mean.copy_(mean)
    encoder.encoder_embedding.global_invstd.copy_(1.0 / std)
    return mean.mean().item(), std.mean().item()


def build_encoder(corpus: Path, tokenizer, config: EncoderConfig, work: Path, steps: CTCSteps = CTCSteps(), *,
                  seed: int = 0, log=print) -> tuple[CTCRecognizer, dict]:
    """Train (or resume, or reuse) the CTC recognizer on the pretrain split; checks on the
    validation splits (training and unseen voices) at every checkpoint. Returns it and a record
    with the final word errors."""
    torch.manual_seed(seed)
    recognizer = CTCRecognizer(config, tokenizer.vocab_size)
    meetings = load_meetings(corpus, "pretrain")
    held = {split: load_meetings(corpus, split) for split in ("validation", "validation_voices")}
    mean, std = set_feature_statistics(recognizer.encoder, [m.features for m in meetings[:100]])
    log(f"[toy encoder] {len(meetings)} meetings; log-mel mean {mean:.2f}, std {std:.2f}")

    def check(model: CTCRecognizer) -> dict:
        transcribe = lambda clips: recognize(model, clips, tokenizer)  # noqa: E731
        return {split: asr_report(transcribe, rows) for split, rows in held.items()}

    record = train_encoder(recognizer, meetings, tokenizer, work, steps, seed=seed, log=log, check=check)
    record.update(check(recognizer))
    return recognizer, record


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from model import toy
    from model.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description="CTC pre-training of the toy speech encoder (resumable).")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--work", required=True, help="checkpoints, log.jsonl and the result")
    parser.add_argument("--steps", type=int, default=CTCSteps.steps)
    parser.add_argument("--frames-per-batch", type=int, default=CTCSteps.frames_per_batch)
    parser.add_argument("--lr", type=float, default=CTCSteps.lr)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    steps = CTCSteps(steps=args.steps, frames_per_batch=args.frames_per_batch, lr=args.lr)
    _, record = build_encoder(Path(args.corpus), tokenizer, toy(tokenizer.vocab_size).encoder, Path(args.work), steps,
                              log=lambda message: print(message, file=sys.stderr, flush=True))
    write_json(Path(args.work) / "result.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
