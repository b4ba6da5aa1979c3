"""Running statistics over vocabulary blocks, shared by the chunked XLA code and the Pallas
kernels (plain jnp, valid inside a kernel): the online logsumexp and the running top-k merge."""
import jax.numpy as jnp

NEG_INF = float("-inf")
_NO_INDEX = float(2**24)  # larger than any column id; ids are float32, exact below 2**24


def online_lse(m, s, x, keepdims):
    """Fold a block ``x [bn, bv]`` into a running max ``m`` and scaled sum ``s`` (``[bn, 1]`` with
    ``keepdims``, else ``[bn]``). Returns ``(m_new, s_new, weights, rescale)``: ``weights =
    exp(x - m_new)`` and ``rescale = exp(m - m_new)``, for sums that ride along (e.g. a KL)."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=keepdims))
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    weights = jnp.exp(x - (m_safe if keepdims else m_safe[:, None]))
    rescale = jnp.exp(m - m_safe)
    return m_new, s * rescale + jnp.sum(weights, axis=1, keepdims=keepdims), weights, rescale


def merge_topk(cand, cols, run_v, run_i, lane, k, cand_payload=None, run_payload=None):
    """Merge a block ``cand [bn, bv]`` (column ids ``cols``) into the running top-k ``run_v,
    run_i [bn, kp]`` (sorted in the first ``k`` lanes; ``lane`` is the lane index).

    ``k`` rounds of "take the larger head": a block candidate wins only if strictly larger, so
    among equal values the lower column id (seen in an earlier block) comes first, as in
    ``lax.top_k``. A payload (``cand_payload [bn, bv]``, ``run_payload [bn, kp]``) rides along
    with the values. Returns the new ``(values, ids)``, float32, and the new payload if given.
    """
    new_v = jnp.full(run_v.shape, NEG_INF, jnp.float32)
    new_i = jnp.zeros(run_i.shape, jnp.float32)
    new_p = None if run_payload is None else jnp.full(run_payload.shape, NEG_INF, jnp.float32)
    for r in range(k):
        block_max = jnp.max(cand, axis=1, keepdims=True)
        run_max = jnp.max(run_v, axis=1, keepdims=True)
        from_block = block_max > run_max
        block_idx = jnp.min(jnp.where(cand == block_max, cols, _NO_INDEX), axis=1, keepdims=True)
        run_pos = jnp.min(jnp.where(run_v == run_max, lane, _NO_INDEX), axis=1, keepdims=True)
        run_idx = jnp.sum(jnp.where(lane == run_pos, run_i, 0.0), axis=1, keepdims=True)
        new_v = jnp.where(lane == r, jnp.where(from_block, block_max, run_max), new_v)
        new_i = jnp.where(lane == r, jnp.where(from_block, block_idx, run_idx), new_i)
        taken = from_block & (cols == block_idx)
        if new_p is not None:
            block_p = jnp.max(jnp.where(taken, cand_payload, NEG_INF), axis=1, keepdims=True)
            run_p = jnp.max(jnp.where(lane == run_pos, run_payload, NEG_INF), axis=1, keepdims=True)
            new_p = jnp.where(lane == r, jnp.where(from_block, block_p, run_p), new_p)
        cand = jnp.where(taken, NEG_INF, cand)
        run_v = jnp.where(~from_block & (lane == run_pos), NEG_INF, run_v)
    return (new_v, new_i) if new_p is None else (new_v, new_i, new_p)


def union_mass(inf_ids, inf_mass, tgt_ids, tgt_mass, lane, k):
    """sum of exp(mass) over topk(p_inf) U topk(p_target), each token once (section 4.4.1):
    ``[bn, kp]`` ids and log-masses of both top-k sets in, ``[bn, 1]`` out."""
    in_k = lane < k
    total = jnp.sum(jnp.where(in_k, jnp.exp(inf_mass), 0.0), axis=1, keepdims=True)
    for a in range(k):
        tgt_id = jnp.sum(jnp.where(lane == a, tgt_ids, 0.0), axis=1, keepdims=True)
        mass = jnp.sum(jnp.where(lane == a, jnp.exp(tgt_mass), 0.0), axis=1, keepdims=True)
        seen = jnp.max(jnp.where(in_k & (inf_ids == tgt_id), 1.0, 0.0), axis=1, keepdims=True)
        total = total + mass * (1.0 - seen)
    return total
