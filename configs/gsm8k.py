"""Your own checkpoints on GSM8K: a small actor's rollouts train a larger policy (docs/training.md, "Your own
checkpoints").

    jackpot-train --config configs/gsm8k.py --workdir runs/gsm8k \
        --config.policy.path=/ckpt/Qwen3-1.7B --config.actor.path=/ckpt/Qwen3-0.6B \
        --config.data.manual_dir=/data/gsm8k

The three paths are required: Hugging Face checkpoint directories (config.json, safetensors and the
tokenizer files: the run reads the policy's tokenizer, and the actor's must equal it token for token), and the
directory holding GSM8K's official ``train.jsonl`` and ``test.jsonl``. The models are not warm-started. Sized
for one accelerator with 1-2B models; every value can be overridden on the command line.
"""
import importlib.util
import os

from ml_collections import config_dict


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("jackpot_configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()

    for model in (config.policy, config.actor):  # float32 storage: bf16 rounds away most updates at lr 1e-6
        model.update(path=config_dict.placeholder(str), dtype="bfloat16", param_dtype="float32", remat=True)
    config.tokenizer.update(kind="auto", path="")  # the policy checkpoint's tokenizer

    # "chat": instruction-tuned checkpoints (the tokenizer's chat template); "plain" for base models.
    config.data.update(dataset="gsm8k", config="", split="train", eval_split="test",
                       manual_dir=config_dict.placeholder(str), template="chat", instruction="",
                       max_prompt_tokens=512, train_limit=0, eval_limit=200)
    config.warm_start.update(policy_steps=0, actor_steps=0, problems=0)

    config.rollout.update(prompts_per_step=32, n=8, max_new_tokens=1024, max_concurrent_decodes=128)
    config.algorithm.update(train_batch_size=128, micro_batch_size=8)
    config.optim.policy.update(lr=1e-6, warmup_steps=10)
    config.optim.actor.update(lr=1e-6, warmup_steps=10)
    config.train.update(steps=200, eval_every=25, eval_k=4, eval_temperature=0.6, save_every=25, keep=4)
    return config
