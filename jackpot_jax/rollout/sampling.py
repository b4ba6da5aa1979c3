"""Token sampling with the log-probabilities Jackpot needs: those of the distribution each token
was actually drawn from, p_inf (Algorithm 1, phase 1).

p_inf is the model's next-token distribution after the processing a request asks for, in this
order (Hugging Face ``generate``'s order): logits / temperature, then top-k (keep the k largest
logits and every logit tied with the k-th), then top-p (keep a token iff the probability mass of the
tokens strictly more likely than it is < top_p: always at least one token, and tied tokens together),
renormalized. :func:`processed_log_probs_reference` computes this by sorting the vocabulary,
:func:`processed_log_probs` finds the same thresholds without sorting (:func:`sample` draws from
its logits, :func:`processed_logits`). Greedy decoding
(temperature 0) is the point mass on the argmax (lowest id among ties): its log-prob is 0.
The returned ``logprob`` and ``topk_logprobs`` are ``log p_inf``; a token outside the kept set
has log-prob ``-inf``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
TOP_K_CANDIDATES = 64  # top-k with k <= this: the k-th largest logit comes from one lax.top_k
BRACKET = 256  # a search lists the tokens of its brackets with one lax.top_k once each holds fewer than this
SKETCH = 256  # strided samples per row that place the first two thresholds of a search
GUESS_MARGIN = 0.02  # share of the weight on either side of the target for those two thresholds
MAX_PASSES = 512  # a search needs at most ~8 x 33 passes; this only stops a loop over NaN logits
CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF
TOP_BLOCK = 64  # tokens per block of the two-level top-k


class SamplingParams(NamedTuple):
    """Per-slot sampling settings, ``[B]`` each (so one jitted step serves mixed requests)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_p: jax.Array  # float32 in (0, 1]; 1 = off
    top_k: jax.Array  # int32; 0 = off

    @classmethod
    def fill(cls, batch: int, temperature=1.0, top_p=1.0, top_k=0) -> "SamplingParams":
        return cls(jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_p, jnp.float32),
                   jnp.full((batch,), top_k, jnp.int32))


def check_sampling(temperature, top_p, top_k) -> None:
    """``ValueError`` naming the setting when a request's sampling settings are out of range."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} is not allowed: it must be >= 0 (0 is greedy).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is not allowed: it must be in (0, 1] (1 is off).")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k={top_k} is not allowed: it must be an integer >= 0 (0 is off).")


def _scaled(logits, params: SamplingParams):
    """Logits / temperature ``[B, V]`` float32 (greedy rows: / 1) and the greedy rows ``[B]``."""
    greedy = params.temperature <= 0
    return logits.astype(jnp.float32) / jnp.where(greedy, 1.0, params.temperature)[:, None], greedy


def argmax(x):
    """``jnp.argmax(x, axis=-1)`` for ``x [B, V]`` (the first maximum; the first NaN where there is
    one) from plain reductions XLA:CPU vectorizes, 10x faster than its variadic (value, index)
    reduction at V = 32,000."""
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    top = jnp.max(jnp.where(jnp.isnan(x), NEG_INF, x), axis=-1, keepdims=True)
    first_nan = jnp.min(jnp.where(jnp.isnan(x), ids, x.shape[-1]), axis=-1)
    first_top = jnp.min(jnp.where(x == top, ids, x.shape[-1]), axis=-1)
    return jnp.where(first_nan < x.shape[-1], first_nan, first_top)


def _point_mass(logits, scaled, greedy):
    """``scaled`` with each greedy row the point mass on its raw argmax (0 there, -inf elsewhere)."""
    at = jax.lax.cond(jnp.any(greedy), argmax, lambda x: jnp.full(x.shape[:1], -1, jnp.int32), logits)
    point = jnp.where(jnp.arange(scaled.shape[-1])[None, :] == at[:, None], 0.0, NEG_INF)
    return jnp.where(greedy[:, None], point, scaled)


def processed_log_probs_reference(logits, params: SamplingParams):
    """log p_inf ``[B, V]`` by sorting the vocabulary: the definition :func:`processed_log_probs` is tested against."""
    return jax.nn.log_softmax(processed_logits_reference(logits, params), axis=-1)


def processed_logits_reference(logits, params: SamplingParams):
    """The logits of p_inf ``[B, V]`` (scaled; -inf outside the kept set; greedy rows 0 at the argmax) by sorting.

    Top-p keeps a token iff the mass of the tokens strictly more likely than it (the mass before the first
    token of its tie group in sorted order) is < top_p; a row with top_p = 1 keeps every token.
    """
    scaled, greedy = _scaled(logits, params)
    vocab = scaled.shape[-1]

    def top_k(scaled):  # the k-th largest logit of each row is its threshold (k = 0: off)
        k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
        descending = -jnp.sort(-scaled, axis=-1)
        kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
        return jnp.where(scaled >= kth, scaled, NEG_INF)

    def nucleus(scaled):
        logp = jax.nn.log_softmax(scaled, axis=-1)
        order = jnp.argsort(-scaled, axis=-1)
        ordered = jnp.take_along_axis(scaled, order, axis=-1)
        sorted_p = jnp.exp(jnp.take_along_axis(logp, order, axis=-1))
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
        mass_before = jnp.take_along_axis(before, _group_starts(ordered), axis=-1)
        keep_sorted = (mass_before < params.top_p[:, None]) | (params.top_p[:, None] >= 1)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
        return jnp.where(keep, scaled, NEG_INF)

    # the sorts run only when some row asks for them (a full sort of [B, V] dominates a decode step)
    scaled = jax.lax.cond(jnp.any(params.top_k > 0), top_k, lambda s: s, scaled)
    scaled = jax.lax.cond(jnp.any(params.top_p < 1.0), nucleus, lambda s: s, scaled)
    return _point_mass(logits, scaled, greedy)


def _group_starts(descending):
    """For each place of rows sorted in descending order ``[B, n]``, the place of the first value equal to it."""
    index = jnp.arange(descending.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(descending[:, :1], bool), descending[:, 1:] != descending[:, :-1]], -1)
    return jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def _key(value):
    """The int32 keys of float32 values, in the values' order."""
    bits = jax.lax.bitcast_convert_type(value, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _below(v):
    """The largest float32 that compares below ``v`` on hardware that reads subnormals as 0 (XLA:CPU does)."""
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.where(jnp.abs(v) < tiny, -tiny, jnp.nextafter(v, NEG_INF))


def _value(key):
    """The float32 values of int32 keys (the inverse of :func:`_key`)."""
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


class _Search(NamedTuple):
    passes: jax.Array  # () int32
    lo: jax.Array  # [B] W(lo) >= target
    hi: jax.Array  # [B] W(hi) < target
    w_lo: jax.Array
    w_hi: jax.Array
    part_lo: jax.Array  # [B, V / block] W(lo) and W(hi) summed per block of tokens (their sums: w_lo, w_hi)
    part_hi: jax.Array
    f_lo: jax.Array  # W - target at lo and at hi for the secant, halved when the other end moved twice running
    f_hi: jax.Array
    side: jax.Array  # [B] int32: the end the last pass moved (1: hi, -1: lo, 0: none)
    probe: jax.Array  # [B] bool: the next pass is just below hi
    done: jax.Array  # [B] bool
    t: jax.Array  # [B] the threshold of the rows done


def _search_block(vocab: int) -> int:
    """Tokens per block of a search's partial sums: the largest divisor of ``vocab`` in [16, 64], else ``vocab``."""
    size = _block_size(vocab, 64)
    return size if vocab % size == 0 else vocab


def _partial_sums(x, weight, mid, size):
    """W(mid) per block of ``size`` tokens ``[B, V / size]``: the sum of ``weight`` over the tokens > ``mid [B]``
    (``weight(-inf)`` is 0). Weighing the masked values keeps XLA from hoisting a [B, V] ``weight(x)`` out of a
    search's loop (which doubles what each pass reads); a product with ones, where XLA:CPU fuses the weights
    into one pass, is 1.8x faster than a sum (which it materializes first)."""
    rows, vocab = x.shape
    masked = weight(jnp.where(x > mid[:, None], x, NEG_INF)).reshape(rows, vocab // size, size)
    return jnp.matmul(masked, jnp.ones(size), precision=jax.lax.Precision.HIGHEST)  # float32 sums everywhere


def _threshold(x, weight, target, lo, part_lo, hi, part_hi, done, t):
    """Per row of ``x [B, V]`` the smallest value t of its tokens with W(t) < ``target [B]``, where W(v) is the
    sum of ``weight`` over the tokens with value > v, given lo < t <= hi, W(lo) >= target > W(hi) and their
    sums per block of :func:`_search_block` tokens ``part_lo``, ``part_hi`` ``[B, V / block]``; the rows already
    ``done`` keep ``t``.

    Each pass is one sum over ``[B, V]`` at one threshold per row: first at two guesses from a sorted strided
    sample of each row, then regula falsi (Illinois), every 8th pass a bisection of the float32 key (so at most
    ~8 x 32 passes); a bracket (lo, hi] of a single value gives t = hi. Once every bracket holds fewer than
    ``BRACKET`` tokens (at most its weight over weight(lo)), its tokens are listed in order by one ``lax.top_k``
    over the blocks whose sums at lo and hi differ (where rounding could hide a token: over the whole row) and
    their cumulative weights give t: exactly the sorted definition's threshold, up to the order of the sums.
    """
    rows, vocab = x.shape
    size = _search_block(vocab)
    blocks = vocab // size
    bracket = min(BRACKET, vocab)
    w_lo, w_hi = jnp.sum(part_lo, axis=-1), jnp.sum(part_hi, axis=-1)
    guesses = _guesses(x, weight, target / w_lo)

    def step(s):
        klo, khi = _key(s.lo), _key(s.hi)
        bisect = _value((klo >> 1) + (khi >> 1) + (klo & khi & 1))
        secant = s.lo + s.f_lo / (s.f_lo - s.f_hi) * (s.hi - s.lo)
        secant = jnp.clip(secant, s.lo + (s.hi - s.lo) / 8, s.hi - (s.hi - s.lo) / 8)
        guess = guesses[:, jnp.minimum(s.passes, guesses.shape[1] - 1)]
        mid = jnp.where((s.passes < guesses.shape[1]) & (s.lo < guess) & (guess < s.hi), guess, secant)
        mid = jnp.where((s.passes % 8 == 7) | ~((s.lo < mid) & (mid < s.hi)), bisect, mid)
        mid = jnp.where(s.probe, _below(s.hi), mid)
        part = _partial_sums(x, weight, mid, size)
        w = jnp.sum(jax.lax.optimization_barrier(part), axis=-1)  # else XLA sums [B, V] a second time
        to_hi, to_lo = ~s.done & (w < target), ~s.done & (w >= target)
        lo, hi = jnp.where(to_lo, mid, s.lo), jnp.where(to_hi, mid, s.hi)
        single = ~s.done & (_key(lo) >= _key(hi) - 1)  # (lo, hi] holds only the value hi
        return _Search(s.passes + 1, lo, hi, jnp.where(to_lo, w, s.w_lo), jnp.where(to_hi, w, s.w_hi),
                       jnp.where(to_lo[:, None], part, s.part_lo), jnp.where(to_hi[:, None], part, s.part_hi),
                       jnp.where(to_lo, w - target, jnp.where(to_hi & (s.side == 1), s.f_lo / 2, s.f_lo)),
                       jnp.where(to_hi, w - target, jnp.where(to_lo & (s.side == -1), s.f_hi / 2, s.f_hi)),
                       jnp.where(to_hi, 1, jnp.where(to_lo, -1, s.side)), jnp.zeros_like(s.probe),
                       s.done | single, jnp.where(single, hi, s.t))

    def listed(s):
        """The tokens of each bracket in descending order ``[B, bracket]``, -inf after the last."""
        def inside(v):
            return jnp.where((v > s.lo[:, None]) & (v <= s.hi[:, None]), v, NEG_INF)

        def whole(_):  # the barrier keeps XLA:CPU's TopK a TopK (slices of its output turn it into a sort)
            return jax.lax.optimization_barrier(jax.lax.top_k(inside(x), bracket)[0])

        if blocks <= bracket:
            return whole(None)
        # a block holds a token of the bracket iff its sums differ, unless its sum at lo is so large that
        # float32 rounding could hide a token of weight(lo) (the error bound of `size` roundings, with margin)
        held = (s.part_lo > s.part_hi) | (s.part_lo * (size * 2.0 ** -22) >= weight(s.lo[:, None]))
        crowded = jnp.any(~s.done & (jnp.sum(held, axis=-1) > bracket))

        def by_block(_):  # the first `bracket` blocks holding tokens, found by a binary search of their count
            count = jnp.cumsum(held, axis=-1)
            chosen = jax.vmap(jnp.searchsorted)(count, jnp.broadcast_to(jnp.arange(1, bracket + 1), (rows, bracket)))
            gathered = jnp.take_along_axis(x.reshape(rows, blocks, size), jnp.minimum(chosen, blocks - 1)[:, :, None],
                                           axis=1)
            gathered = jnp.where((chosen < blocks)[:, :, None], gathered, NEG_INF)  # past the last holding block
            return jax.lax.optimization_barrier(jax.lax.top_k(inside(gathered.reshape(rows, -1)), bracket)[0])

        return jax.lax.cond(crowded, whole, by_block, None)

    def extract(s):
        tokens = listed(s)
        real = tokens > s.lo[:, None]
        w = jnp.where(real, weight(tokens), 0.0)
        above = s.w_hi[:, None] + jnp.take_along_axis(jnp.cumsum(w, axis=-1) - w, _group_starts(tokens), axis=-1)
        valid = real & (above < target[:, None])
        resolved = ~s.done & (~real[:, -1] | jnp.any(real & ~valid, axis=-1))
        moved = ~s.done & ~resolved  # every token listed is valid and more may follow: hi moves to the last
        w_hi = jnp.where(moved, above[:, -1], s.w_hi)
        return s._replace(hi=jnp.where(moved, tokens[:, -1], s.hi), w_hi=w_hi,
                          f_hi=jnp.where(moved, w_hi - target, s.f_hi), side=jnp.where(moved, 0, s.side),
                          probe=moved, done=s.done | resolved,
                          t=jnp.where(resolved, jnp.min(jnp.where(valid, tokens, jnp.inf), axis=-1), s.t))

    def unready(s):
        return ~jnp.all(s.done | ((s.w_lo - s.w_hi) / weight(s.lo[:, None])[:, 0] < bracket))

    done = done | ~(jnp.isfinite(lo) & jnp.isfinite(hi))
    s = _Search(jnp.array(0), lo, hi, w_lo, w_hi, part_lo, part_hi, w_lo - target, w_hi - target,
                jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool), done, t)
    s = jax.lax.while_loop(lambda s: unready(s) & (s.passes < MAX_PASSES), step, s)
    s = jax.lax.cond(jnp.any(~s.done), extract, lambda s: s, s)
    # rows the extraction left (a tie group of >= BRACKET tokens, or a bracket the bound misjudged): passes only
    end = jax.lax.while_loop(lambda s: jnp.any(~s.done) & (s.passes < MAX_PASSES), step, s)
    return jnp.where(end.done, end.t, end.hi)


def _guesses(x, weight, fraction):
    """Two thresholds per row ``[B, 2]`` from a sorted strided sample of ``x [B, V]``: where the sample puts the
    share of the weight above at ``fraction - GUESS_MARGIN`` and ``fraction + GUESS_MARGIN``."""
    # the barrier: else XLA computes weight(x) over [B, V] once for the sample and the passes
    sample = -jnp.sort(-jax.lax.optimization_barrier(x[:, ::max(1, x.shape[-1] // SKETCH)]), axis=-1)
    w = weight(sample)
    share = (jnp.cumsum(w, axis=-1) - w) / jnp.sum(w, axis=-1, keepdims=True)
    places = jnp.stack([jnp.sum(share < (fraction + d)[:, None], axis=-1) for d in (-GUESS_MARGIN, GUESS_MARGIN)], 1)
    return jnp.take_along_axis(sample, jnp.minimum(places, sample.shape[-1] - 1), axis=-1)


def _kth_largest(x, k, done):
    """The k-th largest value of each row of ``x [B, V]`` (ties counted), k ``[B]``, without sorting."""
    size = _search_block(x.shape[-1])
    lo = _below(jnp.min(jnp.where(x > NEG_INF, x, jnp.inf), axis=-1))

    def one(v):
        return jnp.where(v > NEG_INF, 1.0, 0.0)

    part_lo = _partial_sums(x, one, lo, size)
    count = jnp.sum(part_lo, axis=-1)  # k > count: the k-th largest is -inf
    return _threshold(x, one, k.astype(jnp.float32), lo, part_lo, jnp.max(x, axis=-1),
                      jnp.zeros_like(part_lo), done | (count < k), jnp.full(x.shape[:1], NEG_INF))


def processed_log_probs(logits, params: SamplingParams):
    """log p_inf ``[B, V]`` from raw logits ``[B, V]`` and per-row :class:`SamplingParams`, without sorting ``V``."""
    return jax.nn.log_softmax(processed_logits(logits, params), axis=-1)


def processed_logits(logits, params: SamplingParams):
    """The logits of p_inf ``[B, V]``: scaled by the temperature, -inf outside the kept set, greedy rows 0 at
    the argmax; their log-softmax is :func:`processed_log_probs`.

    The top-k threshold is the k-th of the ``TOP_K_CANDIDATES`` largest (:func:`top_k`) when k is at most that,
    else a search (:func:`_threshold` on counts); the top-p threshold comes from those candidates when they
    decide it (a peaked distribution: no search), else from a search on the probabilities. The kept set
    and the log-probs are those of :func:`processed_log_probs_reference`, except where the mass of the tokens
    more likely than a token is within float32 rounding of top_p (the sums are taken in another order).
    """
    scaled, greedy = _scaled(logits, params)
    vocab, rows = scaled.shape[-1], scaled.shape[0]

    def kth(scaled):
        k = params.top_k
        candidates = min(TOP_K_CANDIDATES, vocab)
        off, wide = (k <= 0) | (k >= vocab), (k > candidates) & (k < vocab)
        top = top_k(scaled, candidates)[0]  # the two-level top-k
        kth = jnp.take_along_axis(top, jnp.clip(k - 1, 0, candidates - 1)[:, None], axis=-1)[:, 0]
        far = jax.lax.cond(jnp.any(wide), lambda s: _kth_largest(s, k, ~wide), lambda s: jnp.full_like(kth, NEG_INF),
                           scaled)
        return jnp.where(off, NEG_INF, jnp.where(wide, far, kth))

    def nucleus(scaled, t_k):
        size = _search_block(vocab)
        listed, ids = top_k(scaled, min(TOP_K_CANDIDATES, vocab))  # the most likely tokens, in order
        listed = jnp.where(listed >= t_k[:, None], listed, NEG_INF)  # the top-k set's
        top, last = listed[:, :1], listed[:, -1]

        def weight(v):  # p times the row's normalizer; 0 in float32 below top - 104
            return jnp.exp(v - top)

        # the search's lower end: below it every token is outside the top-k set or of weight 0, so the passes
        # never count those (x > lo) and scaled needs no mask of its own
        lo = jnp.maximum(top[:, 0] - 104.0, _below(t_k))
        lo = jnp.where(last > NEG_INF, jnp.minimum(lo, _below(last)), lo)  # below the list's end
        part_lo = _partial_sums(scaled, weight, lo, size)
        target = params.top_p * jnp.sum(part_lo, axis=-1)
        # every token above a listed one is listed: the mass before each listed token is exact, and when the
        # last listed one is not kept (or all are listed), the threshold is among them without a search
        w = jnp.where(listed > NEG_INF, weight(listed), 0.0)
        above = jnp.take_along_axis(jnp.cumsum(w, axis=-1) - w, _group_starts(listed), axis=-1)
        found = (above[:, -1] >= target) | (last == NEG_INF)
        t = jnp.where(found, jnp.min(jnp.where(above < target[:, None], listed, jnp.inf), axis=-1), NEG_INF)
        # else the search starts from the bracket (lo, last]
        part_hi = jnp.zeros_like(part_lo).at[jnp.arange(rows)[:, None], ids // size].add(
            jnp.where(listed > last[:, None], w, 0.0))
        off = greedy | (params.top_p >= 1)
        return _threshold(scaled, weight, target, lo, part_lo, last, part_hi, off | found, jnp.where(off, NEG_INF, t))

    # the conditions give per-row thresholds (-inf: off), applied in one mask the consumers fuse
    off = lambda *_: jnp.full((rows,), NEG_INF)  # noqa: E731
    t_k = jax.lax.cond(jnp.any((params.top_k > 0) & ~greedy), kth, off, scaled)
    t_p = jax.lax.cond(jnp.any((params.top_p < 1.0) & ~greedy), nucleus, off, scaled, t_k)
    kept = jnp.where((scaled >= t_k[:, None]) & (scaled >= t_p[:, None]), scaled, NEG_INF)
    return _point_mass(logits, kept, greedy)  # greedy rows are the point mass whatever they ask for


class Sampled(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] log p_inf(token)
    topk_ids: jax.Array  # [B, K] int32, most likely first (K = 0: empty)
    topk_logprobs: jax.Array  # [B, K] log p_inf of those


def _block_size(vocab: int, size: int) -> int:
    """The largest divisor of ``vocab`` in [size / 4, size] (no padding: XLA:CPU pads a [B, V] array in a
    pass of its own, and a gather from padded blocks costs 25x one from whole ones at V = 151,936), else size."""
    return next((b for b in range(size, size // 4 - 1, -1) if vocab % b == 0), size)


def _blocks(x, size, fill):
    """``x [B, V]`` as ``[B, ceil(V / size), size]``, the last block padded with ``fill``."""
    b, v = x.shape
    n = -(-v // size)
    return jnp.pad(x, ((0, 0), (0, n * size - v)), constant_values=fill).reshape(b, n, size)


def _last_positive(x):
    """The index of the last entry > 0 along the last axis (0 if none)."""
    n = x.shape[-1]
    return n - 1 - jnp.argmax(x[..., ::-1] > 0, axis=-1)


def inverse_cdf(p, u):
    """The first token whose cumulative probability exceeds ``u`` times the row's total, for
    ``p [B, V]`` (unnormalized) and ``u [B]`` in [0, 1), and that total ``[B]``: a cumulative sum
    over blocks of about ``CDF_BLOCK`` tokens (:func:`_block_size`), then one within the block it
    falls in (two short scans, not one over V: 8x faster on XLA:CPU at V = 32,000). A token of
    probability 0 is never drawn."""
    size = _block_size(p.shape[1], CDF_BLOCK)
    blocks = _blocks(p, size, 0.0)
    sums = jnp.sum(blocks, axis=-1)
    cdf = jnp.cumsum(sums, axis=-1)
    target = u * cdf[:, -1]
    block = jnp.minimum(jnp.sum(cdf < target[:, None], axis=-1), _last_positive(sums))
    before = jnp.where(block > 0, jnp.take_along_axis(cdf, jnp.maximum(block - 1, 0)[:, None], axis=1)[:, 0], 0.0)
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    offset = jnp.minimum(jnp.sum(jnp.cumsum(inside, axis=-1) + before[:, None] < target[:, None], axis=-1),
                         _last_positive(inside))
    return (block * size + offset).astype(jnp.int32), cdf[:, -1]


def block_maxima(x):
    """The maxima of ``x [B, V]`` over blocks of ``TOP_BLOCK`` tokens ``[B, ceil(V / TOP_BLOCK)]``."""
    return jnp.max(_blocks(x, TOP_BLOCK, NEG_INF), axis=-1)


def top_k(x, k: int, maxima=None):
    """``lax.top_k(x, k)`` for ``x [B, V]`` (the same values and ids, ties to the lower id) from
    the ``k`` blocks of ``TOP_BLOCK`` tokens with the largest maxima (``maxima``: x's
    :func:`block_maxima`, if already at hand), which hold the k largest entries: 2.5x faster on
    XLA:CPU at V = 32,000, k = 20."""
    n = -(-x.shape[1] // TOP_BLOCK)
    if 4 * k > n:
        return jax.lax.top_k(x, k)
    maxima = block_maxima(x) if maxima is None else maxima
    # the barriers keep XLA:CPU's TopKs TopKs (a slice or sort of their outputs can turn them into sorts)
    chosen = jnp.sort(jax.lax.optimization_barrier(jax.lax.top_k(maxima, k)[1]), axis=-1)  # id order: lax's ties
    candidates = jnp.take_along_axis(_blocks(x, TOP_BLOCK, NEG_INF), chosen[:, :, None], axis=1)
    values, at = jax.lax.top_k(candidates.reshape(x.shape[0], k * TOP_BLOCK), k)
    values, at = jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(at)
    return values, jnp.take_along_axis(chosen, at // TOP_BLOCK, axis=1) * TOP_BLOCK + at % TOP_BLOCK


def sample(key, logits, params: SamplingParams, logprobs_top_k: int = 0) -> Sampled:
    """Draw one token per row from p_inf; ``key`` is one key per row ``[B]`` (per-request seeds).

    Inverse-CDF sampling with one uniform per row (:func:`inverse_cdf`): a quarter of
    Gumbel-max's ``V`` random draws per row on CPU. log p_inf = x - max - log Z of the processed
    logits x, Z summed by the inverse CDF's blocks; the row maxima come from the top-k's blocks:
    three passes over ``[B, V]`` where a log-softmax first takes five.
    """
    kept = processed_logits(logits, params)
    maxima = jax.lax.optimization_barrier(block_maxima(kept))  # else XLA takes the row maxima in a pass of their own
    top = jnp.max(maxima, axis=-1, keepdims=True)  # finite: p_inf keeps at least one token
    shifted = kept - top
    u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(key)
    tokens, total = inverse_cdf(jnp.exp(shifted), u)
    log_total = jnp.log(total)[:, None]
    logprob = (jnp.take_along_axis(shifted, tokens[:, None], axis=-1) - log_total)[:, 0]
    if logprobs_top_k:
        values, top_ids = top_k(kept, logprobs_top_k, maxima)
        top_logp = (values - top) - log_total
    else:
        top_logp, top_ids = jnp.zeros((kept.shape[0], 0)), jnp.zeros((kept.shape[0], 0), jnp.int32)
    return Sampled(tokens, logprob, top_ids.astype(jnp.int32), top_logp)
