"""jackpot_jax.models against Hugging Face transformers (PyTorch CPU) on the same tiny weights:
logits on padded batches, checkpoint round trips both ways, both config.json forms; the KV cache
against the full forward; errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flax import nnx
from jackpot_jax.models import ModelConfig, Transformer, hf, preset

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
# one tiny random config per family, each exercising that family's particulars
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM,
              transformers.LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA3, rms_norm_eps=1e-5)),
    "qwen2": (transformers.Qwen2ForCausalLM,
              transformers.Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3ForCausalLM,
              transformers.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False)),
}


def hf_model(family, seed=0):
    """A transformers model with random weights (perturbed away from the init so that norms and
    biases matter), float32, eval mode."""
    torch.manual_seed(seed)
    cls, config = FAMILIES[family]
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, tokens, mask, positions=None):
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
        return model(torch.tensor(tokens), attention_mask=torch.tensor(mask), **kwargs).logits.numpy()


def padded_batch(rng, vocab, left=False):
    """3 sequences of lengths 11, 7, 4, right- (or left-) padded to 11, and HF position ids."""
    lengths = [11, 7, 4]
    tokens = rng.integers(0, vocab, (3, 11))
    mask = np.array([[1] * n + [0] * (11 - n) for n in lengths])
    if left:
        mask = mask[:, ::-1].copy()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    model = hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return family, model, path


@pytest.mark.parametrize("left", [False, True])
def test_logits_match_transformers_on_padded_batches(checkpoint, rng, left):
    family, model, path = checkpoint
    ours = hf.from_pretrained(path)
    assert ours.config.model_type == family
    tokens, mask, positions = padded_batch(rng, 300, left)
    want = hf_logits(model, tokens, mask, positions)
    got = np.asarray(ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_array_less(np.abs(got - want)[real].max(), 1e-4)
    assert np.abs(want).max() > 0.5  # not a vacuous comparison


def test_save_pretrained_loads_in_transformers_with_the_same_logits(checkpoint, rng, tmp_path):
    family, model, path = checkpoint
    ours = hf.from_pretrained(path)
    hf.save_pretrained(ours, tmp_path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    reloaded = FAMILIES[family][0].from_pretrained(tmp_path).eval()
    tokens, mask, _ = padded_batch(rng, 300)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask), atol=1e-6)
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_both_config_json_forms_load_the_same_config(tmp_path):
    """transformers 5 writes rope_parameters; the published checkpoints have rope_theta and
    rope_scaling (and sometimes the old "type" key)."""
    model = hf_model("llama")
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written
    legacy = {k: v for k, v in written.items() if k != "rope_parameters"}
    legacy["rope_theta"] = written["rope_parameters"]["rope_theta"]
    legacy["rope_scaling"] = {("type" if k == "rope_type" else k): v
                              for k, v in written["rope_parameters"].items() if k != "rope_theta"}
    new, old = ModelConfig.from_hf(written), ModelConfig.from_hf(legacy)
    assert new == old
    assert new.rope_theta == 500000.0 and new.rope_scaling["rope_type"] == "llama3"
    assert new.rope_scaling["original_max_position_embeddings"] == 32


def test_sharded_checkpoint_with_index_loads(tmp_path, rng):
    model = hf_model("qwen3")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / hf.INDEX_FILE).exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = hf.from_pretrained(tmp_path)
    tokens, mask, _ = padded_batch(rng, 300)
    got = np.asarray(ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    np.testing.assert_array_less(np.abs(got - hf_logits(model, tokens, mask))[mask.astype(bool)].max(), 1e-4)
    # and our own writer shards with an index too, which transformers reads
    out = tmp_path / "ours"
    hf.save_pretrained(ours, out, max_shard_bytes=100_000)
    assert (out / hf.INDEX_FILE).exists()
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask), atol=1e-6)


def test_bfloat16_checkpoint_loads_in_its_dtype(tmp_path):
    model = hf_model("qwen2").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ours = hf.from_pretrained(tmp_path)
    assert ours.config.param_dtype == "bfloat16" and ours.embed_tokens[...].dtype == jnp.bfloat16
    f32 = hf.from_pretrained(tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.asarray(f32.embed_tokens[...]),
                                  model.model.embed_tokens.weight.detach().float().numpy())


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen2", "tiny-llama"])
def test_kv_cache_decode_equals_the_full_forward(rng, name):
    """Prefill prompts of different lengths (a right-padded chunk), then decode one token at a
    time: every step's logits equal the full forward's at that position."""
    config = preset(name)
    model = Transformer(config, rngs=nnx.Rngs(1))
    lengths = np.array([5, 2, 8])
    total = 12
    tokens = rng.integers(0, config.vocab_size, (3, total))
    full = np.asarray(model(jnp.asarray(tokens)))

    cache = model.init_cache(3, 16)
    prompt_mask = np.arange(8)[None, :] < lengths[:, None]
    h, cache = model.hidden_states(jnp.asarray(tokens[:, :8]), attention_mask=jnp.asarray(prompt_mask), cache=cache)
    np.testing.assert_array_equal(cache.lengths, lengths)
    prefill = np.asarray(model.logits(h))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(prefill[b, :n], full[b, :n], atol=2e-5)
    decode = jax.jit(lambda tok, cache: model.hidden_states(tok, cache=cache))
    for step in range(total - lengths.max()):
        position = lengths + step
        h, cache = decode(jnp.asarray(tokens[np.arange(3), position])[:, None], cache)
        got = np.asarray(model.logits(h))[:, 0]
        np.testing.assert_allclose(got, full[np.arange(3), position], atol=2e-5)
    np.testing.assert_array_equal(cache.lengths, lengths + total - lengths.max())


@pytest.mark.slow  # ~17 s: `make test-slow`
def test_packed_segments_attend_only_within_themselves(rng):
    config = preset("tiny-qwen3")
    model = Transformer(config, rngs=nnx.Rngs(2))
    a, b = rng.integers(0, config.vocab_size, 5), rng.integers(0, config.vocab_size, 4)
    packed = model(jnp.asarray(np.concatenate([a, b]))[None], segment_ids=jnp.asarray([[1] * 5 + [2] * 4]))
    np.testing.assert_allclose(packed[0, :5], model(jnp.asarray(a)[None])[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 5:], model(jnp.asarray(b)[None])[0], atol=2e-5)


def test_hidden_states_and_unembedding_give_the_logits(rng):
    for tied in (True, False):
        config = preset("tiny-qwen3", tie_word_embeddings=tied)
        model = Transformer(config, rngs=nnx.Rngs(3))
        tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 6)))
        h, _ = model.hidden_states(tokens)
        w = model.unembedding()
        assert h.shape == (2, 6, config.hidden_size) and w.shape == (config.hidden_size, config.vocab_size)
        np.testing.assert_allclose(np.asarray(h) @ np.asarray(w), model(tokens), rtol=1e-5, atol=1e-5)


def test_remat_changes_nothing_but_memory(rng):
    config = preset("tiny-llama")
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 6)))

    def grads(remat):
        model = Transformer(config.replace(remat=remat), rngs=nnx.Rngs(4))
        loss = lambda m: jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])
        return nnx.grad(loss)(model)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute(rng):
    """The float32 model's weights rounded to bfloat16, computing in bfloat16: logits within
    bfloat16 rounding of the float32 model's."""
    f32 = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(5))
    model = Transformer(preset("tiny-qwen3", dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32, nnx.Param)))
    tokens = jnp.asarray(rng.integers(0, 512, (2, 6)))
    assert model.hidden_states(tokens)[0].dtype == jnp.bfloat16
    want = np.asarray(f32(tokens))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(model(tokens), want, atol=0.03 * np.abs(want).max())


# --------------------------------------------------------------------------- config and errors


def test_presets_have_the_published_sizes():
    """Parameter counts as the model cards state them, total and without the embedding: Qwen3-1.7B
    1.7B / 1.4B, Qwen3-4B 4.0B / 3.6B, Qwen3-8B 8.2B / 6.95B, Qwen2.5-1.5B 1.54B / 1.31B,
    Qwen2.5-3B 3.09B / 2.77B; Llama-3.2-1B 1.23B and Llama-3.1-8B 8.03B in total."""
    expected = {"qwen3-0.6b": (0.6e9, 0.44e9), "qwen3-1.7b": (1.7e9, 1.4e9), "qwen3-4b": (4.0e9, 3.6e9), "qwen3-8b": (8.2e9, 6.95e9),
                "qwen2.5-1.5b": (1.54e9, 1.31e9), "qwen2.5-3b": (3.09e9, 2.77e9), "llama-3.2-1b": (1.23e9, None),
                "llama-3.1-8b": (8.03e9, None)}
    for name, (total, non_embedding) in expected.items():
        config = preset(name)
        count = config.num_params()
        embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
        assert abs(count / total - 1) < 0.015, (name, count)
        assert non_embedding is None or abs((count - embedding) / non_embedding - 1) < 0.015, (name, count)


def test_config_round_trips_through_hf_json():
    for name in ("qwen3-8b", "qwen2.5-1.5b", "llama-3.1-8b", "tiny-llama"):
        config = preset(name)
        assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "gpt2"}, "model_type='gpt2' in config.json is not supported: supported model types are"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "needs the keys"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 is not allowed"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_bad_config_json_gives_a_clear_error(bad, match):
    config = {**preset("tiny-qwen3").to_hf(), **bad}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(config)


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        hf.from_pretrained(tmp_path)
    model = hf_model("qwen3")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.self_attn\.\w_proj\.bias is missing"):
        hf.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match=r"tensors the config does not use: \['model\.layers\.1\."):
        hf.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors"):
        hf.from_pretrained(tmp_path)


# --------------------------------------------------------------------------- tokenizers


def write_tokenizer(path, words, chat_template=None):
    """A word-level Hugging Face tokenizer over ``words`` (plus specials), saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return vocab


def test_load_tokenizer_from_a_local_directory_with_its_chat_template(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    vocab = write_tokenizer(tmp_path, ["user", ":", "what", "is", "two", "plus", "three"], template)
    tok = hf.load_tokenizer(tmp_path)
    ids = tok.encode("what is two plus three")
    assert ids == [vocab[w] for w in "what is two plus three".split()]
    assert tok.decode(ids) == "what is two plus three"
    chat = tok.apply_chat_template([{"role": "user", "content": "two plus three"}], tokenize=False)
    assert chat.strip() == "user : two plus three"
    with pytest.raises(FileNotFoundError, match="tokenizer directory .* does not exist"):
        hf.load_tokenizer(tmp_path / "missing")


def test_tokenizer_difference_names_a_differing_id(tmp_path):
    write_tokenizer(tmp_path / "a", ["one", "two"])
    write_tokenizer(tmp_path / "b", ["one", "two"])
    write_tokenizer(tmp_path / "c", ["one", "three"])
    a, b, c = (hf.load_tokenizer(tmp_path / name) for name in "abc")
    assert hf.tokenizer_difference(a, b) is None
    assert "id 3 is 'two' in the first and 'three' in the second" in hf.tokenizer_difference(a, c)


def chain_model(vocab, chain):
    """tiny-qwen3 over ``vocab`` whose greedy next token is ``chain[token]`` (token ids): the blocks
    add nothing (zero weights), the embeddings are one-hot and the unembedding maps each token to its
    successor (a token without one: all logits 0)."""
    config = preset("tiny-qwen3", vocab_size=len(vocab), tie_word_embeddings=False)
    model = Transformer(config, rngs=nnx.Rngs(0))
    for layer in model.layers:
        nnx.update(layer, jax.tree.map(jnp.zeros_like, nnx.state(layer, nnx.Param)))
    model.embed_tokens[...] = jnp.eye(len(vocab), config.hidden_size)
    head = np.zeros((config.hidden_size, len(vocab)), np.float32)
    head[list(chain), list(chain.values())] = 1.0
    model.lm_head[...] = jnp.asarray(head)
    return model


def test_save_pretrained_with_the_tokenizer_stops_generate_at_every_end_token(tmp_path):
    """A Qwen-chat-like tokenizer (eos <|im_end|>, and <|endoftext|>): the checkpoint has the
    tokenizer and its chat template, the ids in config.json and generation_config.json (eos: both
    end tokens, the source's sampling defaults kept), and transformers' greedy generate stops at
    <|endoftext|>, which the model emits after two tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<|im_end|>", "<|endoftext|>", "a", "b", "c"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} <|im_end|> {% endfor %}"
    fast.save_pretrained(tmp_path / "tokenizer")
    tokenizer = hf.load_tokenizer(tmp_path / "tokenizer")
    model = chain_model(vocab, {3: 4, 4: 5, 5: 2})  # a -> b -> c -> <|endoftext|>
    source = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": 1, "transformers_version": "4.51"}
    out = tmp_path / "out"
    hf.save_pretrained(model, out, tokenizer=tokenizer, generation_config=source)

    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == ([1, 2], 0, None)
    assert hf.end_token_ids(tokenizer) == [1, 2]  # where the trainer's rollouts and jackpot-eval stop too
    assert json.loads((out / "generation_config.json").read_text()) == {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "eos_token_id": [1, 2], "pad_token_id": 0}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.generation_config.eos_token_id == [1, 2] and loaded.generation_config.temperature == 0.7
    assert loaded_tokenizer.eos_token_id == 1 and loaded_tokenizer.chat_template == fast.chat_template
    prompt = torch.tensor([loaded_tokenizer.encode("a")])
    generated = loaded.generate(prompt, max_new_tokens=10, do_sample=False)
    assert generated[0].tolist() == [3, 4, 5, 2]  # stopped at <|endoftext|>, not at max_new_tokens

    with pytest.raises(ValueError, match=r"eos_token_id=\[1, 2\] is not allowed: the model has vocab_size=2"):
        hf.save_pretrained(chain_model({"x": 0, "y": 1}, {}), tmp_path / "small", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        hf.save_pretrained(model, tmp_path / "no_tokenizer", generation_config=source)
