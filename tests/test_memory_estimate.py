"""benchmarks/memory_estimate.py's per-device arithmetic against independent calculations: the
parameter count of a published model, the bytes of the trained states on a mesh worked out by hand
from the model's shapes, FSDP halving them, and the recommended meshes following the stated rule."""
import importlib.util
import math
import os

import pytest

from jackpot_jax.models.config import preset

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "memory_estimate.py")
_SPEC = importlib.util.spec_from_file_location("jackpot_benchmarks_memory_estimate", _PATH)
me = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(me)

PAIR = "qwen3_1p7b_to_8b_deepscaler"


def _shape(data=1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _by_hand(cfg, fsdp, tensor, itemsize):
    """Bytes per device of one copy of a Qwen3 model's parameters, FSDP over the model dimension and
    tensor parallelism over heads / MLP width / vocabulary (all divisible here), norms replicated."""
    d, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    matrices = cfg.num_hidden_layers * (d * (q + 2 * kv) + q * d + 3 * d * i)
    matrices += cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    norms = cfg.num_hidden_layers * (2 * d + 2 * cfg.head_dim) + d
    return itemsize * (matrices // (fsdp * tensor) + norms)


def test_parameter_count_of_qwen3_8b_is_the_published_one():
    layout = me.param_layout("qwen3-8b", "bfloat16")
    count = sum(math.prod(dims) for dims, _, _ in layout)
    assert count == pytest.approx(8.19e9, rel=0.01)  # Qwen3-8B: 8.2 B parameters (model card)
    assert me.sharded_param_bytes(layout) == 2 * count


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2), (2, 8)])
def test_sharded_bytes_equal_the_hand_calculation(fsdp, tensor):
    for name in ("qwen3-8b", "qwen3-1.7b"):
        got = me.sharded_param_bytes(me.param_layout(name, "float32"), _shape(fsdp=fsdp, tensor=tensor))
        assert got == _by_hand(preset(name), fsdp, tensor, 4)


def test_per_device_states_halve_when_fsdp_doubles_and_ignore_data():
    config = me.load_preset(PAIR)
    kind = me.DEVICE_KINDS["v5p"]
    rows = {f: me.per_device(config, _shape(fsdp=f), kind, f) for f in (4, 8, 16)}
    for small, large in ((4, 8), (8, 16)):
        assert rows[large]["states"] == pytest.approx(rows[small]["states"] / 2, rel=1e-3)
        assert rows[large]["eval_copy"] == pytest.approx(rows[small]["eval_copy"] / 2, rel=1e-3)
        assert rows[large]["engine"] == rows[small]["engine"]  # the engine's copy is never sharded
    replicated = me.per_device(config, _shape(data=2, fsdp=8), kind, 16)
    assert replicated["states"] == rows[8]["states"]  # data replicates the states
    # trained states: 5 copies (parameter, gradient, accumulation, mu, nu) of both models, float32
    policy, actor = preset("qwen3-8b"), preset("qwen3-1.7b")
    assert rows[8]["states"] == 5 * (_by_hand(policy, 8, 1, 4) + _by_hand(actor, 8, 1, 4))
    assert rows[8]["engine"] == 4 * actor.num_params()


def test_activations_and_kv_by_hand():
    config = me.load_preset(PAIR)
    t = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    row = me.per_device(config, _shape(fsdp=4, tensor=2), me.DEVICE_KINDS["h100"], 8)
    assert row["micro"] == 4 and row["seqs"] == 1
    attention = 16 * 32 * 512 * 512 // 2  # Qwen3-8B: 32 heads' 512 x 512 tiles, split over tensor=2 (8 kv heads)
    per_token_whole, attention_whole = me.activation_bytes((preset("qwen3-8b"), preset("qwen3-1.7b")), t)
    assert attention_whole == 2 * attention
    assert me.activation_bytes((preset("qwen3-8b"),), 256)[1] == 12 * 32 * 256 * 256  # dense up to 256 tokens
    assert row["activations"] < per_token_whole * t + attention_whole
    kv = 2 * 28 * 8 * 128 * 2  # Qwen3-1.7B: K and V x layers x kv heads x head_dim x bf16
    assert row["rollout_kv"] == 128 * t * kv  # the engine's 128 slots on its one device
    spread = me.per_device(config, _shape(fsdp=4, tensor=2), me.DEVICE_KINDS["h100"], 8, local=8)
    assert spread["rollout_kv"] == 128 // 8 * t * kv
    assert spread["max_slots"] == 128 and row["max_slots"] < 128 and row["max_slots"] > 0
    replicated = me.per_device(config, _shape(fsdp=4, tensor=2), me.DEVICE_KINDS["h100"], 8, micro=2)
    assert replicated["replicated_batch"] and replicated["seqs"] == 2  # 2 sequences do not split over 4


def test_recommended_meshes_follow_the_rule():
    config = me.load_preset(PAIR)
    two_nodes = me.recommended(config, me.DEVICE_KINDS["h100"], 16)
    assert two_nodes["fits"] and two_nodes["shape"]["data"] == 2  # data across the nodes, FSDP within
    slice32 = me.recommended(config, me.DEVICE_KINDS["v5p"], 16)
    assert slice32["fits"] and slice32["shape"] == _shape(fsdp=16)  # one slice: FSDP over all of it
