"""Rollouts against independent truth: transformers' greedy generate, teacher-forced log-probs with
transformers' own logits processors, a chi-square test of the sampler, and continuous batching
against one-by-one generation."""
import numpy as np
import pytest
import scipy.stats
import torch
import transformers
import jax
import jax.numpy as jnp
from flax import nnx

from jackpot_jax.models import Transformer, hf, preset
from jackpot_jax.rollout import DecodeCore, SamplingParams, generate, processed_log_probs, sample
from jackpot_jax.rollout.decode import Stops
from jackpot_jax.rollout.generate import request_keys

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**TINY, head_dim=16)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **TINY, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=32))),
}


@pytest.fixture(scope="module", params=[pytest.param("llama", marks=pytest.mark.slow), "qwen3"])  # llama: test-slow
def pair(request, tmp_path_factory):
    """A transformers model with random, fairly peaked weights and ours loaded from its checkpoint."""
    torch.manual_seed(0)
    cls, config = FAMILIES[request.param]
    theirs = cls(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    return theirs, hf.from_pretrained(path)


def prompts(rng, lengths=(5, 9, 3, 12, 7)):
    return [list(map(int, rng.integers(1, 300, n))) for n in lengths]


def test_greedy_equals_transformers_generate(pair, rng):
    """Five prompts of different lengths through 2 slots (continuous batching), token for token."""
    theirs, ours = pair
    batch = prompts(rng)
    rollout = generate(ours, batch, 12, temperature=0.0, max_concurrent_decodes=2)
    for prompt, completion in zip(batch, rollout.completions):
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert completion == want
    assert rollout.finish_reasons == ["length"] * 5
    assert all(np.all(lp == 0.0) for lp in rollout.logprobs)  # greedy: p_inf is a point mass


def teacher_forced(theirs, prompt, completion, processors):
    """log p_inf of every completion token, from one transformers forward over prompt + completion
    and transformers' own logits processors (the independent definition of p_inf)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = theirs(ids).logits[0, len(prompt) - 1:-1].double()
    rows = []
    for t in range(len(completion)):
        scores = logits[t:t + 1]
        for processor in processors:
            scores = processor(ids[:, :len(prompt) + t], scores)
        rows.append(torch.log_softmax(scores, dim=-1)[0])
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_teacher_forced_pass(pair, rng, temperature, top_p):
    theirs, ours = pair
    batch = prompts(rng, (4, 10))
    rollout = generate(ours, batch, 16, temperature=temperature, top_p=top_p, logprobs_top_k=5, n=2, seed=7,
                       max_concurrent_decodes=3)
    processors = [transformers.TemperatureLogitsWarper(temperature)]
    if top_p < 1:
        processors.append(transformers.TopPLogitsWarper(top_p))
    for i, completion in enumerate(rollout.completions):
        prompt = batch[rollout.prompt_index[i]]
        want = teacher_forced(theirs, prompt, completion, processors)
        got = rollout.logprobs[i]
        np.testing.assert_allclose(got, want[np.arange(len(completion)), completion], atol=1e-4)
        want_top = np.sort(want, axis=-1)[:, ::-1][:, :5]
        np.testing.assert_allclose(rollout.topk_logprobs[i], want_top, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(want, rollout.topk_ids[i], -1), want_top, atol=1e-4)
    if top_p < 1:  # the nucleus really truncates here
        assert any(np.isinf(tl).any() for tl in rollout.topk_logprobs)


def test_sampling_frequencies_match_the_processed_distribution():
    """Chi-square goodness of fit at alpha = 0.001 (seeded, so deterministic): 40,000 draws from
    one context at temperature 0.8 with top-k 20, against the distribution transformers'
    warpers define. Bins with expected count < 5 are merged."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 300)) * 2.0
    params = SamplingParams.fill(1, 0.8, 1.0, 20)
    keys = jax.random.split(jax.random.key(11), 40_000)
    draws = jax.vmap(lambda k: sample(k[None], jnp.asarray(logits, jnp.float32), params).tokens[0])(keys)
    scores = transformers.TopKLogitsWarper(20)(None, transformers.TemperatureLogitsWarper(0.8)(
        None, torch.tensor(logits, dtype=torch.float64)))
    p = torch.softmax(scores, -1)[0].numpy()
    observed = np.bincount(np.asarray(draws), minlength=300).astype(float)
    assert observed[p == 0].sum() == 0
    expected = p * len(keys)
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    assert scipy.stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue > 1e-3
    # and the log-probs the sampler reports are those of the same distribution
    got = np.asarray(processed_log_probs(jnp.asarray(logits, jnp.float32), params))[0]
    np.testing.assert_allclose(np.exp(got), p, atol=1e-6)


def test_continuous_batching_equals_one_by_one_generation(rng):
    """Per-prompt seeds; a frequent EOS token makes requests end at different steps, so slots are
    refilled mid-flight, and requests end inside a multi-step decode call (8 steps per call
    together, 1 alone: the one-token-per-call loop is the reference)."""
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    batch = prompts(rng, (3, 8, 5, 11, 2, 6))
    seeds = [5, 6, 7, 8, 9, 10]
    opts = dict(temperature=1.0, top_k=8, logprobs_top_k=2, n=2, eos_token_ids=list(range(0, 512, 9)))
    together = generate(model, batch, 10, seed=seeds, max_concurrent_decodes=3, steps_per_call=8, **opts)
    assert {"eos", "length"} <= set(together.finish_reasons)
    # some request drew EOS inside the first 8-step call (its later draws must be dropped)
    assert any(2 <= len(c) <= 8 for c, r in zip(together.completions, together.finish_reasons) if r == "eos")
    for i, (prompt, seed) in enumerate(zip(batch, seeds)):
        alone = generate(model, [prompt], 10, seed=[seed], max_concurrent_decodes=1, steps_per_call=1, **opts)
        for j in range(2):
            assert together.completions[2 * i + j] == alone.completions[j]
            assert together.finish_reasons[2 * i + j] == alone.finish_reasons[j]
            np.testing.assert_allclose(together.logprobs[2 * i + j], alone.logprobs[j], atol=1e-5)
            np.testing.assert_array_equal(together.topk_ids[2 * i + j], alone.topk_ids[j])


def test_slices_of_a_batch_with_first_prompt_draw_the_whole_batchs_samples(rng):
    """How several processes generate one batch: each its slice with ``first_prompt`` = the slice's
    place; the samples are the whole batch's (an int seed keys each prompt by its index)."""
    core = DecodeCore(Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(2)), max_concurrent_decodes=4,
                      max_prefill_length=16, max_target_length=32)
    batch = prompts(rng, (3, 8, 5, 11, 2, 6))
    opts = dict(temperature=1.0, n=2, seed=11, eos_token_ids=list(range(0, 512, 9)))
    whole = generate(core, batch, 10, **opts)
    slices = [generate(core, batch[i:i + 2], 10, first_prompt=i, **opts) for i in (0, 2, 4)]
    assert [c for s in slices for c in s.completions] == whole.completions
    shifted = generate(core, batch[2:4], 10, **opts)  # the same prompts keyed as the batch's first two
    assert shifted.completions != whole.completions[4:8]


def test_request_keys_fold_the_prompts_place_then_the_sample():
    """The keys the samples are drawn with (fixed: results recorded in docs/ depend on them):
    sample j of prompt i of a batch whose first prompt has place f folds f + i, then j, into key(seed)."""
    keys = request_keys(7, 3, 2, first_prompt=5)
    for i in range(3):
        for j in range(2):
            expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 5 + i), j)
            np.testing.assert_array_equal(jax.random.key_data(keys[i][j]), jax.random.key_data(expected))


def test_generate_steps_equals_repeated_generate(rng):
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(4))
    core = DecodeCore(model, max_concurrent_decodes=2, max_prefill_length=16, max_target_length=32,
                      logprobs_top_k=3)

    batch = prompts(rng, (5, 9))

    def started():
        state = core.init_decode_state()
        for slot, prompt in enumerate(batch):
            state = core.insert(core.prefill(core.params, prompt, len(prompt), key=jax.random.key(slot)), state, slot)
        return state

    one, drawn = started(), []
    for _ in range(5):
        fed = np.asarray(one.tokens)
        one, consumed = core.generate(core.params, one)  # the token each slot consumed, its 1-based index
        np.testing.assert_array_equal(consumed, np.stack([fed, np.full(2, len(drawn) + 1)], axis=1))
        drawn.append(jax.device_get(one.last))
    many, steps = core.generate_steps(core.params, started(), 5)
    for t in range(5):
        for field in ("tokens", "logprobs", "topk_ids", "topk_logprobs"):
            np.testing.assert_allclose(getattr(steps.sampled, field)[t], getattr(drawn[t], field), atol=1e-6)
    np.testing.assert_array_equal(many.steps, one.steps)
    assert steps.valid.all() and (steps.finish == 0).all()  # JetStream's inserts have no length limit
    with pytest.raises(ValueError, match="steps=0 is not allowed"):
        core.generate_steps(core.params, many, 0)


def test_a_shared_batched_admission_equals_separate_prefills(rng):
    """Six requests over three prompts (one bucket of two, one of one), admitted in batched calls
    where each prompt is prefilled once, decode exactly as one-request prefills inserted one by
    one; a request limited to one token finishes at admission."""
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(4))
    core = DecodeCore(model, max_concurrent_decodes=8, max_prefill_length=32, max_target_length=48, logprobs_top_k=3)
    a, b, c = prompts(rng, (5, 9, 20))
    batch, slots, limits = [a, b, a, c, b, a], [6, 0, 3, 1, 7, 2], [9, 9, 9, 9, 9, 1]
    keys = [jax.random.key(10 + r) for r in range(6)]
    sampling = SamplingParams.fill(6, 1.0, 0.9, 0)
    stops = Stops.make()
    state = core.init_decode_state()
    for prompt, slot in zip(batch, slots):  # pages for the prompt and the 4 steps below
        assert core.pages.reserve(slot, len(prompt) + 4)
    state, outputs = core.admit(core.params, state, batch, slots,
                                jax.random.key_data(jnp.stack(keys)), sampling, limits, stops)
    assert sorted(sum(r >= 0 for r in rows) for rows, _, _ in outputs) == [1, 5]  # the 16 and the 32 bucket
    pages = core.pages
    one = core.init_decode_state()  # a new pool: insert takes pages for the prompt, generate_steps needs the rest
    for r, (prompt, slot) in enumerate(zip(batch, slots)):
        prefix = core.prefill(core.params, prompt, len(prompt), sampling=SamplingParams.fill(1, 1.0, 0.9, 0),
                              key=keys[r])
        for rows, first, finish in outputs:  # the request of each row, -1 for padding
            if r in rows:
                i = rows.index(r)
                assert int(first.tokens[i]) == int(prefix.first.tokens[0])
                np.testing.assert_allclose(first.topk_logprobs[i], prefix.first.topk_logprobs[0], atol=1e-6)
                assert int(finish[i]) == (3 if limits[r] == 1 else 0)
        one = core.insert(prefix, one, slot)
    for slot, prompt in zip(slots, batch):
        assert core.pages.reserve(slot, len(prompt) + 4)
    one, want = core.generate_steps(core.params, one, 4, stops)
    core.pages = pages
    state, drawn = core.generate_steps(core.params, state, 4, stops)
    used = np.asarray(slots[:5])  # slot 2's request ended at admission: its draws are invalid
    np.testing.assert_array_equal(drawn.sampled.tokens[:, used], want.sampled.tokens[:, used])
    np.testing.assert_allclose(drawn.sampled.logprobs[:, used], want.sampled.logprobs[:, used], atol=1e-5)
    assert drawn.valid[:, used].all() and not drawn.valid[:, 2].any() and not drawn.valid[:, [4, 5]].any()


def test_paged_cache_equals_contiguous_and_a_full_pool_queues_and_preempts(rng):
    """The same requests (mixed lengths, EOS) through a contiguous cache, a pool as large as it,
    and a pool of 10 pages of 4 positions for 4 slots: admission waits for pages and a growing
    request preempts the latest admitted one, which starts over with the same draws."""
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(5))
    batch = prompts(rng, (3, 9, 5, 12, 2, 7))
    opts = dict(temperature=1.0, top_p=0.9, logprobs_top_k=2, n=2, seed=3, eos_token_ids=list(range(0, 512, 17)),
                steps_per_call=2)
    cores = [DecodeCore(model, max_concurrent_decodes=4, max_prefill_length=16, max_target_length=40,
                        logprobs_top_k=2, **kwargs)
             for kwargs in (dict(page_size=None), dict(page_size=4), dict(page_size=4, num_pages=11))]
    contiguous, paged, small = (generate(core, batch, 24, **opts) for core in cores)
    assert {"eos", "length"} <= set(contiguous.finish_reasons)
    assert small.preempted > 0 and paged.preempted == 0
    for got in (paged, small):
        assert got.completions == contiguous.completions and got.finish_reasons == contiguous.finish_reasons
        for a, b in zip(got.logprobs, contiguous.logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
        for a, b in zip(got.topk_logprobs, contiguous.topk_logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert cores[2].pages.free_pages() == 10  # every page back in the pool
    tiny_pool = DecodeCore(model, max_concurrent_decodes=4, max_prefill_length=16, max_target_length=40, page_size=4,
                           num_pages=5)
    with pytest.raises(ValueError, match="needs 6 pages of 4 positions, more than the engine's pool of 4"):
        generate(tiny_pool, [[1] * 12], 10)  # refused before anything runs


def test_slots_over_devices_hold_a_part_of_the_pool_each_and_sample_as_one_device(rng):
    """128 slots over the 8 (fake CPU) devices: each device holds 1/8 of the KV pool and decodes its
    16 slots with the whole model, and the samples are the one-device engine's, through the batch
    driver and through the one-request prefill / insert / generate steps."""
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(5))
    devices = jax.devices()
    assert len(devices) == 8
    kwargs = dict(max_concurrent_decodes=128, max_prefill_length=16, max_target_length=32, logprobs_top_k=2,
                  page_size=8)
    one, spread = DecodeCore(model, **kwargs), DecodeCore(model, devices=devices, **kwargs)
    batch = prompts(rng, (3, 9, 5, 12, 2, 7))
    opts = dict(temperature=1.0, top_p=0.9, n=3, seed=3, eos_token_ids=list(range(0, 512, 17)), steps_per_call=4)
    want, got = generate(one, batch, 12, **opts), generate(spread, batch, 12, **opts)
    assert got.completions == want.completions and got.finish_reasons == want.finish_reasons
    for a, b in zip(got.logprobs + got.topk_logprobs, want.logprobs + want.topk_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    pool = spread.init_decode_state().cache.k[0]  # [K, num_pages, page, d], split along its pages
    assert pool.shape[1] == spread.num_pages == 128 * 4 + 8
    assert {shard.device for shard in pool.addressable_shards} == set(devices)
    assert all(shard.data.shape[1] == pool.shape[1] // 8 for shard in pool.addressable_shards)

    def served(core, slot):  # JetStream's steps: a request into one slot, three generate steps
        state = core.insert(core.prefill(core.params, batch[1], len(batch[1]), key=jax.random.key(9)),
                            core.init_decode_state(), slot)
        tokens = []
        for _ in range(3):
            state, consumed = core.generate(core.params, state)
            tokens.append(int(consumed[slot, 0]))
        return tokens

    assert served(spread, 37) == served(one, 37)


def test_stop_sequences_and_eos_end_a_completion(pair, rng):
    _, model = pair
    prompt = prompts(rng, (6,))
    free = generate(model, prompt, 12, temperature=0.0).completions[0]
    stop = free[3:5]
    end = next(t for t in range(2, 13) if free[t - 2:t] == stop)  # the first time the stop sequence appears
    rollout = generate(model, prompt, 12, temperature=0.0, stop_sequences=[stop])
    assert rollout.completions[0] == free[:end] and rollout.finish_reasons == ["stop"]
    rollout = generate(model, prompt, 12, temperature=0.0, eos_token_ids=[free[2]])
    assert rollout.completions[0] == free[:free.index(free[2]) + 1] and rollout.finish_reasons == ["eos"]
    rollout = generate(model, prompt, 12, temperature=0.0, eos_token_ids=[free[0]], stop_sequences=[free[:1]])
    assert rollout.completions[0] == free[:1] and rollout.finish_reasons == ["eos"]  # EOS before a stop
    rollout = generate(model, prompt * 2, 1, temperature=0.0, stop_sequences=[free[1:3]])
    assert rollout.completions == [free[:1]] * 2 and rollout.finish_reasons == ["length"] * 2


def test_update_params_changes_what_the_engine_generates(rng):
    model, other = (Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(s)) for s in (2, 3))
    core = DecodeCore(model, max_concurrent_decodes=2, max_prefill_length=16, max_target_length=32)
    batch = prompts(rng, (4, 6))
    before = generate(core, batch, 8, temperature=0.0).completions
    assert before == generate(model, batch, 8, temperature=0.0).completions
    core.update_params(nnx.state(other, nnx.Param))
    assert generate(core, batch, 8, temperature=0.0).completions == generate(other, batch, 8, temperature=0.0).completions


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 2], [600]]), r"prompt 1 must hold integer token ids in \[0, 512\)"),
    (dict(max_new_tokens=0), "max_new_tokens=0 is not allowed"),
    (dict(temperature=-1.0), "temperature=-1.0 is not allowed"),
    (dict(top_p=0.0), "top_p=0.0 is not allowed"),
    (dict(seed=[1, 2, 3]), "seed has 3 entries for 1 prompts"),
])
def test_bad_requests_give_clear_errors(kwargs, match):
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_engine_limits_give_clear_errors():
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    core = DecodeCore(model, max_concurrent_decodes=2, max_prefill_length=16, max_target_length=24)
    with pytest.raises(ValueError, match="a prompt of 17 tokens is longer than max_prefill_length=16"):
        generate(core, [[1] * 17], 4)
    with pytest.raises(ValueError, match="needs 29 cache positions, more than the engine's max_target_length=24"):
        generate(core, [[1] * 10], 20)
