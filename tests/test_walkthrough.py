"""docs/training.md, "Your own checkpoints": its bash block runs end to end as written (train, resume, export,
eval, `transformers` on the export, `jackpot-serve` answering a gRPC client), on tiny stand-ins for a user's
files (:mod:`tests.own_files`), with tiny-size overrides appended to each command."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

from tests import own_files

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"

TRAIN_TINY = " ".join(f"--config.{key}={value}" for key, value in {
    "train.steps": 2, "train.save_every": 1, "train.eval_every": 2, "train.eval_k": 2, "train.progress": False,
    "rollout.prompts_per_step": 2, "rollout.n": 2, "rollout.max_new_tokens": 12, "rollout.max_concurrent_decodes": 4,
    "algorithm.train_batch_size": 4, "algorithm.micro_batch_size": 2, "algorithm.k": 4,
    "data.max_prompt_tokens": 64, "data.train_limit": 16, "data.eval_limit": 2,
    "policy.dtype": "float32", "actor.dtype": "float32", "policy.remat": False, "actor.remat": False}.items())
OVERRIDES = {  # appended to the lines that start with these commands
    "jackpot-train": TRAIN_TINY,
    "jackpot-eval": "--limit 2 --k 2 --max-new-tokens 12 --slots 4",
    "jackpot-serve": "--slots 2 --max-prefill-length 64 --max-target-length 128",
}


def walkthrough_block() -> str:
    """The first ```bash block of the "Your own checkpoints" section, continuation lines joined."""
    section = DOC.read_text().split("## Your own checkpoints", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")


def tiny_script(block: str, paths: dict, port: int) -> str:
    lines = []
    for line in block.splitlines():
        name = line.split("=", 1)[0]
        if name in paths and re.fullmatch(r"[A-Z0-9]+=\S+.*", line):
            line = f"{name}={paths[name]}"
        command = line.split(" ", 1)[0]
        if command in OVERRIDES:
            tail = " &" if line.rstrip().endswith("&") else ""
            more = " --config.train.steps=3" if "--resume" in line else ""  # the resume trains one step more
            line = f"{line.rstrip().removesuffix('&').rstrip()} {OVERRIDES[command]}{more}{tail}"
        lines.append(line.replace("9000", str(port)))
    return "\n".join(lines) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~5 min: two training runs, export, eval, transformers and a server, each a process
def test_the_walkthrough_runs_end_to_end(tmp_path):
    tokenizer = own_files.train_bpe()
    own_files.write_qwen3(tmp_path / "policy", tokenizer, hidden=64, layers=2, seed=0)
    own_files.write_qwen3(tmp_path / "actor", tokenizer, hidden=32, layers=1, seed=1)
    own_files.write_gsm8k(tmp_path / "gsm8k")
    run = tmp_path / "run"
    paths = {"POLICY": tmp_path / "policy", "ACTOR": tmp_path / "actor", "GSM8K": tmp_path / "gsm8k", "RUN": run}
    script = tiny_script(walkthrough_block(), paths, free_port())
    assert script.count("jackpot-train") == 2 and "jackpot-serve" in script, script
    env = dict(os.environ, PATH=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               JACKPOT_TFDS_DIR=str(tmp_path / "tfds"), XLA_FLAGS="")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    # the resume continued the run from its step 2 to step 3, and logged the change of train.steps
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    assert "resume: config.train.steps changed" in done.stderr
    # the export stands alone: weights, the special ids and every end token, the tokenizer and its template
    export = run / "policy-hf"
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert set(config["eos_token_id"]) == set(generation["eos_token_id"]) == ends, (config, generation)
    assert generation["eos_token_id"][0] == tokenizer.eos_token_id and config["pad_token_id"] == tokenizer.pad_token_id
    assert (export / "tokenizer.json").exists() and list(export.glob("*.safetensors"))
    # eval graded and saved its samples: 2 problems x k = 2
    samples = [json.loads(line) for line in (run / "eval" / "completions_gsm8k.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"completion", "reward"} <= set(samples[0])
    # transformers generated from the chat template; the server answered the client (the last two outputs)
    print(done.stdout)
    assert "<|im_start|>assistant" in done.stdout and done.stdout.strip().splitlines()[-1], done.stdout
