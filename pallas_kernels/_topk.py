"""The running top-k merge shared by the Pallas kernels (plain jnp on in-kernel values)."""
import jax.numpy as jnp

NEG_INF = float("-inf")
_NO_INDEX = float(2**24)  # larger than any column id; ids are float32, exact below 2**24


def merge_topk(cand, cols, run_v, run_i, lane, k):
    """Merge a block ``cand [bn, bv]`` (column ids ``cols``) into the running top-k ``run_v,
    run_i [bn, kp]`` (sorted in the first ``k`` lanes; ``lane`` is the lane index).

    ``k`` rounds of "take the larger head": a block candidate wins only if strictly larger, so
    among equal values the lower column id (seen in an earlier block) comes first, as in
    ``lax.top_k``. Returns the new ``(values, ids)``, float32.
    """
    new_v = jnp.full(run_v.shape, NEG_INF, jnp.float32)
    new_i = jnp.zeros(run_i.shape, jnp.float32)
    for r in range(k):
        block_max = jnp.max(cand, axis=1, keepdims=True)
        run_max = jnp.max(run_v, axis=1, keepdims=True)
        from_block = block_max > run_max
        block_idx = jnp.min(jnp.where(cand == block_max, cols, _NO_INDEX), axis=1, keepdims=True)
        run_pos = jnp.min(jnp.where(run_v == run_max, lane, _NO_INDEX), axis=1, keepdims=True)
        run_idx = jnp.sum(jnp.where(lane == run_pos, run_i, 0.0), axis=1, keepdims=True)
        new_v = jnp.where(lane == r, jnp.where(from_block, block_max, run_max), new_v)
        new_i = jnp.where(lane == r, jnp.where(from_block, block_idx, run_idx), new_i)
        cand = jnp.where(from_block & (cols == block_idx), NEG_INF, cand)
        run_v = jnp.where(~from_block & (lane == run_pos), NEG_INF, run_v)
    return new_v, new_i
