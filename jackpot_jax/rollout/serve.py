"""``jackpot-serve``: a Hugging Face checkpoint behind JetStream's orchestrator and gRPC API.

    jackpot-serve --model PATH [--tokenizer PATH] [--host 127.0.0.1] [--port 9000] [--slots 8]
                  [--max-prefill-length 1024] [--max-target-length 2048] [--temperature 1.0] ...

Clients use JetStream's own stubs (``jetstream_pb2_grpc.OrchestratorStub``) and ``Decode``
requests with ``text_content`` (tokenized by the server) or ``token_content`` (the ids are the
exact prompt: nothing is added, BOS included). Each response carries the new tokens' ids and text
(each token decoded on its own, as JetStream 0.2.2 streams; decode the ids for exact text).

JetStream's pieces run as they are (one :class:`~jackpot_jax.rollout.engine.JackpotEngine` for
prefill and generate: its interleaved mode), with these changes:

* requests are checked before they reach the orchestrator (whose worker threads kill the process
  on any error): an empty prompt, one longer than ``--max-prefill-length``, token ids outside the
  vocabulary, ``max_tokens <= 0`` or a completion that does not fit ``--max-target-length`` get an
  ``INVALID_ARGUMENT`` status, and the server keeps serving; so do messages that are not valid
  protobuf (JetStream's own handlers answer ``UNKNOWN``) and text prompts over
  :data:`PROMPT_BYTES_PER_TOKEN` bytes per token of ``--max-prefill-length`` (checked before the
  prompt is tokenized; tokenizing runs in a worker thread, never on the gRPC event loop, so a long
  prompt does not stall the other clients);
* a model with a NaN or infinite parameter is refused when the server starts (:func:`check_finite`):
  its logits would be NaN, and every completion an empty one with status OK;
* prompts are padded by :class:`~jackpot_jax.rollout.engine.HFTokenizer` (JetStream's padding
  would prepend a BOS to token ids, which Qwen has none of, and needs a power-of-two
  ``max_prefill_length``).

The server listens on ``--host`` (127.0.0.1 by default: JetStream's API has no authentication).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading

import grpc
import jax
import jax.numpy as jnp
from google.protobuf.message import DecodeError

from jackpot_jax.rollout.engine import JackpotEngine
from jackpot_jax.rollout.jetstream_compat import jetstream_pb2, orchestrator
from jackpot_jax.rollout.sampling import check_sampling

# The longest text prompt, in UTF-8 bytes per token of max_prefill_length: checked before tokenizing,
# so a huge prompt is refused at once (a token of a Hugging Face tokenizer is a few bytes of text).
PROMPT_BYTES_PER_TOKEN = 16


class JackpotDriver(orchestrator.Driver):
    """JetStream's ``Driver`` with prompts padded by the engine's :class:`HFTokenizer`: text is
    encoded, token ids are used as given (JetStream's version prepends ``bos_id`` to them). It
    overrides ``_process_prefill_content``, the one place where google-jetstream 0.2.2's driver
    turns a request into padded tokens (the version is pinned in setup.py)."""

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        content = request.prefill_content
        if isinstance(content, str):
            return tokenizer.encode(content, is_bos=is_bos, max_prefill_length=max_prefill_length,
                                    jax_padding=self._jax_padding)
        return tokenizer.pad(content, max_prefill_length=max_prefill_length, jax_padding=self._jax_padding)


def prompt_ids(request, tokenizer) -> list[int]:
    """The prompt of a ``DecodeRequest`` as token ids, as the driver's prefill thread will see it."""
    which = request.WhichOneof("content")
    if which == "text_content":
        if not request.text_content.text:
            raise ValueError("text_content.text is empty: give a prompt.")
        size, limit = len(request.text_content.text.encode("utf-8", "surrogatepass")), max_prompt_bytes(tokenizer)
        if size > limit:
            raise ValueError(f"text_content.text has {size} bytes, more than the server's limit of {limit} "
                             f"({PROMPT_BYTES_PER_TOKEN} bytes per token of max_prefill_length="
                             f"{tokenizer.max_prefill_length}).")
        return tokenizer.ids(request.text_content.text, is_bos=not request.session_cache)
    if which == "token_content":
        return list(request.token_content.token_ids)
    raise ValueError("the request has no content: set text_content or token_content.")


def max_prompt_bytes(tokenizer) -> int:
    """The longest text prompt the server tokenizes, in UTF-8 bytes."""
    return PROMPT_BYTES_PER_TOKEN * tokenizer.max_prefill_length


def check_request(request, tokenizer, engine: JackpotEngine) -> None:
    """``ValueError`` naming the problem when ``engine`` cannot serve ``request``."""
    if request.max_tokens <= 0:
        raise ValueError(f"max_tokens={request.max_tokens} is not allowed: it must be >= 1.")
    ids = prompt_ids(request, tokenizer)
    if not ids:
        raise ValueError("the prompt has no tokens: give at least one.")
    if len(ids) > engine.max_prefill_length:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the server's "
                         f"max_prefill_length={engine.max_prefill_length}.")
    vocab = engine.core.model_config.vocab_size
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"the prompt's token ids must be in [0, {vocab}) (the model's vocabulary).")
    needed = len(ids) + request.max_tokens - 1
    if needed > engine.core.max_target_length:
        raise ValueError(f"a prompt of {len(ids)} tokens with max_tokens={request.max_tokens} needs {needed} cache "
                         f"positions, more than the server's max_target_length={engine.core.max_target_length}.")


class JackpotOrchestrator(orchestrator.LLMOrchestrator):
    """JetStream's servicer, answering requests that :func:`check_request` rejects with
    ``INVALID_ARGUMENT`` before they reach the driver."""

    def __init__(self, driver: orchestrator.Driver, engine: JackpotEngine, tokenizer):
        super().__init__(driver=driver)
        self._engine = engine
        self._tokenizer = tokenizer

    async def Decode(self, request, context=None):  # noqa: N802 (the gRPC method's name)
        try:
            if isinstance(request, Malformed):
                raise ValueError(request.message)
            # tokenizing takes time (seconds for megabytes): in a thread, so the event loop serves on
            await asyncio.get_running_loop().run_in_executor(None, check_request, request, self._tokenizer,
                                                             self._engine)
        except ValueError as error:
            if context is None:
                raise
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        async for response in super().Decode(request, context):
            yield response

    async def HealthCheck(self, request, context=None):  # noqa: N802 (the gRPC method's name)
        if isinstance(request, Malformed):
            if context is None:
                raise ValueError(request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await super().HealthCheck(request, context)


class Malformed:
    """What :func:`lenient_parser` gives for bytes that are not a valid message: the servicer
    answers ``INVALID_ARGUMENT`` with ``message`` (a deserializer that raises gives ``UNKNOWN``)."""

    def __init__(self, message: str):
        self.message = message


def lenient_parser(message_class):
    """``message_class.FromString``, giving a :class:`Malformed` for bytes that do not parse."""
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError) as error:
            return Malformed(f"the request is not a valid {message_class.DESCRIPTOR.full_name} message "
                             f"({type(error).__name__}: {error}).")
    return parse


def add_servicer(servicer, server) -> None:
    """JetStream's ``add_OrchestratorServicer_to_server`` with :func:`lenient_parser` requests."""
    handlers = {
        "Decode": grpc.unary_stream_rpc_method_handler(
            servicer.Decode, request_deserializer=lenient_parser(jetstream_pb2.DecodeRequest),
            response_serializer=jetstream_pb2.DecodeResponse.SerializeToString),
        "HealthCheck": grpc.unary_unary_rpc_method_handler(
            servicer.HealthCheck, request_deserializer=lenient_parser(jetstream_pb2.HealthCheckRequest),
            response_serializer=jetstream_pb2.HealthCheckResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("jetstream_proto.Orchestrator",
                                                                          handlers),))


def check_finite(params) -> None:
    """``ValueError`` naming the first parameter with a NaN or infinite value: such a model's logits
    are NaN and every completion would come back empty with status OK."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
            raise ValueError(f"the model's parameter {jax.tree_util.keystr(path)} has NaN or infinite values: "
                             "refusing to serve it (its logits would be NaN).")


class Server:
    """JetStream's orchestrator over ``engine`` behind a gRPC server on ``host:port`` (port 0: a
    free one; ``self.port`` is the bound port). Stop it with :meth:`stop` (or ``with``)."""

    def __init__(self, engine: JackpotEngine, *, host: str = "127.0.0.1", port: int = 9000):
        # the tokenizer first: the driver's threads build theirs too, and kill the process if that fails
        tokenizer = engine.build_tokenizer(engine.get_tokenizer())
        params = engine.load_params()
        check_finite(params)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="jackpot-serve-grpc", daemon=True)
        self._loop_thread.start()
        self.driver = JackpotDriver(prefill_engines=[engine], generate_engines=[engine], prefill_params=[params],
                                    generate_params=[params], interleaved_mode=True)
        self._grpc = None
        try:
            servicer = JackpotOrchestrator(self.driver, engine, tokenizer)
            self._grpc, self.port = self._run(self._start_grpc(servicer, _address(host, port)))
        except BaseException:
            self.stop()
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @staticmethod
    async def _start_grpc(servicer, address):
        server = grpc.aio.server()  # created in the loop that runs it, as grpc.aio requires
        add_servicer(servicer, server)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from None
        await server.start()
        return server, port

    def wait_for_termination(self) -> None:
        """Block until the gRPC server stops."""
        self._run(self._grpc.wait_for_termination())

    def stop(self, grace: float = 5.0) -> None:
        """Let running requests finish for up to ``grace`` seconds, then stop the server, the
        orchestrator's threads and the event loop."""
        if self._grpc is not None:
            self._run(self._grpc.stop(grace))
            self._grpc = None
        if self.driver.live:
            self.driver.stop()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join()
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jackpot-serve", description="Serve a Hugging Face checkpoint with "
                                     "JetStream's orchestrator and gRPC API.")
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=8, help="concurrent decodes (default: %(default)s)")
    parser.add_argument("--max-prefill-length", type=int, default=1024, help="longest prompt (default: %(default)s)")
    parser.add_argument("--max-target-length", type=int, default=2048,
                        help="prompt + completion tokens per slot (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 is off (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the requests' keys (default: %(default)s)")
    parser.add_argument("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="(default: %(default)s; INFO logs every decode step)")
    args = parser.parse_args(argv)
    try:
        check_sampling(args.temperature, args.top_p, args.top_k)
    except ValueError as error:
        parser.error(str(error))
    for name in ("slots", "max_prefill_length", "max_target_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be >= 1.")
    if args.max_prefill_length > args.max_target_length:
        parser.error(f"--max-prefill-length={args.max_prefill_length} is not allowed: it must be <= "
                     f"--max-target-length={args.max_target_length}.")
    return args


def engine_from_args(args: argparse.Namespace) -> JackpotEngine:
    return JackpotEngine.from_pretrained(
        args.model, args.tokenizer, max_concurrent_decodes=args.slots, max_prefill_length=args.max_prefill_length,
        max_target_length=args.max_target_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level)
    server = Server(engine_from_args(args), host=args.host, port=args.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly (below) on SIGTERM too
    print(f"jackpot-serve: serving {args.model} on {_address(args.host, server.port)}", file=sys.stderr, flush=True)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
