"""jackpot-eval end to end with a scripted model whose answers are known: it answers every problem
with the same boxed number, so Mean@k and Pass@k follow from the reference answers by hand."""
import jax
import jax.numpy as jnp
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

from jackpot_jax.data import evaluate as evaluate_lib
from jackpot_jax.models import ModelConfig
from jackpot_jax.models.transformer import param

WORDS = ["Question:", "Answer:", "What", "is", "3", "+", "4", "5", "?", "Please", "reason", "step", "by", "and",
         "put", "your", "final", "answer", "within", "\\boxed{}.", "\\boxed{7}", "Q", "A"]


def write_tokenizer(path):
    """Word-level, split on whitespace only, so ``\\boxed{7}`` is one token."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)
    return fast, vocab


class ScriptedLM(nnx.Module):
    """A bigram table: after any token it says ``answer_id``, after ``answer_id`` it says EOS
    (logit margin 60: sampling at any usual temperature follows the script)."""

    def __init__(self, config, *, answer_id, eos_id=1):
        self.config = config
        v = config.vocab_size
        table = jnp.zeros((v, v)).at[:, answer_id].set(60.0).at[answer_id].set(0.0).at[answer_id, eos_id].set(60.0)
        self.table = param(table, ("vocab", "vocab"))

    def hidden_states(self, tokens, *, positions=None, segment_ids=None, attention_mask=None, cache=None):
        h = jax.nn.one_hot(tokens, self.config.vocab_size)
        if cache is None:
            return h, None
        new = tokens.shape[1] if attention_mask is None else jnp.sum(attention_mask, axis=1)
        return h, {"lengths": cache["lengths"] + new}

    def unembedding(self):
        return self.table[...]

    def init_cache(self, batch, max_len):
        return {"lengths": jnp.zeros((batch,), jnp.int32)}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    tokenizer, vocab = write_tokenizer(tmp_path_factory.mktemp("tok"))
    config = ModelConfig(vocab_size=len(vocab), hidden_size=len(vocab), intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=2)
    return ScriptedLM(config, answer_id=vocab["\\boxed{7}"]), tokenizer


def test_mean_and_pass_at_k_of_a_scripted_model(scripted):
    model, tokenizer = scripted
    records = [{"problem": "What is 3 + 4 ?", "answer": "7", "solution": ""},
               {"problem": "What is 3 + 5 ?", "answer": "8", "solution": ""},
               {"problem": "What is 4 + 3 ?", "answer": "#### 7", "solution": ""},
               {"problem": "What is 5 + 3 ?", "answer": "\\frac{16}{2}", "solution": ""}]
    result, samples = evaluate_lib.evaluate(model, tokenizer, records, k=3, max_new_tokens=4, temperature=1.0,
                                            top_p=1.0, return_samples=True)
    # every completion is "\boxed{7}": problems 0 and 2 are right (3 of 3 samples), 1 and 3 wrong
    assert result["mean@k"] == pytest.approx(0.5) and result["pass@k"] == pytest.approx(0.5)
    assert result["finish_reasons"] == {"eos": 12} and result["mean_completion_tokens"] == 2
    assert "| 4 | 3 | 0.5000 | 0.5000 |" in evaluate_lib.markdown_table({"toy": result})
    assert [s["index"] for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [s["reward"] for s in samples] == [1.0] * 3 + [0.0] * 3 + [1.0] * 3 + [0.0] * 3
    assert all(s["completion"] == "\\boxed{7}" and s["finish_reason"] == "eos" for s in samples)
    assert [(s["problem"], s["answer"]) for s in samples[::3]] == [(r["problem"], r["answer"]) for r in records]


def test_evaluate_rejects_an_empty_dataset(scripted):
    model, tokenizer = scripted
    with pytest.raises(ValueError, match="records is empty"):
        evaluate_lib.evaluate(model, tokenizer, [], k=2)


def test_jackpot_eval_command_writes_json_markdown_and_completions(tmp_path, monkeypatch):
    """The CLI on a saved tiny checkpoint and GSM8K's fixture (a random model: the numbers are whatever
    it scores; the files and their keys are the point). ``--manual-dir`` is the dataset's own directory,
    as config.data.manual_dir may be (or a root of dataset directories); ``--limit 3`` is at most 3: the
    fixture has 2 test problems."""
    import json
    import os

    from jackpot_jax import console
    from jackpot_jax.models import Transformer, hf, preset

    for key in console.QUIET_ENV:  # main() sets them: restored after the test
        monkeypatch.delenv(key, raising=False)
    model_dir = tmp_path / "model"
    hf.save_pretrained(Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0)), model_dir)
    write_tokenizer(model_dir)
    out = tmp_path / "out"
    gsm8k_dir = os.path.join(os.path.dirname(__file__), "fixtures", "data", "gsm8k")
    code = evaluate_lib.main(["--model", str(model_dir), "--dataset", "gsm8k", "--k", "2",
                              "--limit", "3", "--max-new-tokens", "4", "--data-dir", str(tmp_path / "tfds"),
                              "--manual-dir", gsm8k_dir, "--out", str(out), "--save-completions"])
    assert code == 0
    result = json.loads((out / "results.json").read_text())["gsm8k"]
    assert result["num_problems"] == 2 and result["k"] == 2 and 0 <= result["mean@k"] <= result["pass@k"] <= 1
    samples = [json.loads(line) for line in (out / "completions_gsm8k.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == [0, 0, 1, 1]
    assert all(set(s) == {"index", "problem", "answer", "completion", "reward", "finish_reason"} for s in samples)
    assert sum(s["reward"] for s in samples) / len(samples) == pytest.approx(result["mean@k"])
    assert {s["finish_reason"] for s in samples} <= {"eos", "length"}
    with open(os.path.join(gsm8k_dir, "test.jsonl")) as file:
        official = [json.loads(line) for line in file]
    assert [(s["problem"], s["answer"]) for s in samples[::2]] == [
        (o["question"], o["answer"].rsplit("####", 1)[1].strip()) for o in official]
    assert (out / "results.md").read_text().startswith("| dataset | problems | k | Mean@k | Pass@k |")
