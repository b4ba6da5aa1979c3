"""The paper's larger Qwen3 pair: actor Qwen3-1.7B-Base -> policy Qwen3-8B-Base, GRPO on DeepScaleR.

    jackpot-train --config configs/qwen3_1p7b_to_8b_deepscaler.py --workdir runs/qwen3_1p7b_to_8b \
        --config.policy.path=/ckpt/Qwen3-8B-Base --config.actor.path=/ckpt/Qwen3-1.7B-Base \
        --config.tokenizer.path=/ckpt/Qwen3-8B-Base --config.data.manual_dir=/data/deepscaler

Everything as ``configs/qwen3_1p7b_to_4b_deepscaler.py`` (its docstring explains the paths, the
choices and the in-loop evaluation) but the policy.

Hardware (estimates by ``benchmarks/memory_estimate.py``; docs/training.md, "Paper presets"): 8 x
H100 80GB or a TPU v5p-16 (8 chips), with the state sharded over them: about 440 GB at the peak,
55 GB per device. With float32 parameters, 70 GB per device: 8 x H200, a v5p-16 or 16 x H100.
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_1p7b_to_4b_deepscaler.py")
    spec = importlib.util.spec_from_file_location("jackpot_configs_qwen3_1p7b_to_4b_deepscaler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()  # demo.py's keys, with the Qwen3 / DeepScaleR settings
    config.policy.preset = "qwen3-8b"
    return config
