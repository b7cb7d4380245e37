"""The toy encoder's CTC pre-training: decoding and scoring by hand, spans and masks, a head
that learns, and a resume that continues exactly where a killed run stopped."""
import dataclasses
import random

import pytest
import torch

from toy import encoder_ctc as ctc
from model import toy


def test_greedy_ctc_collapses_repeats_and_drops_blanks():
    blank = 9
    frames = [blank, 5, 5, blank, 5, 7, 7, blank]  # "5 5 7": a blank separates the two 5s
    log_probs = torch.nn.functional.one_hot(torch.tensor(frames), 10).float().log()
    assert ctc.greedy_ctc(log_probs, len(frames), blank) == [5, 5, 7]
    assert ctc.greedy_ctc(log_probs, 3, blank) == [5]  # only the valid frames are read


def test_word_error_rate_is_edit_distance_over_reference_words():
    # "a b c" -> "a x c d": one substitution and one insertion over 3 words; "e f" -> "": 2 deletions
    assert ctc.word_error_rate(["a x c d"], ["a b c"]) == 2 / 3
    assert ctc.word_error_rate(["a x c d", ""], ["a b c", "e f"]) == 4 / 5
    assert ctc.word_error_rate(["same words"], ["same words"]) == 0.0


def test_curriculum_grows_to_whole_meetings_by_half_the_steps():
    assert ctc.max_turns_at(0, 1000, 20) == 1
    assert ctc.max_turns_at(250, 1000, 20) == 11  # 1 + 19 * 250 / 500, rounded
    assert ctc.max_turns_at(500, 1000, 20) == ctc.max_turns_at(999, 1000, 20) == 20


def fake_meeting(turns: int = 5, seed: int = 0) -> ctc.MeetingAudio:
    """Turns of 40 frames separated by 20-frame pauses; frame values = 100 * turn + position."""
    bounds, position = [], 10
    for k in range(turns):
        bounds.append((position, position + 40, f"turn{k} words"))
        position += 60
    features = torch.arange(position + 10, dtype=torch.float32)[:, None].expand(-1, 80).clone()
    return ctc.MeetingAudio(f"m{seed}", features, bounds)


def test_sample_span_cuts_inside_the_pauses_and_joins_the_words():
    meeting = fake_meeting()
    rng = random.Random(3)
    for _ in range(50):
        clip, text = ctc.sample_span(meeting, 3, rng, whole=False)
        words = text.split()
        first, count = int(words[0][4:]), len(words) // 2
        assert 1 <= count <= 3 and text == " ".join(f"turn{k} words" for k in range(first, first + count))
        start, end = int(clip[0, 0]), int(clip[-1, 0]) + 1
        previous_end = meeting.turns[first - 1][1] if first else 0
        following = meeting.turns[first + count][0] if first + count < 5 else meeting.features.shape[0]
        assert previous_end <= start <= meeting.turns[first][0]  # a part of the pause before, never a turn
        assert meeting.turns[first + count - 1][1] <= end <= following
    clip, text = ctc.sample_span(meeting, 1, rng, whole=True)
    assert clip is meeting.features and text == meeting.transcript


def test_spec_augment_masks_with_the_fill_value_and_keeps_the_input():
    features = torch.randn(1500, 80)
    fill = torch.full((80,), 7.0)
    masked = ctc.spec_augment(features, fill, random.Random(0))
    assert masked.shape == features.shape and not torch.equal(masked, features)
    changed = masked != features
    assert torch.all(masked[changed] == 7.0)
    assert changed.float().mean() < 0.5  # two bands of <= 10 bins and 3 time masks of <= 25 frames


def tiny_config():
    encoder = toy().encoder
    return dataclasses.replace(encoder, hidden_size=32, intermediate_size=64, num_blocks=1, num_heads=2,
                               nemo_conv_channels=8, ext_pw_out_channel=32, depthwise_separable_out_channel=32)


class PieceTokenizer:
    """'turnK' -> piece K + 1, 'words' -> piece 1: a stand-in for the toy tokenizer."""
    vocab_size = 12

    def encode(self, text):
        return [int(w[4:]) + 2 if w.startswith("turn") else 1 for w in text.split()]

    def decode(self, ids):
        return " ".join("words" if i == 1 else f"turn{i - 2}" for i in ids)


def test_the_head_learns_to_recognize_a_clip():
    torch.manual_seed(0)
    recognizer = ctc.CTCRecognizer(tiny_config(), vocab_size=12)
    clip = torch.randn(200, 80)  # 25 encoder frames
    optimizer = torch.optim.Adam(recognizer.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = ctc.ctc_loss(recognizer, [clip], [[5, 3, 9]], autocast=False)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recognizer.eval()
    assert loss.item() < 0.1 * first
    assert ctc.recognize(recognizer, [clip], PieceTokenizer()) == ["turn3 turn1 turn7"]


class Killed(Exception):
    """Stands for a SIGKILL right after a checkpoint write."""


def test_a_killed_run_resumes_exactly(tmp_path):
    """4 steps in one run = a run killed right after its step-2 checkpoint, then a new process
    (new objects) resuming to step 4: bitwise equal weights."""
    meetings = [fake_meeting(seed=s) for s in range(3)]
    steps = ctc.CTCSteps(steps=4, frames_per_batch=300, lr=1e-3, save_every=2)

    def run(folder, log=lambda message: None):
        torch.manual_seed(0)
        recognizer = ctc.CTCRecognizer(tiny_config(), vocab_size=12)
        ctc.train_encoder(recognizer, meetings, PieceTokenizer(), folder, steps, log=log)
        return recognizer

    def kill_after_step_2(message):
        if message.startswith("[toy encoder] checkpoint at step 2 "):
            raise Killed

    whole = run(tmp_path / "a")
    with pytest.raises(Killed):
        run(tmp_path / "b", kill_after_step_2)
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["step"] == 2
    resumed = run(tmp_path / "b")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
