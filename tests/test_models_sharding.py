"""Sharding on 8 fake CPU devices (tests/conftest.py) and the model registry with a deliberately
different toy Flax model."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from jackpot_jax.models import Transformer, build, check_protocol, hf, preset, register, sharding
from jackpot_jax.models.transformer import param
from jackpot_jax.train.step import StepConfig, Updater


def mesh(data, fsdp, tensor):
    assert jax.device_count() >= 8, "tests/conftest.py asks for 8 fake CPU devices"
    return sharding.make_mesh(data, fsdp, tensor)


def specs(model):
    return {".".join(map(str, path)): v[...].sharding.spec
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_logical_to_spec_follows_the_rules_and_replicates_what_does_not_divide():
    m = mesh(1, 4, 2)
    assert sharding.logical_to_spec(("embed", "q_heads"), (64, 64), m) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (512, 64), m) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), m) == P("fsdp", None)  # 3 % 2
    assert sharding.logical_to_spec(("batch", "length", "embed"), (8, 5, 64), m) == P(("data", "fsdp"), None, None)
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        sharding.logical_to_spec(("experts",), (4,), m)


@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_the_unsharded_one_and_params_are_partitioned(rng, shape):
    config = preset("tiny-qwen3", tie_word_embeddings=False)
    m = mesh(*shape)
    model = sharding.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), m)
    reference = Transformer(config, rngs=nnx.Rngs(0))  # same seed, one device
    got = specs(model)
    fsdp, tensor = ("fsdp" if shape[1] > 1 else None), "tensor"
    assert got["layers.0.self_attn.q_proj.kernel"] == P(fsdp, tensor)
    assert got["layers.0.self_attn.o_proj.kernel"] == P(tensor, fsdp)
    assert got["layers.0.mlp.down_proj.kernel"] == P(tensor, fsdp)
    assert got["embed_tokens"] == P(tensor, fsdp)
    assert got["lm_head"] == P(fsdp, tensor)
    assert got["norm.scale"] == P(None)
    q = model.layers[0].self_attn.q_proj.kernel[...]
    assert q.addressable_shards[0].data.shape == (64 // shape[1], 64 // 2)  # really partitioned

    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (4, 8)))
    mask = jnp.asarray(np.arange(8)[None, :] < np.array([8, 5, 3, 8])[:, None])
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, mask):
        with sharding.activation_sharding(m):
            return nnx.merge(graphdef, state)(tokens, attention_mask=mask)

    np.testing.assert_allclose(forward(state, tokens, mask), reference(tokens, attention_mask=mask), atol=2e-5)


def test_from_pretrained_places_each_tensor_in_its_sharding(tmp_path, rng):
    config = preset("tiny-qwen2")
    model = Transformer(config, rngs=nnx.Rngs(1))
    hf.save_pretrained(model, tmp_path)
    m = mesh(1, 4, 2)
    loaded = hf.from_pretrained(tmp_path, mesh=m)
    got = specs(loaded)
    assert got["layers.1.self_attn.k_proj.kernel"] == P("fsdp", "tensor")
    assert got["layers.1.self_attn.k_proj.bias"] == P("tensor")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 6)))
    np.testing.assert_allclose(loaded(tokens), model(tokens), atol=2e-5)


def test_the_trainer_loads_checkpoints_into_the_mesh_and_decodes_on_them(tmp_path, rng):
    """build.build_models with the update's mesh reads each tensor into its shards (never the whole
    model on one device), and a decoding core on those sharded parameters samples what it samples
    on one device (same tokens, log-probs within float32 reordering)."""
    from configs.demo import get_config  # noqa: PLC0415
    from jackpot_jax.data.char_tokenizer import make_char_tokenizer  # noqa: PLC0415
    from jackpot_jax.rollout import DecodeCore, generate  # noqa: PLC0415
    from jackpot_jax.train import build as train_build  # noqa: PLC0415

    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(3))
    hf.save_pretrained(model, tmp_path)
    config = get_config()
    config.policy.path = config.actor.path = str(tmp_path)
    m = mesh(1, 4, 2)
    # the checkpoint has no tokenizer files (a run would refuse it): the ids are the char tokenizer's
    policy, actor = train_build.build_models(config, make_char_tokenizer(), m)
    for loaded in (policy, actor):
        assert specs(loaded)["layers.1.self_attn.k_proj.kernel"] == P("fsdp", "tensor")
        assert all(x.sharding.mesh == m for x in jax.tree.leaves(nnx.state(loaded, nnx.Param)))
    batch = [list(map(int, rng.integers(3, 100, n))) for n in (4, 7, 2)]

    def sample(generator):
        core = DecodeCore(generator, max_concurrent_decodes=4, max_prefill_length=16, max_target_length=32)
        return generate(core, batch, 10, temperature=1.0, n=2, seed=5)

    sharded, single = sample(policy), sample(model)
    assert sharded.completions == single.completions
    for got, want in zip(sharded.logprobs, single.logprobs):
        np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------- registry


class BigramLM(nnx.Module):
    """Not a transformer: each position's hidden state is a function of its own token only
    (embedding -> tanh MLP), so its "cache" is just the lengths."""

    def __init__(self, config, *, rngs):
        self.config = config
        init = jax.nn.initializers.normal(0.5)
        self.embed = param(init(rngs.params(), (config.vocab_size, config.hidden_size)), ("vocab", "embed"))
        self.mix = param(init(rngs.params(), (config.hidden_size, config.hidden_size)), ("embed", "mlp"))
        self.out = param(init(rngs.params(), (config.hidden_size, config.vocab_size)), ("embed", "vocab"))

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, attention_mask=None, cache=None):
        h = jnp.tanh(jnp.take(self.embed[...], tokens, axis=0) @ self.mix[...])
        if cache is None:
            return h, None
        new = tokens.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=1)
        return h, {"lengths": cache["lengths"] + new}

    def unembedding(self):
        return self.out[...]

    def init_cache(self, batch, max_len):
        return {"lengths": jnp.zeros((batch,), jnp.int32)}


def test_a_different_flax_model_plugs_in_through_the_registry(rng):
    register("bigram-test", BigramLM)
    config = preset("tiny-qwen3", vocab_size=40, hidden_size=8)
    model = build("bigram-test", config, rngs=nnx.Rngs(0))
    # what the trainer does with any registered model: h and w into the vocabulary kernels
    tokens = jnp.asarray(rng.integers(0, 40, (2, 5)))
    h, _ = model.hidden_states(tokens)
    targets = tokens[:, 1:].reshape(-1)
    logp, *_ = pk.fused_token_stats(h[:, :-1].reshape(-1, 8), model.unembedding(), targets, 3, block_v=16)
    e, mix, out = (np.asarray(x, np.float64) for x in (model.embed[...], model.mix[...], model.out[...]))
    logits = np.tanh(e[np.asarray(tokens)] @ mix) @ out
    want = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(want[:, :-1], np.asarray(tokens)[:, 1:, None], -1).reshape(-1)
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-5)
    _, cache = model.hidden_states(tokens, cache=model.init_cache(2, 8))
    np.testing.assert_array_equal(cache["lengths"], [5, 5])
    # and it shards by the same rules
    sharding.shard_model(model, mesh(1, 4, 2))
    assert model.out[...].sharding.spec == P("fsdp", "tensor")
    # by import path too
    assert type(build("tests.test_models_sharding:BigramLM", config, rngs=nnx.Rngs(0))) is BigramLM


class OwnAxesLM(BigramLM):
    """BigramLM whose mixing matrix names its axes in its own words, mapped by its own rules."""

    sharding_rules = (("hidden_in", "fsdp"), ("hidden_out", "tensor"))

    def __init__(self, config, *, rngs):
        super().__init__(config, rngs=rngs)
        self.mix = param(self.mix[...], ("hidden_in", "hidden_out"))


def test_a_model_with_axis_names_of_its_own_shards_by_its_own_rules():
    model = OwnAxesLM(preset("tiny-qwen3", vocab_size=40, hidden_size=8), rngs=nnx.Rngs(0))
    m = mesh(1, 4, 2)
    with pytest.raises(ValueError, match="logical axis 'hidden_in' has no sharding rule"):
        sharding.param_shardings(nnx.state(model, nnx.Param), m)
    assert sharding.model_rules(model)[-2:] == OwnAxesLM.sharding_rules
    updater = Updater(StepConfig(mode="on_policy", train_actor=False), model, None, optax.sgd(0.1), mesh=m)
    state = updater.init_state(nnx.state(model, nnx.Param))
    assert state.policy["mix"].sharding.spec == P("fsdp", "tensor")
    assert state.policy["out"].sharding.spec == P("fsdp", "tensor")


def test_registry_errors_name_the_problem():
    config = preset("tiny-qwen3")
    with pytest.raises(ValueError, match="model family 'gpt-5' is unknown: registered families are"):
        build("gpt-5", config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="could not be imported"):
        build("no_such_module:Model", config, rngs=nnx.Rngs(0))

    class NoAxes(BigramLM):
        def __init__(self, config, *, rngs):
            super().__init__(config, rngs=rngs)
            self.extra = nnx.Param(jnp.zeros(3))

    with pytest.raises(TypeError, match="parameter extra of NoAxes .* needs logical_axes"):
        check_protocol(NoAxes(config, rngs=nnx.Rngs(0)))

    class NoCache(nnx.Module):
        def __init__(self, config, *, rngs):
            self.config = config

        def hidden_states(self, tokens, **kw):
            return tokens, None

        def unembedding(self):
            return None

    with pytest.raises(TypeError, match=r"lacks \['init_cache'\]"):
        check_protocol(NoCache(config, rngs=nnx.Rngs(0)))


def test_the_engine_spreads_over_the_devices_the_config_names():
    """rollout.engine_devices of the devices that hold the model (all of the process's for a model on
    one device); more than there are is refused, naming the key."""
    from configs.demo import get_config  # noqa: PLC0415
    from jackpot_jax.config import ConfigError  # noqa: PLC0415
    from jackpot_jax.train import build as train_build  # noqa: PLC0415

    model, config = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0)), get_config()
    for wanted, count in ((1, 1), (3, 3), (0, 8)):
        config.rollout.engine_devices = wanted
        assert train_build.engine_devices(config, model) == jax.local_devices()[:count]
    config.rollout.engine_devices = 9
    with pytest.raises(ConfigError, match="engine_devices=9 is not allowed: the engine has 8 devices"):
        train_build.engine_devices(config, model)
