"""JetStream serving: the engine API gives generate()'s tokens, and jackpot-serve (JetStream's
orchestrator and gRPC server, in process on a free 127.0.0.1 port) answers JetStream's own stubs
with generate()'s greedy completions, for concurrent clients too, and rejects bad requests with a
gRPC error while it keeps serving."""
import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from jackpot_jax.models import Transformer, hf, preset
from jackpot_jax.rollout import SamplingParams, generate, serve
from jackpot_jax.rollout.engine import HFTokenizer, JackpotEngine
from jackpot_jax.rollout.jetstream_compat import jetstream_pb2, jetstream_pb2_grpc

WORDS = "what is two plus three four five six seven eight nine ten".split()
PAD, EOS = 0, 1
MAX_PREFILL, MAX_TARGET, SLOTS = 32, 64, 8


def write_tokenizer(path, words):
    """A word-level Hugging Face tokenizer over ``words``, with ``<pad>`` = 0 and ``<eos>`` = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(path)
    return vocab


def tiny_model():
    """tiny-qwen3 with its matrices scaled up, so greedy completions depend on the whole prompt and
    vary along the way (at the initial scale the model just repeats the last prompt token)."""
    model = Transformer(preset("tiny-qwen3"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, params))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("served")
    model = tiny_model()
    hf.save_pretrained(model, path)
    vocab = write_tokenizer(path, WORDS)
    return path, model, vocab


@pytest.fixture(scope="module")
def server(checkpoint):
    path = checkpoint[0]
    args = serve.parse_args(["--model", str(path), "--port", "0", "--slots", str(SLOTS), "--max-prefill-length",
                             str(MAX_PREFILL), "--max-target-length", str(MAX_TARGET), "--temperature", "0"])
    with serve.Server(serve.engine_from_args(args), host=args.host, port=args.port) as running:
        yield running
    assert not running.driver.live


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield jetstream_pb2_grpc.OrchestratorStub(channel)


def text_request(text, max_tokens):
    return jetstream_pb2.DecodeRequest(max_tokens=max_tokens,
                                       text_content=jetstream_pb2.DecodeRequest.TextContent(text=text))


def token_request(ids, max_tokens):
    return jetstream_pb2.DecodeRequest(max_tokens=max_tokens,
                                       token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=ids))


def decode(stub, request):
    """The completion's token ids and text, gathered from the response stream."""
    samples = [s for r in stub.Decode(request, timeout=120) for s in r.stream_content.samples]
    return [i for s in samples for i in s.token_ids], "".join(s.text for s in samples)


def greedy(model, prompts, max_tokens):
    """generate()'s greedy completions, as JetStream streams them: without the stop token."""
    rollout = generate(model, prompts, max_tokens, temperature=0, eos_token_ids=(PAD, EOS))
    return [c[:-1] if reason == "eos" else c for c, reason in zip(rollout.completions, rollout.finish_reasons)]


def test_a_text_prompt_gets_generates_greedy_completion(checkpoint, stub):
    _, model, vocab = checkpoint
    ids, text = decode(stub, text_request("what is two plus three", 20))
    [expected] = greedy(model, [[vocab[w] for w in "what is two plus three".split()]], 20)
    assert ids == expected and len(ids) > 0
    words = {i: w for w, i in vocab.items()}
    assert text == "".join(words.get(i, "") for i in ids)  # each token decoded on its own, as JetStream streams


def test_concurrent_clients_each_get_their_own_completion(checkpoint, stub):
    _, model, vocab = checkpoint
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(2, 500, size=rng.integers(1, MAX_PREFILL + 1))] for _ in range(16)]
    max_tokens = [int(n) for n in rng.integers(1, 25, size=16)]
    requests = [token_request(p, n) for p, n in zip(prompts, max_tokens)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda r: decode(stub, r)[0], requests))
    longest = greedy(model, prompts, max(max_tokens))  # a greedy completion's prefixes are the shorter ones
    assert got == [c[:n] for c, n in zip(longest, max_tokens)]


@pytest.fixture(scope="module")
def good(checkpoint):
    """A good request and its completion."""
    _, model, vocab = checkpoint
    prompt = [vocab["nine"], vocab["plus"]]
    return token_request(prompt, 4), greedy(model, [prompt], 4)[0]


@pytest.mark.parametrize("request_, message", [
    (text_request("", 5), "text_content.text is empty"),
    (text_request("   ", 5), "the prompt has no tokens"),
    (token_request([], 5), "the prompt has no tokens"),
    (text_request(" ".join(["two"] * (MAX_PREFILL + 1)), 5), "more than the server's max_prefill_length=32"),
    (token_request([2] * (MAX_PREFILL + 1), 5), "more than the server's max_prefill_length=32"),
    (text_request("two plus two", 0), "max_tokens=0 is not allowed"),
    (token_request([2, 3], -3), "max_tokens=-3 is not allowed"),
    (token_request([2, 512], 5), r"token ids must be in \[0, 512\)"),
    (token_request([2] * 30, 40), "more than the server's max_target_length=64"),
    (jetstream_pb2.DecodeRequest(max_tokens=5), "the request has no content"),
])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(good, stub, request_, message):
    with pytest.raises(grpc.RpcError) as error:
        decode(stub, request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, error.value.details())
    assert stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=30).is_live
    request, expected = good
    assert decode(stub, request)[0] == expected


def test_huge_and_malformed_requests_are_invalid_argument_and_tokenizing_leaves_the_loop_free(good, server, stub,
                                                                                            monkeypatch):
    request, expected = good
    huge = text_request("two " * 900_000, 5)  # 3.6 MB: refused by its size, before it is tokenized
    with pytest.raises(grpc.RpcError) as error:
        decode(stub, huge)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"text_content.text has 3600000 bytes, more than the server's limit of 512 \(16 bytes per "
                     r"token of max_prefill_length=32\)", error.value.details())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # bytes that are no DecodeRequest
        for method in ("Decode", "HealthCheck"):
            call = (channel.unary_stream if method == "Decode" else channel.unary_unary)(
                f"/jetstream_proto.Orchestrator/{method}")
            with pytest.raises(grpc.RpcError) as error:
                reply = call(b"\xff\xff\xff", timeout=30)
                list(reply) if method == "Decode" else reply
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert re.search(r"is not a valid jetstream_proto\.\w+ message \(DecodeError", error.value.details())
    # while one request is being checked (tokenized), the event loop answers the others
    release, checking, original = threading.Event(), threading.Event(), serve.check_request

    def slow_check(*args):
        checking.set()
        assert release.wait(60)
        return original(*args)

    monkeypatch.setattr(serve, "check_request", slow_check)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(decode, stub, request)
        assert checking.wait(60)
        assert stub.HealthCheck(jetstream_pb2.HealthCheckRequest(), timeout=10).is_live
        release.set()
        assert pending.result()[0] == expected


def test_a_model_with_a_nan_weight_is_refused_before_serving(checkpoint):
    path, _, _ = checkpoint
    model = tiny_model()
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim == 2 else x, params))
    engine = JackpotEngine(model, max_concurrent_decodes=1, max_prefill_length=16, max_target_length=16,
                           tokenizer_path=path)
    with pytest.raises(ValueError, match=r"the model's parameter .+ has NaN or infinite values: refusing to serve"):
        serve.Server(engine, port=0)


def test_engine_api_gives_generates_tokens(checkpoint):
    _, model, _ = checkpoint
    engine = JackpotEngine(model, max_concurrent_decodes=4, max_prefill_length=MAX_PREFILL,
                           max_target_length=MAX_TARGET, temperature=0)
    prompt, steps = [5, 9, 2, 7, 3], 12
    params = engine.load_params()
    for temperature in (0.0, 1.0):  # sampled: the request key generate() gives prompt 0, sample 0 (seed 0)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0)
        prefix = engine.prefill(params=params, padded_tokens=jnp.asarray(prompt + [PAD] * 11), true_length=5,
                                sampling=SamplingParams.fill(1, temperature), key=key)
        state = engine.insert(prefix, engine.init_decode_state(), slot=2)
        tokens = []
        for n in range(1, steps + 1):
            state, result = engine.generate(params, state)
            slot = result.convert_to_numpy().get_result_at_slot(2)
            assert slot.valid.tolist() == [[1]] and slot.lengths.tolist() == [n]
            tokens.append(int(slot.tokens[0, 0]))
        assert tokens == generate(model, [prompt], steps, temperature=temperature).completions[0]
    # the batch driver runs through the engine on its core, with the core's samples
    assert generate(engine, [prompt], steps, temperature=1.0).completions == [tokens]
    assert generate(engine.core, [prompt], steps, temperature=1.0).completions == [tokens]
    with pytest.raises(TypeError, match="str is not a decoding engine"):
        generate("engine", [prompt], steps)


def test_engine_properties_and_tokenizer(checkpoint):
    path, model, vocab = checkpoint
    engine = JackpotEngine.from_pretrained(path, max_concurrent_decodes=3, max_prefill_length=20, max_target_length=40)
    assert (engine.max_concurrent_decodes, engine.samples_per_slot, engine.max_prefill_length) == (3, 1, 20)
    assert engine.mesh.size == 1 and engine.colocated_cpus is None
    assert engine.get_tokenizer().path == str(path)
    tokenizer = engine.build_tokenizer(engine.get_tokenizer())
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.stop_tokens) == (PAD, EOS, None, {PAD, EOS})
    tokens, length = tokenizer.encode("two plus three")
    assert length == 3 and tokens.tolist() == [vocab["two"], vocab["plus"], vocab["three"]] + [PAD] * 13
    tokens, length = tokenizer.encode(" ".join(["two"] * 17), jax_padding=False)
    assert isinstance(tokens, np.ndarray) and (len(tokens), length) == (20, 17)  # buckets: 16, 20
    with pytest.raises(ValueError, match="the prompt has 21 tokens, more than max_prefill_length=20"):
        tokenizer.encode(" ".join(["two"] * 21))
    assert tokenizer.decode([vocab["two"], vocab["plus"]]) == "two plus" and tokenizer.decode([500]) == ""
    with pytest.raises(ValueError, match="no tokenizer_path"):
        JackpotEngine(model, max_concurrent_decodes=1, max_prefill_length=16, max_target_length=16).get_tokenizer()


@pytest.mark.slow  # ~20 s: the jackpot-serve command line; the other tests serve in-process
def test_jackpot_serve_command_serves_and_exits_on_sigterm(checkpoint):
    path, model, vocab = checkpoint
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "jackpot_jax.rollout.serve", "--model", str(path), "--port", "0",
               "--temperature", "0", "--max-prefill-length", "16", "--max-target-length", "32"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "jackpot-serve: serving" not in line:
            line = process.stderr.readline()
            assert line, "jackpot-serve exited before serving"
        address = line.split(" on ")[-1].strip()
        assert address.startswith("127.0.0.1:")
        with grpc.insecure_channel(address) as channel:
            ids, _ = decode(jetstream_pb2_grpc.OrchestratorStub(channel), text_request("two plus", 6))
        assert ids == greedy(model, [[vocab["two"], vocab["plus"]]], 6)[0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.stderr.close()


def test_cli_rejects_bad_settings(capsys):
    for argv, message in [(["--temperature", "-1"], "temperature=-1.0 is not allowed"),
                          (["--slots", "0"], "--slots=0 is not allowed"),
                          (["--max-prefill-length", "64", "--max-target-length", "32"],
                           "--max-prefill-length=64 is not allowed")]:
        with pytest.raises(SystemExit):
            serve.parse_args(["--model", "m", *argv])
        assert message in capsys.readouterr().err
