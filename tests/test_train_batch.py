"""make_batch: a hand-built rollout's per-token arrays land at the target positions of its tokens."""
import numpy as np
import pytest

from jackpot_jax.train.batch import make_batch, select, split_micro

# two sequences: prompt [5, 6] + completion [7, 8, 9], and prompt [4] + completion [3]
PROMPTS, COMPLETIONS = [[5, 6], [4]], [[7, 8, 9], [3]]
LOGPROBS = [np.asarray([-0.1, -0.2, -0.3], np.float32), np.asarray([-0.4], np.float32)]
# p_inf's top-2 at each generated token (ids, log-probs), most likely first
TOPK_IDS = [np.asarray([[7, 1], [8, 2], [9, 3]], np.int32), np.asarray([[3, 0]], np.int32)]
TOPK_LOGP = [np.asarray([[-0.1, -2.0], [-0.2, -2.1], [-0.3, -2.2]], np.float32), np.asarray([[-0.4, -1.5]], np.float32)]


def test_make_batch_aligns_p_inf_and_its_top_k_with_the_targets():
    batch = make_batch(PROMPTS, COMPLETIONS, LOGPROBS, [1.0, -1.0], 6, pad_id=0, topk_ids=TOPK_IDS,
                       topk_logprobs=TOPK_LOGP)
    # target t is token t + 1: sequence 0's completion is predicted at t = 1, 2, 3; sequence 1's at t = 0
    np.testing.assert_array_equal(batch.targets, [[6, 7, 8, 9, 0], [3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch.valid, [[False, True, True, True, False], [True, False, False, False, False]])
    np.testing.assert_allclose(batch.logp_inf, [[0, -0.1, -0.2, -0.3, 0], [-0.4, 0, 0, 0, 0]])
    assert batch.topk_ids.shape == batch.topk_logp_inf.shape == (2, 5, 2)
    assert batch.topk_ids.dtype == np.int32 and batch.topk_logp_inf.dtype == np.float32
    for (row, col), ids, logp in zip([(0, 1), (0, 2), (0, 3), (1, 0)], np.concatenate(TOPK_IDS),
                                     np.concatenate(TOPK_LOGP)):
        assert batch.targets[row, col] == ids[0]  # the sampled token is here its p_inf's argmax
        np.testing.assert_array_equal(batch.topk_ids[row, col], ids)
        np.testing.assert_array_equal(batch.topk_logp_inf[row, col], logp)
    invalid = ~batch.valid
    assert np.all(batch.topk_ids[invalid] == 0) and np.all(batch.topk_logp_inf[invalid] == -np.inf)
    # the top-k arrays follow the sequences through select and split_micro
    picked = select(batch, np.asarray([1]))
    np.testing.assert_array_equal(picked.topk_ids[0, 0], [3, 0])
    assert split_micro(batch, 2).topk_logp_inf.shape == (2, 1, 5, 2)


def test_select_of_host_and_device_arrays_equals_numpy_indexing():
    import jax.numpy as jnp  # noqa: PLC0415

    rng = np.random.default_rng(0)
    tree = {"host": rng.normal(size=(6, 3)), "device": jnp.asarray(rng.normal(size=(6, 2, 2)), jnp.float32),
            "ids": jnp.arange(6, dtype=jnp.int32), "none": None}
    rows = np.asarray([4, 0, 5])
    picked = select(tree, rows)
    assert isinstance(picked["host"], np.ndarray) and picked["none"] is None
    for key in ("host", "device", "ids"):
        np.testing.assert_array_equal(np.asarray(picked[key]), np.asarray(tree[key])[rows])


def test_without_top_k_the_batch_has_none():
    for extra in ({}, {"topk_ids": [x[:, :0] for x in TOPK_IDS], "topk_logprobs": [x[:, :0] for x in TOPK_LOGP]}):
        batch = make_batch(PROMPTS, COMPLETIONS, LOGPROBS, [1.0, -1.0], 6, **extra)
        assert batch.topk_ids is None and batch.topk_logp_inf is None
    assert split_micro(batch, 2).topk_ids is None


@pytest.mark.parametrize("topk_ids,topk_logprobs,match", [
    (TOPK_IDS, None, "give both topk_ids and topk_logprobs"),
    (TOPK_IDS[:1], TOPK_LOGP, "differ in length: 1, 2, 2"),
    ([TOPK_IDS[0][:2], TOPK_IDS[1]], TOPK_LOGP, "sequence 0: 3 completion tokens and top-k arrays of shapes"),
    ([TOPK_IDS[0], np.zeros((1, 3), np.int32)], TOPK_LOGP, "sequence 1: .* one K for all \\(K=2"),
])
def test_bad_top_k_lists_are_refused_naming_the_sequence(topk_ids, topk_logprobs, match):
    with pytest.raises(ValueError, match=match):
        make_batch(PROMPTS, COMPLETIONS, LOGPROBS, [1.0, -1.0], 6, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
