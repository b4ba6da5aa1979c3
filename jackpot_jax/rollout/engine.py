"""``JackpotEngine``: JetStream's ``Engine`` API over a decoding core, and ``HFTokenizer``, a
JetStream ``Tokenizer`` over a Hugging Face tokenizer.

The engine wraps a :class:`~jackpot_jax.rollout.decode.DecodeCore` (``engine.core``): JetStream's
orchestrator calls the engine's one-request ``prefill`` / ``insert`` / ``generate``, and the batch
driver :func:`jackpot_jax.rollout.generate` calls the core's batched admission and decode steps
through it, with the same samples.

Which token a step reports: JetStream 0.2.2's orchestrator streams the tokens of ``generate``
steps only, never the one prefill samples. So each step reports the token it *consumes* (the one
the previous step, or prefill, sampled): a request's stream starts with its prefill token, and its
n-th token comes with ``lengths = n``, which is what the orchestrator compares with ``max_tokens``.
The served tokens are thus exactly those of :func:`~jackpot_jax.rollout.generate` with the same key
and sampling settings, up to the stop token, which JetStream does not stream.

Log-probabilities: every token is drawn from p_inf, the model's distribution after temperature /
top-k / top-p (:mod:`jackpot_jax.rollout.sampling`), and ``Prefix.first`` / ``DecodeState.last``
hold ``log p_inf`` of each sampled token (and the top-k of p_inf). JetStream's ``ResultTokens``
have no field for them, so the gRPC server returns tokens only; rollouts that need the log-probs
use :func:`~jackpot_jax.rollout.generate`.

Randomness: a request that brings no key (every JetStream request) gets
``fold_in(key(seed), n)`` for the engine's n-th such request.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jackpot_jax.models import hf
from jackpot_jax.models import sharding as sharding_lib
from jackpot_jax.rollout.decode import DecodeCore, DecodeState, Prefix, bucket_for
from jackpot_jax.rollout.jetstream_compat import engine_api, tokenizer_api, tokenizer_pb2
from jackpot_jax.rollout.sampling import SamplingParams, check_sampling


class HFTokenizer(tokenizer_api.Tokenizer):
    """JetStream's ``Tokenizer`` over a Hugging Face tokenizer (``hf.load_tokenizer``).

    ``encode`` pads to the engine's prefill buckets (powers of two from 16 up to
    ``max_prefill_length``). ``is_bos=True`` (JetStream's default) encodes with the tokenizer's own
    special tokens, so Llama gets its BOS and Qwen none; ``is_bos=False`` encodes without them.
    ``stop_tokens`` are the EOS and pad tokens (JetStream's convention); the pad token defaults to
    EOS when the tokenizer has none.
    """

    def __init__(self, tokenizer, *, max_prefill_length: int):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token: serving needs one to know "
                             "where a completion ends.")
        self.tokenizer = tokenizer
        self.max_prefill_length = max_prefill_length

    def ids(self, s: str, *, is_bos: bool = True) -> list[int]:
        """The token ids of ``s``, unpadded."""
        return self.tokenizer.encode(s, add_special_tokens=is_bos)

    def encode(self, s: str, *, is_bos: bool = True, max_prefill_length: int | None = None,
               jax_padding: bool = True):
        """``(tokens padded to a prefill bucket, true length)``, as JetStream's ``encode``."""
        return self.pad(self.ids(s, is_bos=is_bos), max_prefill_length=max_prefill_length, jax_padding=jax_padding)

    def pad(self, ids, *, max_prefill_length: int | None = None, jax_padding: bool = True):
        """``(ids padded with pad_id to the smallest bucket that holds them, len(ids))``;
        ``ValueError`` for an empty prompt or one longer than ``max_prefill_length``."""
        limit = max_prefill_length or self.max_prefill_length
        length = len(ids)
        if length == 0:
            raise ValueError("the prompt is empty: it must have at least one token.")
        if length > limit:
            raise ValueError(f"the prompt has {length} tokens, more than max_prefill_length={limit}.")
        size = bucket_for(length, limit)
        padded = np.full((size,), self.pad_id, np.int32)
        padded[:length] = ids
        return (jnp.asarray(padded) if jax_padding else padded), length

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids`` (ids the tokenizer lacks, e.g. padded embedding rows: ``""``)."""
        return self.tokenizer.decode(list(token_ids))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_id if pad is None else pad

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def bos_id(self) -> int | None:
        """The tokenizer's BOS (``None`` for tokenizers without one, e.g. Qwen's)."""
        return self.tokenizer.bos_token_id

    @property
    def stop_tokens(self) -> set[int]:
        return {self.eos_id, self.pad_id}


class JackpotEngine(engine_api.Engine):
    """A JetStream ``Engine`` over any model of the registry (see the module docstring).

    ``tokenizer_path``: the local Hugging Face tokenizer directory that ``get_tokenizer`` names
    (needed for serving text, not for token ids). ``temperature`` / ``top_p`` / ``top_k`` are the
    sampling settings of every request that brings none (JetStream requests bring none); the other
    arguments go to the :class:`DecodeCore`.

    JetStream's orchestrator keeps the parameters ``load_params`` gave it when it started:
    ``update_params`` changes what later ``load_params`` calls and the batch driver
    :func:`~jackpot_jax.rollout.generate` use.
    """

    def __init__(self, model, *, max_concurrent_decodes: int, max_prefill_length: int, max_target_length: int,
                 tokenizer_path=None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 logprobs_top_k: int = 0, seed: int = 0, **core_kwargs):
        check_sampling(temperature, top_p, top_k)
        self.core = DecodeCore(model, max_concurrent_decodes=max_concurrent_decodes,
                               max_prefill_length=max_prefill_length, max_target_length=max_target_length,
                               logprobs_top_k=logprobs_top_k,
                               default_sampling=SamplingParams.fill(1, temperature, top_p, top_k), **core_kwargs)
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self._base_key = jax.random.key(seed)
        self._requests = itertools.count()

    @classmethod
    def from_pretrained(cls, path, tokenizer_path=None, *, dtype=None, mesh=None, **engine_kwargs) -> "JackpotEngine":
        """An engine over the Hugging Face checkpoint in ``path`` (``hf.from_pretrained``), serving
        the tokenizer in ``tokenizer_path`` (default: ``path``); other arguments go to the constructor."""
        model = hf.from_pretrained(path, dtype, mesh=mesh)
        return cls(model, tokenizer_path=path if tokenizer_path is None else tokenizer_path, **engine_kwargs)

    # ---------------------------------------------------------------- the Engine API

    def prefill(self, params, padded_tokens, true_length: int, *, existing_prefix=None,
                sampling: SamplingParams | None = None, key=None) -> Prefix:
        """JetStream's ``prefill(params=, padded_tokens=, true_length=)``, with the core's optional
        ``sampling`` and ``key``. The prefix's arrays are all new (JetStream deletes them after
        ``insert``)."""
        if existing_prefix is not None:
            raise NotImplementedError("existing_prefix is not supported: prefill runs whole prompts.")
        if key is None:
            key = jax.random.fold_in(self._base_key, next(self._requests))
        return self.core.prefill(params, padded_tokens, true_length, sampling=sampling, key=key)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        return self.core.insert(prefix, decode_state, slot)

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        return self.core.init_decode_state()

    def generate(self, params, decode_state: DecodeState) -> tuple[DecodeState, engine_api.ResultTokens]:
        """One step of every slot (the state is donated: use the returned one) and, per slot, the
        token the step consumed, its validity (always 1) and its 1-based index in the completion."""
        state, consumed = self.core.generate(params, decode_state)
        data = jnp.concatenate([consumed[:, :1], jnp.ones_like(consumed[:, :1]), consumed[:, 1:]], axis=1)
        return state, engine_api.ResultTokens(data=data, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3),
                                              samples_per_slot=1)

    def load_params(self, *args, **kwargs):
        """The engine's parameters (loaded when the engine was built)."""
        return self.core.params

    @property
    def params(self):
        return self.core.params

    def update_params(self, params):
        """New parameters for later ``load_params`` calls and the batch driver (see the class)."""
        return self.core.update_params(params)

    def get_prefix_destination_sharding(self):
        """Replicated over the engine's mesh. Used only when prefill and generate run on separate
        engines; ``jackpot-serve`` runs one engine for both (JetStream's interleaved mode)."""
        return NamedSharding(self.mesh, PartitionSpec())

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        if self.tokenizer_path is None:
            raise ValueError("this engine has no tokenizer_path: give one to serve text.")
        return tokenizer_pb2.TokenizerParameters(path=self.tokenizer_path)

    def build_tokenizer(self, metadata: tokenizer_pb2.TokenizerParameters) -> HFTokenizer:
        return HFTokenizer(hf.load_tokenizer(metadata.path), max_prefill_length=self.max_prefill_length)

    @property
    def max_concurrent_decodes(self) -> int:
        return self.core.slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.core.prefill_buckets[-1]

    @property
    def mesh(self) -> jax.sharding.Mesh:
        """The parameters' mesh, or a one-device mesh over their device when they are not sharded."""
        sharding = jax.tree.leaves(self.params)[0].sharding
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
        return sharding_lib.make_mesh(devices=list(sharding.device_set))

    @property
    def colocated_cpus(self) -> None:
        """None: the engine uses no CPU devices besides its accelerators."""
        return None
