"""The paper's Qwen3 pair: actor Qwen3-1.7B-Base -> policy Qwen3-4B-Base, GRPO on DeepScaleR.

    jackpot-train --config configs/qwen3_1p7b_to_4b_deepscaler.py --workdir runs/qwen3_1p7b_to_4b \
        --config.policy.path=/ckpt/Qwen3-4B-Base --config.actor.path=/ckpt/Qwen3-1.7B-Base \
        --config.tokenizer.path=/ckpt/Qwen3-4B-Base --config.data.manual_dir=/data/deepscaler

The four paths are required (validation names the first one missing): Hugging Face checkpoint
directories (config.json + safetensors), the tokenizer directory (the policy's; both models share
Qwen3's vocabulary), and the directory holding DeepScaleR's ``deepscaler.json``
(``jackpot_jax.data.manual_files.MANUAL_FILES``).

Hardware (estimates by ``benchmarks/memory_estimate.py``; docs/training.md, "Paper presets"): 8 x
H100 80GB or a TPU v5p-16 (8 chips), with the state sharded over them: about 380 GB at the peak,
48 GB per device (56 GB with float32 parameters).

From the paper: GRPO, max_new_tokens=8192, the model pair, DeepScaleR, k=20 for the top-k Z, the
symmetric PPO clip eps = 0.2 (eq. 1 / eq. 5), Mean@4 / Pass@4 evaluation. Everything else is our
choice (marked "ours"), typical for GRPO at these sizes. DeepScaleR has only a train split and the
trainer evaluates on its own dataset, so the in-loop evaluation reads the first ``eval_limit``
training problems: it tracks the policy's own accuracy (the policy never generates during training)
and catches a collapse early, but it is not held out. The paper's numbers (MATH-500, AIME24/25, AMC
Mean@4) come from ``jackpot-eval`` on checkpoints exported with ``jackpot-export``
(docs/training.md).
"""
import importlib.util
import os

from ml_collections import config_dict

from jackpot_jax.data.prompts import INSTRUCTION


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("jackpot_configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()

    # Base checkpoints from the command line; `preset` names the shape the path must hold (what
    # benchmarks/memory_estimate.py reads; a set `path` takes precedence when building).
    config.policy.update(preset="qwen3-4b", path=config_dict.placeholder(str))
    config.actor.update(preset="qwen3-1.7b", path=config_dict.placeholder(str))
    config.tokenizer.update(kind="hf", path=config_dict.placeholder(str))
    # float32 storage (bf16 rounds away most updates at lr 1e-6), bf16 computation, remat for
    # 9,216-token sequences: ours.
    for model in (config.policy, config.actor):
        model.update(dtype="bfloat16", param_dtype="float32", remat=True)

    # "plain" ("Question: ...\n<instruction>\nAnswer:"): these are base models, not trained on a chat
    # format; they continue a plain question/answer prompt, and the \boxed{} instruction gives the
    # math reward a final answer to read. "chat" is for instruction-tuned checkpoints.
    config.data.update(
        dataset="deepscaler", config="", split="train",
        eval_split="train",  # DeepScaleR's only split (see the module docstring)
        manual_dir=config_dict.placeholder(str),
        template="plain", instruction=INSTRUCTION,
        max_prompt_tokens=1024,  # ours; longer prompts are skipped (counted, with a warning)
        train_limit=0, eval_limit=128)  # ours: all problems; 128 x eval_k=4 evaluation samples

    # Real checkpoints are not warm-started.
    config.warm_start.update(policy_steps=0, actor_steps=0, problems=0)  # RL on every problem

    config.rollout.update(
        max_new_tokens=8192,  # paper
        prompts_per_step=64, n=8,  # ours: 512 rollouts per step, GRPO groups of 8
        temperature=1.0, top_p=1.0, top_k=0,  # ours: untruncated p_inf, what OBRS' Z assumes
        max_concurrent_decodes=128)  # ours: decode slots (KV cache: 128 x 9,216 positions)
    # rollout.logprobs_top_k stays 0: the update takes p_inf's top-k from the actor's forward pass.

    config.algorithm.update(
        mode="jackpot", k=20,  # paper: OBRS with the top-k Z, k = 20
        eps_low=0.2, eps_high=0.2,  # paper: the symmetric PPO clip of eq. 1 / eq. 5 (demo.py: DAPO's clip-higher)
        train_batch_size=128,  # ours: 4 optimizer updates per rollout batch of 512
        micro_batch_size=8)  # ours: one 9,216-token sequence per device on 8 devices (use your count)

    config.optim.policy.update(lr=1e-6, warmup_steps=10)  # ours (the paper gives no learning rates)
    config.optim.actor.update(lr=1e-6, warmup_steps=10)  # ours

    config.train.update(
        steps=300,  # ours; the paper reports Jackpot stable to ~300 steps, diverging beyond ~500
        eval_every=25, eval_k=4,  # Mean@4 / Pass@4 as the paper reports (every 25 steps: ours)
        eval_temperature=0.6,  # ours (jackpot-eval's default)
        save_every=25, keep=4,  # ours: the last 100 steps, to go back before a divergence
        kernel_impl="auto")
    return config
