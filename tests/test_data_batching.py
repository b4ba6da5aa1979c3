"""Prompt templates (plain, chat, errors) and the prompt batcher: GRPO grouping, per-process slices,
determinism, per-epoch reshuffles, resuming from a state dict, skipped long prompts, errors."""
import json

import pytest
import transformers

from jackpot_jax.data import rewards
from jackpot_jax.data.batching import PromptBatcher
from jackpot_jax.data.prompts import (GSM8K_INSTRUCTION, INSTRUCTION, build_prompt, chat_prompt, encode_prompts,
                                      plain_prompt)
from jackpot_jax.models import hf

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
WORDS = ["Question", "Answer", ":", "<", ">", "user", "system", "assistant", "be", "brief", "long"]
WORDS += [f"p{i}" for i in range(40)]


def write_tokenizer(path, words, chat_template=None):
    """A word-level Hugging Face tokenizer over ``words`` that writes ``<bos>`` first when it adds
    special tokens, saved to ``path``; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return vocab


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(plain tokenizer, chat tokenizer, vocabulary), loaded the way the project loads them."""
    root = tmp_path_factory.mktemp("tokenizers")
    vocab = write_tokenizer(root / "plain", WORDS)
    write_tokenizer(root / "chat", WORDS, CHAT_TEMPLATE)
    return hf.load_tokenizer(root / "plain"), hf.load_tokenizer(root / "chat"), vocab


def make_records(count):
    return [{"problem": f"p{i}", "answer": str(i), "solution": f"p{i} #### {i}"} for i in range(count)]


def batcher(tokenizer, records, **options):
    options = {"prompts_per_batch": 2, "n": 1, "instruction": "", "process_index": 0, "process_count": 1, **options}
    return PromptBatcher(records, tokenizer, **options)


def answers_of(batch):
    return [record["answer"] for record in batch.records]


# ------------------------------------------------------------------------------------------------
# Templates
# ------------------------------------------------------------------------------------------------


def test_plain_prompt_is_exactly_the_documented_format():
    assert plain_prompt("  What is 1+1?\n") == (
        "Question: What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.\nAnswer:")
    assert plain_prompt("What is 1+1?", instruction="") == "Question: What is 1+1?\nAnswer:"
    assert plain_prompt("x", GSM8K_INSTRUCTION) == f"Question: x\n{GSM8K_INSTRUCTION}\nAnswer:"
    assert build_prompt({"problem": "x", "answer": "1"}) == plain_prompt("x")


def test_both_instructions_ask_for_an_answer_the_rewards_extract():
    assert "\\boxed{}" in INSTRUCTION and rewards.extract_answer("so \\boxed{72}") == "72"
    assert "####" in GSM8K_INSTRUCTION and rewards.extract_answer("48 + 24 = 72\n#### 72") == "72"


def test_chat_prompt_renders_the_tokenizer_chat_template(tokenizers):
    _, chat, _ = tokenizers
    assert chat_prompt(chat, " p1 \n", instruction="be brief") == "<bos><user> p1\nbe brief\n<assistant>"
    assert chat_prompt(chat, "p1", instruction="", system="long") == "<bos><system> long\n<user> p1\n<assistant>"
    record = {"problem": "p2", "answer": "2"}
    assert build_prompt(record, chat, "chat") == f"<bos><user> p2\n{INSTRUCTION}\n<assistant>"


def test_template_errors(tokenizers):
    plain, chat, _ = tokenizers
    with pytest.raises(ValueError, match=r"tokenizer '.*plain' has no chat template: use template='plain'"):
        chat_prompt(plain, "p1")
    with pytest.raises(ValueError, match="template='chat' needs the tokenizer"):
        build_prompt({"problem": "p1"}, None, "chat")
    with pytest.raises(ValueError, match=r"template='fancy' is not one of \('plain', 'chat'\)"):
        build_prompt({"problem": "p1"}, chat, "fancy")
    with pytest.raises(ValueError, match="system is only used by template='chat'"):
        build_prompt({"problem": "p1"}, chat, "plain", system="long")
    with pytest.raises(KeyError, match=r"no 'problem' field \(it has \['question'\]\)"):
        build_prompt({"question": "p1"})


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def test_batches_repeat_each_prompt_n_times_consecutively(tokenizers):
    plain, _, vocab = tokenizers
    batch = batcher(plain, make_records(6), prompts_per_batch=2, n=3, shuffle=False).next_batch()
    assert batch.group == [0, 0, 0, 1, 1, 1]
    assert answers_of(batch) == ["0", "1"] and batch.answers == ["0"] * 3 + ["1"] * 3
    assert batch.prompts == ["Question: p0\nAnswer:", "Question: p1\nAnswer:"]
    rows = [[vocab[w] for w in ["<bos>", "Question", ":", f"p{i}", "Answer", ":"]] for i in (0, 1)]
    assert batch.prompt_ids == [rows[0]] * 3 + [rows[1]] * 3
    assert (batch.epoch, batch.index) == (0, 0)


def test_encode_record_gives_the_batchers_ids_for_any_record(tokenizers):
    plain, chat, vocab = tokenizers
    for tokenizer, template in ((plain, "plain"), (chat, "chat")):
        b = batcher(tokenizer, make_records(4), prompts_per_batch=2, n=2, template=template, shuffle=False)
        batch = b.next_batch()
        assert [b.encode_record(r) for r in batch.records for _ in range(2)] == batch.prompt_ids
    outside = {"problem": "p9", "answer": "9"}  # not one of the batcher's records
    assert batcher(plain, make_records(4)).encode_record(outside) == [
        vocab[w] for w in ["<bos>", "Question", ":", "p9", "Answer", ":"]]


def test_chat_prompts_are_tokenized_without_adding_special_tokens_twice(tokenizers):
    _, chat, vocab = tokenizers
    batch = batcher(chat, make_records(2), template="chat", shuffle=False).next_batch()
    assert batch.prompt_ids[0] == [vocab[w] for w in ["<bos>", "<", "user", ">", "p0", "<", "assistant", ">"]]
    assert encode_prompts(chat, ["<bos>p0", "p1"], "chat") == [[vocab["<bos>"], vocab["p0"]], [vocab["p1"]]]
    assert encode_prompts(chat, ["p1"]) == [[vocab["<bos>"], vocab["p1"]]]


def test_processes_serve_contiguous_slices_of_the_one_process_batches(tokenizers):
    plain, _, _ = tokenizers
    records = make_records(23)
    options = dict(prompts_per_batch=6, n=2, seed=5)
    whole = batcher(plain, records, **options)
    for count in (2, 3):
        shards = [batcher(plain, records, **options, process_index=p, process_count=count) for p in range(count)]
        assert [b.batches_per_epoch for b in shards] == [3] * count  # 23 // 6, whatever the process count
        for _ in range(7):  # into the third epoch
            expected = whole.next_batch()
            slices = [shard.next_batch() for shard in shards]
            assert [s.first_prompt for s in slices] == [p * 6 // count for p in range(count)]
            assert [row for s in slices for row in s.prompt_ids] == expected.prompt_ids
            assert [a for s in slices for a in s.answers] == expected.answers
            assert [r for s in slices for r in s.records] == expected.records
            assert all((s.epoch, s.index) == (expected.epoch, expected.index) for s in slices)
            assert all(s.group == [g for g in range(6 // count) for _ in range(2)] for s in slices)
        whole = batcher(plain, records, **options)


def test_the_order_is_fixed_by_the_seed(tokenizers):
    plain, _, _ = tokenizers
    records = make_records(20)

    def run(seed):
        b = batcher(plain, records, prompts_per_batch=3, seed=seed)
        return [answers_of(b.next_batch()) for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_each_epoch_is_reshuffled_and_covers_distinct_records(tokenizers):
    plain, _, _ = tokenizers
    b = batcher(plain, make_records(20), prompts_per_batch=4, seed=3)
    epochs = []
    for epoch in range(3):
        batches = [b.next_batch() for _ in range(b.batches_per_epoch)]
        assert [(x.epoch, x.index) for x in batches] == [(epoch, i) for i in range(5)]
        epochs.append([a for x in batches for a in answers_of(x)])
    assert all(sorted(e, key=int) == [str(i) for i in range(20)] for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    unshuffled = batcher(plain, make_records(20), prompts_per_batch=4, shuffle=False)
    assert [a for _ in range(5) for a in answers_of(unshuffled.next_batch())] == [str(i) for i in range(20)]


def test_a_restored_batcher_continues_where_the_saved_one_stopped(tokenizers):
    plain, _, _ = tokenizers
    records = make_records(23)
    options = dict(prompts_per_batch=6, n=2, seed=7, process_index=1, process_count=2)  # 3 batches per epoch
    uninterrupted = batcher(plain, records, **options)
    expected = [uninterrupted.next_batch() for _ in range(12)]
    saved = batcher(plain, records, **options)
    for _ in range(5):
        saved.next_batch()
    state = json.loads(json.dumps(saved.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 2)
    restored = batcher(plain, records, **options)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(7)] == expected[5:]
    other_process = batcher(plain, records, **{**options, "process_index": 0})
    other_process.load_state_dict(state)  # one saved position serves every process
    assert (other_process.epoch, other_process.position) == (1, 2)
    one_process = batcher(plain, records, **{**options, "process_index": 0, "process_count": 1})
    one_process.load_state_dict(state)  # and another number of processes: the batches are the same
    assert one_process.next_batch().records[3:] == expected[5].records


def test_long_prompts_are_skipped_the_same_way_on_every_process(tokenizers):
    plain, _, _ = tokenizers
    records = make_records(10)
    for i in (0, 3, 4):
        records[i] = {**records[i], "problem": f"p{i} long long"}  # 8 tokens instead of 6
    shards = [batcher(plain, records, max_prompt_tokens=7, prompts_per_batch=4, shuffle=False, process_index=p,
                      process_count=2) for p in (0, 1)]
    assert [b.num_skipped for b in shards] == [3, 3] and [b.num_records for b in shards] == [7, 7]
    assert [answers_of(b.next_batch()) for b in shards] == [["1", "2"], ["5", "6"]]
    assert [b.batches_per_epoch for b in shards] == [1, 1]
    with pytest.raises(ValueError, match="all 10 prompts are longer than max_prompt_tokens=5"):
        batcher(plain, records, max_prompt_tokens=5)


def test_default_process_layout_is_jax_s(tokenizers):
    import jax

    plain, _, _ = tokenizers
    b = PromptBatcher(make_records(4), plain, prompts_per_batch=2)
    assert (b.process_index, b.process_count) == (jax.process_index(), jax.process_count())


def test_batcher_errors(tokenizers):
    plain, _, _ = tokenizers
    records = make_records(9)
    with pytest.raises(ValueError, match="records is empty"):
        batcher(plain, [])
    with pytest.raises(ValueError, match="n=0 is not allowed"):
        batcher(plain, records, n=0)
    with pytest.raises(ValueError, match="prompts_per_batch=0 is not allowed"):
        batcher(plain, records, prompts_per_batch=0)
    with pytest.raises(ValueError, match=r"prompts_per_batch=10 is larger than the 9 records"):
        batcher(plain, records, prompts_per_batch=10)
    with pytest.raises(ValueError, match=r"prompts_per_batch=5 does not divide by the 2 processes: .* multiple of 2"):
        batcher(plain, records, prompts_per_batch=5, process_count=2)
    with pytest.raises(ValueError, match="process_index=2, process_count=2 is not allowed"):
        batcher(plain, records, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed=-1 is not allowed"):
        batcher(plain, records, seed=-1)
    with pytest.raises(ValueError, match="template='fancy' is not one of"):
        batcher(plain, records, template="fancy")
    with pytest.raises(KeyError, match=r"record 1 needs 'problem' and 'answer' fields \(it has \['problem'\]\)"):
        batcher(plain, [records[0], {"problem": "p1"}])
    b = batcher(plain, records, seed=1)
    with pytest.raises(ValueError, match="another data order .*seed saved 2 vs 1 now"):
        b.load_state_dict({**b.state_dict(), "seed": 2})
    with pytest.raises(ValueError, match="num_records saved 8 vs 9 now"):
        b.load_state_dict(batcher(plain, records[:8], seed=1).state_dict())
    with pytest.raises(ValueError, match=r"position=4 is out of range: .* 0 <= position < 4"):
        b.load_state_dict({**b.state_dict(), "position": 4})
