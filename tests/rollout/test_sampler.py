"""The KV-cached sampler against full recomputation, transformers' generate, teacher forcing,
and the distribution it claims to sample from."""
import pytest
import torch

from model import load_pretrained
from rollout.recompute import greedy_by_recompute
from rollout.sampler import SamplingParams, filter_logits, generate, row_streams, select_tokens
from tests.model.hf_tiny import AUDIO_TOKEN, VOCAB, random_model, tiny_config

CLIP_FRAMES = [333, 120, 200]  # 42, 15 and 25 audio tokens


def tokens_for(frames):
    return -(-frames // 8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = random_model(tiny_config(seed=11, original_max=32), seed=12)
    directory = tmp_path_factory.mktemp("sampler")
    reference.save_pretrained(directory)
    return reference, load_pretrained(directory).eval()


@pytest.fixture(scope="module")
def batch():
    """Three prompts of different lengths: one clip, two clips, no clip (but > 32 tokens each)."""
    gen = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(3, VOCAB - 1, (n,), generator=gen)

    def audio(frames):
        return torch.full((tokens_for(frames),), AUDIO_TOKEN)

    prompts = [
        torch.cat([text(3), audio(333), text(6)]),
        torch.cat([text(2), audio(120), text(1), audio(200), text(4)]),
        text(37),
    ]
    lengths = torch.tensor(CLIP_FRAMES)
    features = torch.randn(3, max(CLIP_FRAMES), 80, generator=gen)
    features[torch.arange(features.shape[1])[None] >= lengths[:, None]] = 0.0
    return prompts, features, lengths


def clips_of(prompt_index, features, lengths):
    """The clips of one prompt of the `batch` fixture, trimmed to its own longest clip."""
    index = {0: [0], 1: [1, 2], 2: []}[prompt_index]
    if not index:
        return None, None
    frames = int(lengths[index].max())
    return features[index, :frames], lengths[index]


def test_greedy_equals_recompute_loop(pair, batch):
    _, ours = pair
    prompts, features, lengths = batch
    params = SamplingParams(max_new_tokens=12, temperature=0, eos_token_ids=())
    rollout = generate(ours, prompts, params, audio_features=features, audio_lengths=lengths)
    assert rollout.tokens.shape == (3, 12) and rollout.mask.all()
    for i, prompt in enumerate(prompts):
        clip_features, clip_lengths = clips_of(i, features, lengths)
        expected = greedy_by_recompute(ours, prompt, 12, audio_features=clip_features, audio_lengths=clip_lengths)
        assert rollout.tokens[i].tolist() == expected


def test_greedy_equals_transformers_generate(pair, batch):
    """Prompt by prompt (batch 1, so no padding conventions differ), with audio."""
    reference, ours = pair
    prompts, features, lengths = batch
    rollout = generate(ours, prompts, SamplingParams(max_new_tokens=10, temperature=0, eos_token_ids=()),
                       audio_features=features, audio_lengths=lengths)
    for i, prompt in enumerate(prompts):
        clip_features, clip_lengths = clips_of(i, features, lengths)
        kwargs = {}
        if clip_features is not None:
            kwargs = dict(audio_input_features=clip_features,
                          audio_embed_sizes=torch.tensor([tokens_for(int(n)) for n in clip_lengths]))
            if len(clip_lengths) > 1:
                kwargs["audio_attention_mask"] = torch.arange(clip_features.shape[1])[None] < clip_lengths[:, None]
        out = reference.generate(input_ids=prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, **kwargs)
        assert rollout.tokens[i].tolist() == out[0, len(prompt):].tolist()


def test_logprobs_equal_teacher_forced_log_softmax(pair, batch):
    """One teacher-forced forward over every row's prompt + response, left-padded, with each
    row's clips padded to the same frame count as in the sampler's batch (the reference encoder
    lets padding shift a clip's encoding slightly, so the audio batch must be the same)."""
    _, ours = pair
    prompts, features, lengths = batch
    params = SamplingParams(max_new_tokens=9, temperature=1.3, top_k=20, seed=5, num_samples=2, eos_token_ids=(),
                            logprobs=True)
    rollout = generate(ours, prompts, params, audio_features=features, audio_lengths=lengths)
    rows = range(rollout.tokens.shape[0])
    sequences = [torch.cat([prompts[int(rollout.prompt_index[r])], rollout.tokens[r]]) for r in rows]
    width = max(len(seq) for seq in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for r, seq in enumerate(sequences):
        input_ids[r, width - len(seq):], mask[r, width - len(seq):] = seq, 1
    clips = [c for r in rows for c in {0: [0], 1: [1, 2], 2: []}[int(rollout.prompt_index[r])]]
    with torch.no_grad():
        logits = ours(input_ids, mask, features[clips], lengths[clips])
    length = rollout.tokens.shape[1]
    response_logits = logits[:, width - length - 1 : width - 1]  # the positions that predict the response
    expected = response_logits.log_softmax(-1).gather(-1, rollout.tokens[..., None])[..., 0]
    torch.testing.assert_close(rollout.logprobs[rollout.mask], expected[rollout.mask], rtol=0, atol=1e-5)
    assert (rollout.logprobs < 0).all()


def test_eos_stops_a_row_and_rows_equal_running_alone(pair, batch):
    _, ours = pair
    prompts, features, lengths = batch
    free = generate(ours, prompts, SamplingParams(max_new_tokens=10, temperature=0, eos_token_ids=()),
                    audio_features=features, audio_lengths=lengths)
    eos = int(free.tokens[0, 3])  # row 0 will stop after its 4th token
    params = SamplingParams(max_new_tokens=10, temperature=0, eos_token_ids=(eos, 250), logprobs=True)
    rollout = generate(ours, prompts, params, audio_features=features, audio_lengths=lengths, pad_token_id=0)
    assert free.logprobs is None  # asked for only where a caller reads them
    first_eos = free.tokens[0].tolist().index(eos)
    assert rollout.lengths[0] == first_eos + 1
    assert rollout.mask[0].tolist() == [True] * (first_eos + 1) + [False] * (rollout.mask.shape[1] - first_eos - 1)
    assert (rollout.tokens[0, first_eos + 1:] == 0).all() and (rollout.logprobs[0, first_eos + 1:] == 0).all()
    for i, prompt in enumerate(prompts):
        clip_features, clip_lengths = clips_of(i, features, lengths)
        alone = generate(ours, [prompt], params, audio_features=clip_features, audio_lengths=clip_lengths)
        n = int(rollout.lengths[i])
        assert n == int(alone.lengths[0])
        assert rollout.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist()


def test_num_samples_match_separate_seeded_calls_and_encode_audio_once(pair, batch):
    _, ours = pair
    prompts, features, lengths = batch
    calls = []
    hook = ours.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        params = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=3, seed=100, eos_token_ids=())
        rollout = generate(ours, prompts, params, audio_features=features, audio_lengths=lengths)
    finally:
        hook.remove()
    assert calls == [3]  # one encoder call for the three clips, not one per sample
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for n in range(3):
        single = generate(ours, prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=100 + n, eos_token_ids=()),
                          audio_features=features, audio_lengths=lengths)
        for i in range(3):
            assert rollout.tokens[3 * i + n].tolist() == single.tokens[i].tolist()
    distinct = {tuple(rollout.tokens[r].tolist()) for r in range(3)}
    assert len(distinct) > 1  # the samples of one prompt are not copies


def test_seed_reproducibility(pair, batch):
    _, ours = pair
    prompts, features, lengths = batch
    run = lambda seed: generate(ours, prompts, SamplingParams(max_new_tokens=6, seed=seed, eos_token_ids=()),  # noqa: E731
                                audio_features=features, audio_lengths=lengths).tokens
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


# ---------------------------------------------------------------------------------------------
# the sampling distribution itself (no model needed)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])


def empirical(params, draws=40000, steps=1):
    """Token counts of `draws` independent rows with the same logits."""
    streams = row_streams(params.seed or 0, draws, 1, "cpu")
    counts = torch.zeros(len(LOGITS))
    for step in range(steps):
        tokens = select_tokens(LOGITS.expand(draws, -1), params, streams, step)
        counts += torch.bincount(tokens, minlength=len(LOGITS))
    return counts


def chi_square(counts, probs):
    support = probs > 0
    expected = counts.sum() * probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=1, temperature=1.0, seed=1),
        SamplingParams(max_new_tokens=1, temperature=0.7, seed=2),
        SamplingParams(max_new_tokens=1, temperature=1.0, top_k=3, seed=3),
        SamplingParams(max_new_tokens=1, temperature=1.2, top_p=0.8, seed=4),
        SamplingParams(max_new_tokens=1, temperature=1.0, top_k=5, top_p=0.9, seed=5),
    ],
)
def test_empirical_frequencies_match_the_filtered_softmax(params):
    """Chi-square goodness of fit, 40000 draws. The 99.9% quantile of chi2 with 7 degrees of
    freedom is 24.3 (fewer degrees of freedom have smaller quantiles), so a correct sampler
    fails this with probability < 0.1% for a given seed, and the seeds are fixed."""
    probs = filter_logits(LOGITS[None], params)[0].softmax(-1)
    counts = empirical(params)
    assert counts[probs == 0].sum() == 0  # excluded tokens are never emitted
    statistic, dof = chi_square(counts, probs)
    assert statistic < 24.3, (statistic, dof)


def test_top_k_and_top_p_keep_the_right_sets():
    """By hand: exp(LOGITS) sums to 18.2617, so softmax sorted is id 0 (.4046), 7 (.2454),
    1 (.1488), 2 (.0903), 3 (.0548), ... A token is kept while the mass of the strictly more
    likely tokens is below p: mass before id 7 is .4046, before 1 is .6500, before 2 is .7989.
    top_k=3 -> {0, 7, 1}; top_p=0.7 -> {0, 7, 1}; top_p=0.6 and 0.5 -> {0, 7}; top_p=0.4 -> {0}."""
    keep = lambda **kw: set(torch.nonzero(torch.isfinite(  # noqa: E731
        filter_logits(LOGITS[None], SamplingParams(max_new_tokens=1, **kw))[0])).flatten().tolist())
    assert keep(top_k=3) == {0, 7, 1}
    assert keep(top_p=0.7) == {0, 7, 1}
    assert keep(top_p=0.6) == {0, 7}
    assert keep(top_p=0.5) == {0, 7}
    assert keep(top_p=0.4) == {0}


def test_bad_parameters_and_prompts():
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(max_new_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        SamplingParams(max_new_tokens=0)
    from rollout.sampler import left_pad

    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D tensor"):
        left_pad([torch.tensor([1, 2]), torch.tensor([[1]])], 0)


def test_right_padded_prefill_fills_the_cache_a_left_padded_prefill_would(pair, batch):
    """`prefill` runs the prompts right-padded (plain causal attention) and shifts each row's keys
    and values right by its padding; the real slots then hold what a left-padded prefill with the
    explicit mask writes (1e-5), and the returned hidden states are each prompt's last token's."""
    from rollout.kv_cache import StaticKVCache
    from rollout.sampler import left_pad, prefill

    _, ours = pair
    prompts, features, lengths = batch
    config = ours.decoder.config
    right = StaticKVCache.for_model(config, len(prompts), 64)
    left = StaticKVCache.for_model(config, len(prompts), 64)
    with torch.no_grad():
        last = prefill(ours, prompts, config.pad_token_id, right, features, lengths)
        input_ids, mask = left_pad(prompts, config.pad_token_id)
        hidden = ours.hidden_states(input_ids, mask, features, lengths, kv_cache=left)
    assert right.offset == left.offset == input_ids.shape[1]
    real = mask.bool()[:, None, :, None]  # (B, 1, P, 1)
    for ours_buffer, reference in zip((*right.keys, *right.values), (*left.keys, *left.values)):
        filled = ours_buffer[:, :, : right.offset]
        torch.testing.assert_close(filled * real, reference[:, :, : left.offset] * real, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, hidden[:, -1], atol=1e-5, rtol=0)


def test_shift_rows_moves_each_row_by_its_padding():
    from rollout.kv_cache import StaticKVCache

    cache = StaticKVCache(1, 2, 1, 1, 6)
    cache.update(0, torch.arange(1.0, 9.0).view(2, 1, 4, 1), -torch.arange(1.0, 9.0).view(2, 1, 4, 1))
    cache.advance(4)
    cache.shift_rows(torch.tensor([0, 2]))  # row 1 held 2 real slots of 4, right-padded
    assert cache.keys[0][:, 0, :4, 0].tolist() == [[1, 2, 3, 4], [5, 5, 5, 6]]
    assert cache.values[0][:, 0, :4, 0].tolist() == [[-1, -2, -3, -4], [-5, -5, -5, -6]]


def test_prefill_refuses_a_cache_that_already_holds_slots(pair, batch):
    from rollout.kv_cache import StaticKVCache
    from rollout.sampler import prefill

    _, ours = pair
    prompts, features, lengths = batch
    cache = StaticKVCache.for_model(ours.decoder.config, len(prompts), 64)
    cache.advance(1)
    with pytest.raises(ValueError, match="empty cache"):
        prefill(ours, prompts, ours.decoder.config.pad_token_id, cache, features, lengths)
