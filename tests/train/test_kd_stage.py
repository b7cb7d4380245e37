"""KD stage: distilling from a local teacher lowers the on-policy KL on held-out prompts; an
API teacher (rollout.server over loopback, real HTTP, top-k) runs a step end to end."""
import pytest
import torch

from data.batching import Example, ExampleSource, collate
from losses.kd import forward_kl
from model import load_pretrained
from model.lora import apply_lora, mark_trainable
from model.tokenizer import load_tokenizer
from rollout.sampler import SamplingParams, generate
from rollout.remote_teacher import OpenAICompatibleTeacher
from rollout.teachers import LocalTeacher
from tests.rollout.tiny_checkpoint import build_tiny_checkpoint, corpus, serving
from train.config import load_config
from train.distributed import DistInfo
from train.loop import train
from train.stages import KDStage, response_window

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    teacher_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("teacher"), seed=0)
    student_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("student"), seed=1)
    return teacher_dir, student_dir


def student(student_dir):
    torch.manual_seed(0)
    model = load_pretrained(student_dir)
    apply_lora(model, rank=4, alpha=8)
    mark_trainable(model)
    return model


def examples(tokenizer, first, count):
    texts = corpus(num_sentences=first + count, seed=3)[first:]
    out = []
    for i, transcript in enumerate(texts):
        instruction = "Summarize briefly."
        prompt = tokenizer.build_chat_prompt(f"{transcript}\n{instruction}").input_ids
        out.append(Example(f"ex{first + i}", prompt, instruction=instruction, transcript=transcript))
    return out


def held_out_kl(model, teacher, held_out, eos):
    """Mean forward KL(p_T || p_S) over the student's own samples (fixed seed) of held-out prompts."""
    model.eval()
    batch = collate(held_out, model.config.decoder.pad_token_id)
    with torch.no_grad():
        rollout = generate(model, batch.prompts, SamplingParams(max_new_tokens=12, eos_token_ids=eos, seed=11),
                           audio_features=None)
        responses = [rollout.tokens[i, :n].tolist() for i, n in enumerate(rollout.lengths.tolist())]
        sampled = collate([Example(e.id, e.prompt_ids, r) for e, r in zip(held_out, responses)], 0)
        logits, _, mask = response_window(model, sampled)
        scored = teacher.score([teacher.prompt(e.transcript, e.instruction) for e in held_out], responses)
        return float(forward_kl(logits, scored.logprobs, mask))


def test_kd_with_a_local_teacher_lowers_held_out_kl(checkpoints, tmp_path):
    teacher_dir, student_dir = checkpoints
    tokenizer = load_tokenizer(student_dir)
    teacher = LocalTeacher.from_pretrained(teacher_dir)  # full vocabulary
    model = student(student_dir)
    eos = tuple(model.config.decoder.eos_token_ids)
    train_set, held_out = examples(tokenizer, 0, 16), examples(tokenizer, 100, 6)
    before = held_out_kl(model, teacher, held_out, eos)
    stage = KDStage(teacher, pad_token_id=model.config.decoder.pad_token_id, eos_token_ids=eos, max_new_tokens=12)
    config = load_config(None, [f"run.out_dir={tmp_path}", "optim.max_steps=8", "optim.lr=0.01"])
    train(config, model, stage, ExampleSource(train_set, 4), CPU)
    after = held_out_kl(model, teacher, held_out, eos)
    assert after < 0.8 * before, (before, after)


@pytest.fixture(scope="module")
def served_teacher(checkpoints):
    with serving(checkpoints[0], "teacher") as url:
        yield url


def test_kd_step_with_an_api_teacher_over_http(checkpoints, served_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "unused-local-key")
    _, student_dir = checkpoints
    tokenizer = load_tokenizer(student_dir)
    teacher = OpenAICompatibleTeacher(served_teacher, "teacher", 5, tokenizer=tokenizer,
                                      api_key_env="TEST_TEACHER_KEY", cache_dir=tmp_path / "cache")
    model = student(student_dir)
    stage = KDStage(teacher, pad_token_id=model.config.decoder.pad_token_id,
                    eos_token_ids=tuple(model.config.decoder.eos_token_ids), max_new_tokens=8)
    config = load_config(None, [f"run.out_dir={tmp_path / 'run'}", "optim.max_steps=1"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(config, model, stage, ExampleSource(examples(tokenizer, 0, 4), 2), CPU)
    assert teacher.usage.requests == 2  # one scoring request per response, over real HTTP
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_an_injected_sampler_draws_the_responses_the_teacher_scores(checkpoints):
    """KDStage asks its `sampler` (rollout.sampler.Sampler) for the on-policy responses: a stand-in
    engine returning fixed tokens is called once with the batch's prompts and sampling params, and
    exactly its responses (cut at their lengths) are collated and scored."""
    from rollout.sampler import Rollout

    teacher_dir, student_dir = checkpoints
    tokenizer = load_tokenizer(student_dir)
    model = student(student_dir)
    batch = collate(examples(tokenizer, 0, 2), model.config.decoder.pad_token_id)
    eos = tuple(model.config.decoder.eos_token_ids)
    calls, fixed = [], torch.tensor([[7, 8, 9, eos[0]], [10, 11, 0, 0]])

    def engine(model_, prompts, params, *, audio_features=None, audio_lengths=None):
        calls.append((prompts, params))
        lengths = torch.tensor([4, 2])
        return Rollout(tokens=fixed, logprobs=None, mask=torch.arange(4)[None, :] < lengths[:, None],
                       lengths=lengths, prompt_index=torch.arange(2))

    teacher = LocalTeacher.from_pretrained(teacher_dir, top_k=5)
    stage = KDStage(teacher, pad_token_id=model.config.decoder.pad_token_id, eos_token_ids=eos,
                    max_new_tokens=6, sampler=engine)
    prepared = stage.prepare(model, batch)
    assert len(calls) == 1 and calls[0][1].max_new_tokens == 6 and calls[0][1].eos_token_ids == eos
    assert [p.tolist() for p in calls[0][0]] == [p.tolist() for p in batch.prompts]
    assert [e.response_ids for e in prepared.batch.examples] == [[7, 8, 9, eos[0]], [10, 11]]
    assert prepared.on_policy and prepared.ended_with_eos == [True, False]
    assert prepared.teacher.mask.sum(-1).tolist() == [4, 2]  # the teacher scored those responses
