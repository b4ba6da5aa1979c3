"""The paper's Qwen2.5 pair: actor Qwen2.5-1.5B -> policy Qwen2.5-3B, GRPO on MATH (MATH-8k).

    jackpot-train --config configs/qwen25_1p5b_to_3b_math.py --workdir runs/qwen25_1p5b_to_3b \
        --config.policy.path=/ckpt/Qwen2.5-3B --config.actor.path=/ckpt/Qwen2.5-1.5B \
        --config.tokenizer.path=/ckpt/Qwen2.5-3B --config.data.manual_dir=/data/math

The four paths are required (validation names the first one missing): Hugging Face checkpoint
directories of the base models (config.json + safetensors), the tokenizer directory (the policy's;
both models share Qwen2.5's vocabulary), and the directory holding MATH's files
(``jackpot_jax.data.manual_files.MANUAL_FILES``): ``train.jsonl`` the training problems (the paper's
MATH-8k) and ``test.jsonl`` MATH-500, evaluated in the loop (Mean@4 / Pass@4 on all 500).

Hardware (estimates by ``benchmarks/memory_estimate.py``; docs/training.md, "Paper presets"): 8 x
H100 80GB or a TPU v5p-16 (8 chips), with the state sharded over them: about 230 GB at the peak,
29 GB per device (36 GB with float32 parameters).

From the paper: GRPO, max_new_tokens=8192, the model pair, MATH, k=20 for the top-k Z, the symmetric
PPO clip eps = 0.2 (eq. 1 / eq. 5, set by the Qwen3 preset), Mean@4 / Pass@4 evaluation. Everything
else is our choice (marked "ours"), the same as the Qwen3 presets.
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_1p7b_to_4b_deepscaler.py")
    spec = importlib.util.spec_from_file_location("jackpot_configs_qwen3_1p7b_to_4b_deepscaler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()  # the GRPO, OBRS, optimizer and model-storage settings shared by the presets

    config.policy.preset = "qwen2.5-3b"
    config.actor.preset = "qwen2.5-1.5b"
    config.data.update(  # the template, prompt length and the required manual_dir stay the Qwen3 presets'
        dataset="math", split="train", eval_split="test",  # MATH-8k; MATH-500
        eval_limit=500)  # all of MATH-500
    return config
