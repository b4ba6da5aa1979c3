"""Loading what others wrote (issue 31): a Hugging Face checkpoint's config.json, index and tensors
are checked field by field (one-line errors naming the file and the field); a checkpoint's metadata
never chooses what to import; a local run's JAX coordinator listens on the loopback address only."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jackpot_jax.models import ModelConfig, Transformer, hf, preset, registry
from jackpot_jax.models.sharding import make_mesh
from jackpot_jax.parallel import bind_address
from jackpot_jax.train import export as export_lib
from tests.test_models import write_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A one-layer float32 Qwen3 checkpoint: (directory, its config.json dict, its tensors)."""
    path = tmp_path_factory.mktemp("small")
    hf.save_pretrained(Transformer(preset("tiny-qwen3", **SMALL), rngs=nnx.Rngs(0)), path)
    return path, json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")


def _copy(tmp_path, checkpoint, config=None, tensors=None):
    """``checkpoint`` written to ``tmp_path`` with ``config`` (a config.json dict, or any JSON value)
    and ``tensors`` replacing its own."""
    _, own_config, own_tensors = checkpoint
    (tmp_path / "config.json").write_text(json.dumps(own_config if config is None else config))
    save_file(own_tensors if tensors is None else tensors, tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize("change,match", [
    ({"rope_theta": -1}, "rope_theta=-1 in .*config.json is not allowed: rope_theta must be a finite number > 0"),
    ({"rope_theta": float("nan")}, "rope_theta=nan in .*config.json is not allowed"),
    ({"rms_norm_eps": -1}, "rms_norm_eps=-1 in .*config.json is not allowed"),
    ({"rms_norm_eps": 0}, "rms_norm_eps=0 in .*config.json is not allowed"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps='1e-6' in .*config.json is not allowed"),
    ({"hidden_size": "16"}, "hidden_size='16' in .*config.json is not allowed: hidden_size must be a positive integer"),
    ({"vocab_size": -32}, "vocab_size=-32 in .*config.json is not allowed"),
    ({"num_hidden_layers": 1.5}, "num_hidden_layers=1.5 in .*config.json is not allowed"),
    ({"num_attention_heads": True}, "num_attention_heads=True in .*config.json is not allowed"),
    ({"head_dim": 0}, "head_dim=0 in .*config.json is not allowed"),
    ({"max_position_embeddings": -1}, "max_position_embeddings=-1 in .*config.json is not allowed"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, r"rope_scaling\.factor=-2\.0 in .*config.json"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, r"rope_parameters\.rope_theta='big' in"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' in .*config.json is not allowed"),
    ({"vocab_size": None}, "vocab_size=None in .*config.json is not allowed"),
])
def test_config_json_values_are_checked_naming_the_file_and_field(small_checkpoint, tmp_path, change, match):
    path = _copy(tmp_path, small_checkpoint, {**small_checkpoint[1], **change})
    with pytest.raises(ValueError, match=match) as info:
        hf.from_pretrained(path)
    assert str(path / "config.json") in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):  # the early check of jackpot-train, before data preparation
        hf.checkpoint_config(path)


def test_config_json_that_is_not_an_object_and_values_set_in_code(small_checkpoint, tmp_path):
    path = _copy(tmp_path, small_checkpoint, [small_checkpoint[1]])
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list, not an object"):
        hf.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        hf.from_pretrained(path)
    config = dict(small_checkpoint[1])
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json has no hidden_size"):
        hf.from_pretrained(path)
    # ModelConfig's own checks cover presets and overrides, which never pass through a config.json
    for key, value in (("rope_theta", -1.0), ("rms_norm_eps", 0.0), ("rms_norm_eps", float("inf")),
                       ("max_position_embeddings", 0), ("head_dim", -4)):
        with pytest.raises(ValueError, match=f"ModelConfig.{key}={value!r} is not allowed"):
            preset("tiny-qwen3", **{key: value})
    with pytest.raises(ValueError, match=r"rope_scaling \{'factor': 0\.0\} is not allowed"):
        preset("tiny-llama", rope_scaling={**preset("tiny-llama").rope_scaling, "factor": 0.0})
    with pytest.raises(ValueError, match="ModelConfig.rope_theta=-1.0 is not allowed"):
        hf.from_pretrained(_copy(tmp_path, small_checkpoint), rope_theta=-1.0)  # an override is checked too
    assert ModelConfig.from_hf({**small_checkpoint[1], "rope_theta": 10000}).rope_theta == 10000.0  # ints are numbers


def test_tensors_must_be_finite_floats(small_checkpoint, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = small_checkpoint[2]
    file = tmp_path / "model.safetensors"
    for bad, match in ((tensors[name].astype(np.int32), f"tensor {name} has dtype I32, but weights are floating"),
                       (tensors[name].astype(bool), f"tensor {name} has dtype BOOL"),
                       (np.where(np.eye(*tensors[name].shape, dtype=bool), np.nan, tensors[name]),
                        f"tensor {name} holds NaN or inf values")):
        _copy(tmp_path, small_checkpoint, tensors={**tensors, name: bad})
        for mesh in (None, make_mesh(devices=jax.devices()[:1])):  # read whole, or each device its shard
            with pytest.raises(ValueError, match=match) as info:
                hf.from_pretrained(tmp_path, mesh=mesh)
            assert str(info.value).startswith(f"{file}: ")
    # a finite float32 value beyond float16's range becomes inf once stored as float16
    _copy(tmp_path, small_checkpoint, tensors={**tensors, name: tensors[name] * 0 + 1e5})
    with pytest.raises(ValueError, match=f"tensor {name} holds NaN or inf values \\(as float16\\)"):
        hf.from_pretrained(tmp_path, dtype="float16")
    assert np.isfinite(hf.from_pretrained(tmp_path).layers[0].mlp.up_proj.kernel[...]).all()  # float32 holds it


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/model.safetensors", "sub/../../x.safetensors"])
def test_an_index_never_points_outside_the_folder(small_checkpoint, tmp_path, shard):
    path = tmp_path / "ckpt"
    path.mkdir()
    _copy(path, small_checkpoint)
    save_file(small_checkpoint[2], tmp_path / "model.safetensors")  # the file it points at exists
    (path / "model.safetensors").unlink()
    weight_map = dict.fromkeys(small_checkpoint[2], "model.safetensors")
    (path / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {**weight_map, "lm_head.weight": shard}}))
    for load in (hf.from_pretrained, hf.checkpoint_config):
        with pytest.raises(ValueError, match=rf"index\.json: weight_map\['lm_head\.weight'\]={shard!r} is not allowed"):
            load(path)
    (path / hf.INDEX_FILE).write_text(json.dumps({"weight_map": [shard]}))
    with pytest.raises(ValueError, match="weight_map must be an object"):
        hf.from_pretrained(path)


def test_export_never_imports_the_model_a_checkpoint_names(tmp_path, monkeypatch):
    """config.policy.model in a checkpoint's metadata may be an import path: export refuses it unless
    the name is registered, and imports nothing."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_model.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").close()
        def factory(config, *, rngs):
            raise AssertionError("never built")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    write_tokenizer(workdir / "export" / "tokenizer", ["a", "b"])
    (workdir / "export" / "policy").mkdir()
    (workdir / "export" / "policy" / "config.json").write_text(json.dumps(preset("tiny-qwen3", **SMALL).to_hf()))
    meta = {"config": {"algorithm": {"mode": "on_policy"}, "policy": {"model": "planted_model:factory", "path": ""}}}

    class Checkpointer:  # the checkpoint's metadata only: export must fail before reading any state
        def __init__(self, *args, **kwargs):
            pass

        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None
        latest_step = lambda self: 2
        read_meta = lambda self, step: meta

    monkeypatch.setattr(export_lib, "Checkpointer", Checkpointer)
    with pytest.raises(ValueError, match="model family 'planted_model:factory' is not registered, and an import path "
                                         "read from a checkpoint's metadata is never imported"):
        export_lib.export(str(workdir), str(tmp_path / "out"))
    assert not marker.exists() and "planted_model" not in sys.modules
    # a user's own config still imports a family by path; a registered name is what a checkpoint may name
    assert registry.resolve("jackpot_jax.models.transformer:Transformer") is Transformer
    registry.register("reliability_test.models:Small", Transformer)
    small = nnx.eval_shape(lambda: registry.build("reliability_test.models:Small", preset("tiny-qwen3", **SMALL),
                                                  rngs=nnx.Rngs(0), imports=False))
    assert small.config.hidden_size == SMALL["hidden_size"]


def test_the_coordinator_binds_the_loopback_address_it_is_given(tmp_path):
    assert bind_address("127.0.0.1:1234") == "127.0.0.1:1234"
    assert bind_address("[::1]:1234") == "[::1]:1234"
    assert bind_address("localhost:1234") == "localhost:1234"
    assert bind_address("10.0.0.2:1234") is None and bind_address("node-0:1234") is None  # other hosts: JAX's
    assert bind_address(None) is None
    # a real start (one process: its coordinator service starts all the same) listens on 127.0.0.1 only
    script = textwrap.dedent("""
        import socket
        import jax
        import psutil
        from jackpot_jax.parallel import initialize
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        initialize(f"127.0.0.1:{port}", 1, 0)
        print(sorted({c.laddr.ip for c in psutil.Process().net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port}))
        jax.distributed.shutdown()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    addresses = json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert addresses and set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
