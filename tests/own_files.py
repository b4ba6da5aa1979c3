"""Tiny stand-ins for a user's own files, in their real formats: a byte-level BPE tokenizer trained
on the problems (Qwen's special tokens and chat template), Qwen3 checkpoints written by
``transformers`` itself, and GSM8K's official JSONL. Nothing is downloaded."""
from __future__ import annotations

import json
import random

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gsm8k_lines(n: int, seed: int) -> list[dict]:
    """``n`` GSM8K-format records: ``{"question", "answer": "... #### N"}``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        lines.append({"question": f"Ann has {a} apples and buys {b} more. How many apples does she have?",
                      "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return lines


def write_gsm8k(directory, *, train: int = 64, test: int = 16) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        text = "".join(json.dumps(line) + "\n" for line in gsm8k_lines(n, seed))
        (directory / f"{split}.jsonl").write_text(text)


def train_bpe(vocab_size: int = 400, seed: int = 0):
    """A byte-level BPE tokenizer (``transformers.PreTrainedTokenizerFast``) trained on GSM8K-format
    text, with Qwen's end-of-turn token as EOS and its chat template."""
    import transformers  # noqa: PLC0415
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415

    texts = [line["question"] + " " + line["answer"] for line in gsm8k_lines(400, seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_qwen3(directory, tokenizer, *, hidden: int, layers: int, seed: int) -> None:
    """A tiny Qwen3 checkpoint as ``transformers`` writes one (config.json, model.safetensors,
    generation_config.json), with ``tokenizer``'s files beside it."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, torch_dtype="float32")
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
