"""The student's alignment reads spans of encoder states computed once per whole meeting
(toy.pretrain.encode_meetings + EncodedClips): for a whole meeting that is exactly the loss and
gradients of the ordinary path through the frozen encoder, and a span's turn bounds move with
the 8x frame reduction."""
import math
import random

import torch

from data.batching import collate
from model import SpeechLM, toy
from toy.encoder_ctc import MeetingAudio, sample_span
from toy.pretrain import EncodedClips, _loss, asr_example, encode_meetings


class Pieces:
    """The slice of a tokenizer that asr_example and collate use."""
    pad_token_id = 0

    def build_chat_prompt(self, instruction, audio_tokens):
        class Prompt:
            prompt_ids = [1, 5] + [toy().audio_token_id] * audio_tokens[0] + [6, 7]
        return Prompt()

    def encode_response(self, text, add_eos=True):
        return [8 + len(word) % 20 for word in text.split()] + ([2] if add_eos else [])


def meeting(seed: int, frames: int = 403) -> MeetingAudio:
    generator = torch.Generator().manual_seed(seed)
    features = (torch.randn(frames, 80, generator=generator) * 3 + 12).to(torch.bfloat16)
    return MeetingAudio(f"m{seed}", features, [(0, 150, "hello everyone"), (170, 290, "the budget is set"),
                                               (310, frames, "thanks all")])


def test_whole_meetings_from_states_give_the_encoder_paths_loss_and_gradients():
    torch.manual_seed(0)
    model = SpeechLM(toy())
    model.encoder.requires_grad_(False)
    meetings = [meeting(1), meeting(2)]  # one length: padding would let the convolutions see zeros
    frames = model.encoder.num_output_frames
    direct = collate([asr_example(Pieces(), m.features, m.transcript, frames) for m in meetings], 0)
    loss = _loss(model, direct)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    encoded = encode_meetings(model.encoder.eval(), meetings)
    assert [m.features.shape[0] for m in encoded] == [math.ceil(403 / 8)] * 2
    assert encoded[0].turns[1][:2] == (int(170 * 51 / 403), math.ceil(290 * 51 / 403))
    model.encoder_cache = EncodedClips()
    cached = collate([asr_example(Pieces(), m.features, m.transcript, lambda count: count) for m in encoded], 0)
    again = _loss(model, cached)
    again.backward()
    torch.testing.assert_close(again, loss, rtol=0, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-7)


def test_spans_of_states_are_cut_at_the_moved_turn_bounds():
    torch.manual_seed(0)
    model = SpeechLM(toy())
    (encoded,) = encode_meetings(model.encoder.eval(), [meeting(3)])
    rng = random.Random(0)
    for _ in range(20):
        states, text = sample_span(encoded, 1, rng, whole=False)
        turn = next(t for t in encoded.turns if t[2] == text)
        assert states.shape[0] >= turn[1] - turn[0] and states.shape[1] == model.config.encoder.hidden_size
