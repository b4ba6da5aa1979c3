"""jackpot_arithmetic is learnable: a tiny model fine-tuned for ~2 minutes on CPU solves part of the
held-out test split (docs/arithmetic.md), and the character tokenizer round-trips its text."""
import pytest

from jackpot_jax.data.arithmetic import make_split
from jackpot_jax.data.char_tokenizer import make_char_tokenizer
from jackpot_jax.models.hf import load_tokenizer

# Measured on a 2-core CPU (2026-11-25): 0.0 untrained, 0.385 after 1000 steps (130 s of training).
MIN_TRAINED_ACCURACY = 0.15
MAX_UNTRAINED_ACCURACY = 0.02


def test_char_tokenizer_round_trips_problems_and_solutions(tmp_path):
    tokenizer = make_char_tokenizer(tmp_path)
    assert len(tokenizer) < 128
    texts = ["Question: What is 7 + 5?\nAnswer: 7 + 5 = 12. \\boxed{12}", "  two  spaces\tand a tab\n"]
    for difficulty in (1, 3):
        for record in make_split(0, 50, difficulty):
            texts += [record["problem"], record["solution"]]
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(texts[0]) == tokenizer.encode(texts[0])
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer.encode("1") + [tokenizer.eos_token_id], skip_special_tokens=True) == "1"


def test_char_tokenizer_extra_chars():
    tokenizer = make_char_tokenizer(extra_chars="é×")
    assert len(tokenizer) == len(make_char_tokenizer()) + 2
    assert tokenizer.decode(tokenizer.encode("3 × 4 é")) == "3 × 4 é"


@pytest.mark.slow
def test_tiny_model_learns_difficulty_one():
    from jackpot_jax.experiments.arithmetic_sft import run

    results = run(difficulty=1, steps=1000, batch_size=64, lr=3e-3, model_preset="tiny-qwen3", test_size=200)
    assert results["untrained_accuracy"] <= MAX_UNTRAINED_ACCURACY
    assert results["trained_accuracy"] >= MIN_TRAINED_ACCURACY
