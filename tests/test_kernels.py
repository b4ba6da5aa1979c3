"""pallas_kernels: every implementation against the materialized reference (forward values, top-k
ids, gradients), on small and odd shapes with padded vocabularies; memory structure; bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import chunked, pallas_gpu, pallas_tpu
from jackpot_jax import losses, obrs

STREAMING = ["chunked"]
# The Pallas kernels run interpreted on this CPU; each is the forward kernel + the chunked backward.
TOKEN_STATS = ["chunked", "pallas_tpu", "pallas_gpu"]


def with_impls(names, cases):
    """``(impl, *case)`` for every implementation and case: the interpreted Pallas kernels on the
    first case in CI, on the others with `make test-slow` (interpreting them is most of this file's time)."""
    return pytest.mark.parametrize(("impl",) + names, [
        pytest.param(impl, *case, marks=pytest.mark.slow) if impl != "chunked" and i else (impl, *case)
        for i, case in enumerate(cases) for impl in TOKEN_STATS])


def token_stats(impl, h, w, targets, k, **opts):
    """fused_token_stats through the public API, or one Pallas kernel interpreted."""
    if impl.startswith("pallas_"):
        kernel = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[impl]
        opts.pop("block_v", None)
        return kernel.token_stats(h, w, targets, k, interpret=True, **opts)
    return pk.fused_token_stats(h, w, targets, k, impl=impl, **opts)


def _pass_fn(impl):
    kernel = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[impl]
    return functools.partial(kernel.two_model_pass, interpret=True)


def distill_kl(impl, *args, **opts):
    """fused_distill_kl through the public API, or with one Pallas kernel's forward, interpreted."""
    if impl.startswith("pallas_"):
        return chunked.distill_kl(*args, pass_fn=_pass_fn(impl), **opts)
    return pk.fused_distill_kl(*args, impl=impl, **opts)


def jackpot_stats(impl, *args, **opts):
    """fused_jackpot_stats through the public API, or with one Pallas kernel's first pass."""
    if impl.startswith("pallas_"):
        return chunked.jackpot_stats(*args, pass_fn=_pass_fn(impl), **opts)
    return pk.fused_jackpot_stats(*args, impl=impl, **opts)


def obrs_normalizer(impl, *args, **opts):
    """fused_obrs_normalizer through the public API, or one Pallas kernel interpreted."""
    if impl.startswith("pallas_"):
        kernel = {"pallas_tpu": pallas_tpu, "pallas_gpu": pallas_gpu}[impl]
        opts.pop("block_v", None)
        *args, exact = args
        z_topk, z_exact = kernel.obrs_normalizer(*args, interpret=True, **opts)
        return z_topk, (z_exact if exact else None)
    return pk.fused_obrs_normalizer(*args, impl=impl, **opts)

# (N, D, V, vocab_size, k, block_v): vocabularies that do not divide the block, a padded tail,
# a single block, blocks of one column more than k, and k = V.
SHAPES = [
    (1, 4, 2, 2, 1, 8),
    (13, 8, 37, 30, 5, 8),
    (7, 16, 300, 300, 20, 64),
    (5, 6, 11, 11, 11, 4),
    (9, 12, 1000, 997, 3, 128),
]


def head(rng, n, d, v, scale=1.0, dtype=jnp.float32):
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * scale / np.sqrt(d) * 3, dtype)
    return h, w


def assert_topk_equal(got_logp, got_ids, want_logp, want_ids, rtol):
    np.testing.assert_allclose(got_logp, want_logp, rtol=rtol, atol=rtol)
    # ids must match except where the log-probs tie (continuous data: practically never)
    same = np.asarray(got_ids) == np.asarray(want_ids)
    ties = np.isclose(np.asarray(want_logp)[:, :, None], np.asarray(want_logp)[:, None, :], rtol=1e-6).sum(-1) > 1
    assert np.all(same | ties)


@pytest.mark.parametrize("shape", SHAPES)
@with_impls(("temperature",), [(1.0,), (0.7,)])
def test_token_stats_forward_matches_reference(rng, impl, shape, temperature):
    n, d, v, vocab_size, k, block_v = shape
    h, w = head(rng, n, d, v)
    targets = jnp.asarray(rng.integers(0, vocab_size, n))
    opts = dict(temperature=temperature, vocab_size=vocab_size)
    got = token_stats(impl, h, w, targets, k, block_v=block_v, **opts)
    want = pk.fused_token_stats(h, w, targets, k, impl="reference", **opts)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert_topk_equal(got[2], got[3], want[2], want[3], rtol=1e-5)
    assert got[3].dtype == jnp.int32 and np.all(np.asarray(got[3]) < vocab_size)


@pytest.mark.parametrize("impl", TOKEN_STATS)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_token_stats_gradients_match_reference(rng, impl, shape):
    n, d, v, vocab_size, k, block_v = shape
    h, w = head(rng, n, d, v)
    targets = jnp.asarray(rng.integers(0, vocab_size, n))
    g_logp, g_lse = jnp.asarray(rng.normal(size=n)), jnp.asarray(rng.normal(size=n))

    def objective(impl):
        def f(h, w):
            logp, lse, _, _ = token_stats(impl, h, w, targets, k, temperature=0.8, vocab_size=vocab_size,
                                          block_v=block_v)
            return jnp.sum(g_logp * logp + g_lse * lse)
        return jax.grad(f, argnums=(0, 1))

    got_h, got_w = objective(impl)(h, w)
    want_h, want_w = objective("reference")(h, w)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got_w)[:, vocab_size:] == 0)  # padded columns get no gradient


@pytest.mark.parametrize("impl", TOKEN_STATS)
def test_token_stats_bfloat16(rng, impl):
    h, w = head(rng, 16, 32, 500, dtype=jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 500, 16))
    got = token_stats(impl, h, w, targets, 4, block_v=96)
    want = pk.fused_token_stats(h, w, targets, 4, impl="reference")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)
    grads = jax.grad(lambda h, w: token_stats(impl, h, w, targets, 4, block_v=96)[0].sum(),
                     argnums=(0, 1))(h, w)
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16


@pytest.mark.parametrize("shape", SHAPES)
@with_impls(("lam", "temperature_inf"), [(1.0, 1.0), (0.4, 0.7), (3.0, 1.3)])
def test_obrs_normalizer_matches_reference(rng, impl, shape, lam, temperature_inf):
    n, d, v, vocab_size, k, block_v = shape
    h_inf, w_inf = head(rng, n, d, v)
    h_tgt, w_tgt = head(rng, n, d + 3, v)  # the policy is wider than the actor
    targets = jnp.zeros(n, jnp.int32)
    lse_inf = pk.fused_token_stats(h_inf, w_inf, targets, 1, temperature=temperature_inf, vocab_size=vocab_size)[1]
    lse_tgt = pk.fused_token_stats(h_tgt, w_tgt, targets, 1, vocab_size=vocab_size)[1]
    args = (h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, lam, k, True)
    opts = dict(temperature_inf=temperature_inf, vocab_size=vocab_size)
    z_topk, z_exact = obrs_normalizer(impl, *args, block_v=block_v, **opts)
    want_topk, want_exact = pk.fused_obrs_normalizer(*args, impl="reference", **opts)
    np.testing.assert_allclose(z_topk, want_topk, rtol=2e-5)
    np.testing.assert_allclose(z_exact, want_exact, rtol=2e-5)
    assert np.all(np.asarray(z_topk) <= np.asarray(z_exact) * (1 + 1e-5))
    assert obrs_normalizer(impl, *args[:-1], False, block_v=block_v, **opts)[1] is None


def test_reference_normalizer_is_obrs_on_the_materialized_logits(rng):
    h_inf, w_inf = head(rng, 6, 8, 50)
    h_tgt, w_tgt = head(rng, 6, 8, 50)
    logp_inf = jax.nn.log_softmax(h_inf @ w_inf / 0.9)
    logp_tgt = jax.nn.log_softmax(h_tgt @ w_tgt)
    lse_inf = jax.nn.logsumexp(h_inf @ w_inf / 0.9, axis=-1)
    lse_tgt = jax.nn.logsumexp(h_tgt @ w_tgt, axis=-1)
    z_topk, z_exact = pk.fused_obrs_normalizer(h_inf, w_inf, lse_inf, h_tgt, w_tgt, lse_tgt, 0.8, 4, True,
                                               temperature_inf=0.9, impl="chunked", block_v=16)
    np.testing.assert_allclose(z_topk, obrs.topk_normalizer(logp_inf, logp_tgt, 0.8, 4), rtol=1e-5)
    np.testing.assert_allclose(z_exact, obrs.normalizer(logp_inf, logp_tgt, 0.8), rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@with_impls(("direction",), [("forward",), ("reverse",)])
def test_distill_kl_value_and_gradient_match_reference(rng, impl, shape, direction):
    n, d, v, vocab_size, _, block_v = shape
    h_t, w_t = head(rng, n, d + 2, v)
    h_s, w_s = head(rng, n, d, v)
    g = jnp.asarray(rng.uniform(0.5, 1.5, n))

    def loss(impl):
        def f(h_t, w_t, h_s, w_s):
            kl = distill_kl(impl, h_t, w_t, h_s, w_s, direction, vocab_size=vocab_size, block_v=block_v)
            return jnp.sum(g * kl), kl
        return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    got_grads, got = loss(impl)(h_t, w_t, h_s, w_s)
    want_grads, want = loss("reference")(h_t, w_t, h_s, w_s)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got) >= -1e-5)
    for name, a, b in zip(("h_student", "w_student"), got_grads[2:], want_grads[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    for teacher_grad in got_grads[:2]:
        assert np.all(np.asarray(teacher_grad) == 0)


def _largest_intermediate(fn, *args):
    """Number of elements of the largest array in the jaxpr of ``fn``, nested jaxprs included."""
    sizes = []

    def walk(param):
        if hasattr(param, "eqns"):  # a Jaxpr
            for eqn in param.eqns:
                sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
                for value in eqn.params.values():
                    walk(value)
        elif hasattr(param, "jaxpr"):  # a ClosedJaxpr
            walk(param.jaxpr)
        elif isinstance(param, (tuple, list)):
            for item in param:
                walk(item)

    walk(jax.make_jaxpr(fn)(*args))
    return max(sizes)


def test_chunked_forward_and_backward_never_form_tokens_by_vocab(rng):
    n, d, v, block_v = 256, 8, 4096, 256
    h, w = head(rng, n, d, v)
    h2, w2 = head(rng, n, d, v)
    targets = jnp.asarray(rng.integers(0, v, n))

    def stats(h, w, h2, w2, impl):
        logp, lse, _, _ = pk.fused_token_stats(h, w, targets, 20, impl=impl, block_v=block_v)
        logp2, lse2, _, _ = pk.fused_token_stats(h2, w2, targets, 20, impl=impl, block_v=block_v)
        z, z_exact = pk.fused_obrs_normalizer(h, w, lse, h2, w2, lse2, 0.9, 20, True, impl=impl, block_v=block_v)
        kl = pk.fused_distill_kl(h, w, h2, w2, impl=impl, block_v=block_v)
        return jnp.sum(logp + logp2 + kl + z + z_exact)

    grad = jax.grad(stats, argnums=(0, 1, 2, 3))
    # a block of logits, the weights, or the k x k union test of the top-k sets
    bound = max(n * block_v, d * v, n * 20 * 20)
    assert _largest_intermediate(lambda *a: grad(*a, "chunked"), h, w, h2, w2) <= bound

    def fused(h, w, h2, w2):
        stats = pk.fused_jackpot_stats(h, w, h2, w2, targets, 20, 0.9, exact=True, impl="chunked", block_v=block_v)
        return sum(jnp.sum(x) for x in stats if x is not None and x.dtype != jnp.int32)

    assert _largest_intermediate(jax.grad(fused, argnums=(0, 1, 2, 3)), h, w, h2, w2) <= bound
    assert _largest_intermediate(lambda *a: grad(*a, "reference"), h, w, h2, w2) >= n * v  # the check bites


def test_ops_jit_with_traced_lam(rng):
    h, w = head(rng, 8, 8, 64)
    targets = jnp.asarray(rng.integers(0, 64, 8))

    @jax.jit
    def step(h, w, lam):
        logp, lse, _, _ = pk.fused_token_stats(h, w, targets, 4)
        return pk.fused_obrs_normalizer(h, w, lse, h, w, lse, lam, 4, True)

    z_topk, z_exact = step(h, w, 2.0)
    np.testing.assert_allclose(z_exact, 0.5, rtol=1e-5)  # p_inf = p_target: Z = 1 / lam
    np.testing.assert_allclose(z_topk, step(h, w, 2.0)[0], rtol=0)


def _bad_inputs(rng):
    h, w = head(rng, 4, 8, 10)
    lse = jnp.zeros(4)
    t = jnp.zeros(4, jnp.int32)
    t2, lse2 = jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2))  # a stored top-2 of p_inf
    return [
        ("h has D=8 but w has D=7", lambda: pk.fused_token_stats(h, w[:7], t, 2)),
        ("k=11 is not allowed", lambda: pk.fused_token_stats(h, w, t, 11)),
        ("k=6 is not allowed", lambda: pk.fused_token_stats(h, w, t, 6, vocab_size=5)),
        ("h has dtype int32", lambda: pk.fused_token_stats(h.astype(jnp.int32), w, t, 2)),
        ("targets must be an integer array", lambda: pk.fused_token_stats(h, w, t.astype(jnp.float32), 2)),
        ("targets must be an integer array of shape \\[4\\]", lambda: pk.fused_token_stats(h, w, t[:3], 2)),
        ("temperature=0", lambda: pk.fused_token_stats(h, w, t, 2, temperature=0.0)),
        ("vocab_size=11 is not allowed", lambda: pk.fused_token_stats(h, w, t, 2, vocab_size=11)),
        ("impl='triton' is not allowed", lambda: pk.fused_token_stats(h, w, t, 2, impl="triton")),
        ("block_v=0", lambda: pk.fused_token_stats(h, w, t, 2, block_v=0)),
        ("lam=0", lambda: pk.fused_obrs_normalizer(h, w, lse, h, w, lse, 0.0, 2)),
        ("lam=-1", lambda: pk.fused_obrs_normalizer(h, w, lse, h, w, lse, -1.0, 2)),
        ("lse_tgt must have shape \\[4\\]", lambda: pk.fused_obrs_normalizer(h, w, lse, h, w, lse[:2], 1.0, 2)),
        ("h_inf has N=4 tokens but h_tgt has N=3", lambda: pk.fused_obrs_normalizer(h, w, lse, h[:3], w, lse, 1.0, 2)),
        ("w_inf has V=10 columns but w_tgt has V=9", lambda: pk.fused_obrs_normalizer(h, w, lse, h, w[:, :9], lse, 1.0, 2)),
        ("direction='sideways'", lambda: pk.fused_distill_kl(h, w, h, w, "sideways")),
        ("h_student has D=7 but w_student has D=8", lambda: pk.fused_distill_kl(h, w, h[:, :7], w)),
        ("h_actor has D=7 but w_actor has D=8", lambda: pk.fused_jackpot_stats(h, w, h[:, :7], w, t, 2, 1.0)),
        ("k=0 is not allowed", lambda: pk.fused_jackpot_stats(h, w, h, w, t, 0, 1.0)),
        ("lam=0", lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 0.0)),
        ("temperature_actor=-1", lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 1.0, temperature_actor=-1.0)),
        ("temperature must be a static Python number",
         lambda: jax.jit(lambda temp: pk.fused_token_stats(h, w, t, 2, temperature=temp))(0.5)),
        ("inf_topk holds K=2 tokens per position, fewer than k=3",
         lambda: pk.fused_jackpot_stats(h, w, h, w, t, 3, 1.0, inf_topk=(t2, lse2))),
        ("inf_topk ids must be an integer array", lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 1.0,
                                                                                 inf_topk=(lse2, lse2))),
        ("inf_topk logp must be a float array", lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 1.0,
                                                                               inf_topk=(t2, lse2[:, :1]))),
        ("inf_topk is not allowed with impl='pallas'",
         lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 1.0, inf_topk=(t2, lse2), impl="pallas")),
        ("inf_topk is not allowed with impl='chunked', exact=True",
         lambda: pk.fused_jackpot_stats(h, w, h, w, t, 2, 1.0, inf_topk=(t2, lse2), exact=True)),
    ]


@pytest.mark.parametrize("index", range(27))
def test_bad_input_gives_a_clear_value_error(rng, index):
    match, call = _bad_inputs(rng)[index]
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("shape", SHAPES[1:])
@with_impls(("direction", "temperature"), [("forward", 1.0), ("reverse", 0.8)])
def test_jackpot_stats_match_reference_and_the_separate_ops(rng, impl, shape, direction, temperature):
    n, d, v, vocab_size, k, block_v = shape
    h_pol, w_pol = head(rng, n, d + 4, v)
    h_act, w_act = head(rng, n, d, v)
    targets = jnp.asarray(rng.integers(0, vocab_size, n))
    cot = {name: jnp.asarray(rng.normal(size=n)) for name in ("logp_new", "lse_new", "logp_actor", "lse_actor", "distill_kl")}

    def run(impl):
        def f(h_pol, w_pol, h_act, w_act):
            stats = jackpot_stats(impl, h_pol, w_pol, h_act, w_act, targets, k, 0.9, temperature_actor=temperature,
                                  exact=True, direction=direction, vocab_size=vocab_size, block_v=block_v)
            return sum(jnp.sum(c * getattr(stats, name)) for name, c in cot.items()), stats
        return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(h_pol, w_pol, h_act, w_act)

    got_grads, got = run(impl)
    want_grads, want = run("reference")
    for field in ("logp_new", "lse_new", "logp_actor", "lse_actor", "z_topk", "z_exact", "distill_kl"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=2e-5, atol=2e-5, err_msg=field)
    assert_topk_equal(got.topk_logp_new, got.topk_ids_new, want.topk_logp_new, want.topk_ids_new, rtol=1e-5)
    assert_topk_equal(got.topk_logp_actor, got.topk_ids_actor, want.topk_logp_actor, want.topk_ids_actor, rtol=1e-5)
    for name, a, b in zip(("h_policy", "w_policy", "h_actor", "w_actor"), got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
    # the fused op is the separate ops put together
    separate = distill_kl(impl, h_pol, w_pol, h_act, w_act / temperature, direction, vocab_size=vocab_size,
                          block_v=block_v)
    np.testing.assert_allclose(got.distill_kl, separate, rtol=1e-4, atol=1e-5)
    z_topk, _ = obrs_normalizer(impl, h_act, w_act, got.lse_actor, h_pol, w_pol, got.lse_new, 0.9, k, False,
                                temperature_inf=temperature, vocab_size=vocab_size, block_v=block_v)
    np.testing.assert_allclose(got.z_topk, z_topk, rtol=1e-5)


def _one_pass_problem(rng, shape, ties):
    """A policy and a narrower actor; with ``ties``, small integers: exactly tied logits across blocks."""
    n, d, v, vocab_size, k, block_v = shape
    if ties:
        ints = lambda *size: jnp.asarray(rng.integers(-2, 3, size=size), jnp.float32)
        h_pol, w_pol, h_act, w_act = ints(n, d + 4), ints(d + 4, v), ints(n, d), ints(d, v)
    else:
        (h_pol, w_pol), (h_act, w_act) = head(rng, n, d + 4, v), head(rng, n, d, v)
    return h_pol, w_pol, h_act, w_act, jnp.asarray(rng.integers(0, vocab_size, n))


# SHAPES, a block of k + 1 columns over a padded vocabulary, and integer data with ties across blocks
# the first shape, k near the block over a padded vocabulary, and ties run in CI; the others with `make test-slow`
ONE_PASS = ([(SHAPES[0], False)] + [pytest.param(shape, False, marks=pytest.mark.slow) for shape in SHAPES[1:]]
            + [((6, 8, 100, 97, 15, 16), False), ((9, 8, 300, 290, 20, 32), True)])


@pytest.mark.parametrize("shape,ties", ONE_PASS)
@pytest.mark.parametrize("direction,temperature,lam", [("forward", 1.0, 1.0), ("reverse", 0.7, 0.6)])
def test_jackpot_stats_collect_both_topk_sets_in_the_first_pass(rng, shape, ties, direction, temperature, lam):
    """Chunked fused_jackpot_stats with the top-k Z: one forward pass gives both top-k sets (by raw
    logits), V_k and Z_approx, equal to the materialized reference and to the normalizer's own pass,
    at the given lam and at another lam applied afterwards; gradients as the reference's."""
    n, d, v, vocab_size, k, block_v = shape
    h_pol, w_pol, h_act, w_act, targets = _one_pass_problem(rng, shape, ties)
    differentiable = ("logp_new", "lse_new", "logp_actor", "lse_actor", "distill_kl")
    cot = {name: jnp.asarray(rng.normal(size=n)) for name in differentiable}

    def run(impl):
        def f(h_pol, w_pol, h_act, w_act):
            stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, direction=direction,
                                           temperature_actor=temperature, vocab_size=vocab_size, impl=impl,
                                           block_v=block_v)
            return sum(jnp.sum(c * getattr(stats, name)) for name, c in cot.items()), stats
        return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(h_pol, w_pol, h_act, w_act)

    got_grads, got = run("chunked")
    want_grads, want = run("reference")
    assert got.z_exact is None
    tol = dict(rtol=2e-5, atol=2e-5)
    for field in ("logp_new", "lse_new", "logp_actor", "lse_actor", "z_topk", "distill_kl"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), err_msg=field, **tol)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    check_ids = np.testing.assert_array_equal if ties else (lambda got_ids, want_ids: None)
    for model in ("new", "actor"):
        got_logp, got_ids = getattr(got, f"topk_logp_{model}"), getattr(got, f"topk_ids_{model}")
        want_logp, want_ids = getattr(want, f"topk_logp_{model}"), getattr(want, f"topk_ids_{model}")
        assert_topk_equal(got_logp, got_ids, want_logp, want_ids, rtol=1e-5)
        check_ids(got_ids, want_ids)
    if ties:
        assert np.sum(np.diff(np.asarray(want.topk_logp_new), axis=1) == 0) > 20
        np.testing.assert_allclose(got.vk_logp_actor, want.vk_logp_actor, **tol)
        np.testing.assert_allclose(got.vk_logp_new, want.vk_logp_new, **tol)
    # the normalizer's own pass over the vocabulary gives the same Z, and so does a lam chosen later
    z_topk, _ = chunked.obrs_normalizer(h_act, w_act, got.lse_actor, h_pol, w_pol, got.lse_new, lam, k, False,
                                        temperature_inf=temperature, vocab_size=vocab_size, block_v=block_v)
    np.testing.assert_allclose(got.z_topk, z_topk, rtol=1e-5)
    logp_act_all = jax.nn.log_softmax(jnp.where(jnp.arange(v) < vocab_size, h_act @ w_act / temperature, -jnp.inf))
    logp_new_all = jax.nn.log_softmax(jnp.where(jnp.arange(v) < vocab_size, h_pol @ w_pol, -jnp.inf))
    for later_lam in (0.3, 2.5):
        np.testing.assert_allclose(obrs.normalizer(got.vk_logp_actor, got.vk_logp_new, later_lam),
                                   obrs.topk_normalizer(logp_act_all, logp_new_all, later_lam, k), **tol)


@pytest.mark.parametrize("shape,ties", ONE_PASS)
@pytest.mark.parametrize("direction,temperature,lam", [("forward", 1.0, 1.0), ("reverse", 0.7, 0.6)])
def test_jackpot_stats_take_p_inf_topk_from_the_rollout(rng, shape, ties, direction, temperature, lam):
    """Chunked fused_jackpot_stats given p_inf's top-K (K > k where the vocabulary allows; ids and
    log-probs of the materialized actor, best first, as a rollout stores them): V_k and Z_approx
    equal obrs.topk_normalizer on the materialized log-softmaxes (at lam and at lams applied
    later) and the reference given the same top-k; the differentiable outputs and the gradients
    equal those of the one pass that merges the actor's top-k itself."""
    n, d, v, vocab_size, k, block_v = shape
    h_pol, w_pol, h_act, w_act, targets = _one_pass_problem(rng, shape, ties)
    logp_act_all = jax.nn.log_softmax(jnp.where(jnp.arange(v) < vocab_size, h_act @ w_act / temperature, -jnp.inf))
    logp_new_all = jax.nn.log_softmax(jnp.where(jnp.arange(v) < vocab_size, h_pol @ w_pol, -jnp.inf))
    inf_logp, inf_ids = jax.lax.top_k(logp_act_all, min(k + 3, vocab_size))
    differentiable = ("logp_new", "lse_new", "logp_actor", "lse_actor", "distill_kl")
    cot = {name: jnp.asarray(rng.normal(size=n)) for name in differentiable}

    def run(impl, inf_topk):
        def f(h_pol, w_pol, h_act, w_act):
            stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, direction=direction,
                                           temperature_actor=temperature, vocab_size=vocab_size, impl=impl,
                                           block_v=block_v, inf_topk=inf_topk)
            return sum(jnp.sum(c * getattr(stats, name)) for name, c in cot.items()), stats
        return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(h_pol, w_pol, h_act, w_act)

    got_grads, got = run("chunked", (inf_ids, inf_logp))
    ref_grads, ref = run("reference", (inf_ids, inf_logp))
    own_grads, own = run("chunked", None)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got.z_topk, obrs.topk_normalizer(logp_act_all, logp_new_all, lam, k), **tol)
    for later_lam in (0.3, 2.5):
        np.testing.assert_allclose(obrs.normalizer(got.vk_logp_actor, got.vk_logp_new, later_lam),
                                   obrs.topk_normalizer(logp_act_all, logp_new_all, later_lam, k), **tol)
    np.testing.assert_allclose(ref.z_topk, got.z_topk, **tol)
    np.testing.assert_array_equal(got.topk_ids_actor, inf_ids[:, :k])
    np.testing.assert_array_equal(got.topk_logp_actor, inf_logp[:, :k])
    if ties:  # integer data: the policy's top-k ids are those of the reference, so V_k is laid out alike
        np.testing.assert_allclose(got.vk_logp_actor, ref.vk_logp_actor, **tol)
        np.testing.assert_allclose(got.vk_logp_new, ref.vk_logp_new, **tol)
    assert_topk_equal(got.topk_logp_new, got.topk_ids_new, own.topk_logp_new, own.topk_ids_new, rtol=1e-6)
    for field in differentiable:
        np.testing.assert_allclose(getattr(got, field), getattr(own, field), rtol=1e-6, atol=1e-6, err_msg=field)
    for a, b, c in zip(got_grads, own_grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kernel,platform,custom_call", [
    (pallas_tpu, "tpu", "tpu_custom_call"), (pallas_gpu, "cuda", "xla.gpu.triton")])
def test_pallas_normalizers_lower_for_their_targets_at_a_realistic_shape(kernel, platform, custom_call):
    """Qwen3-1.7B-like actor (D=2048) and Qwen3-8B-like policy (D=4096), V=151,936, k=20."""
    n, v = 8192, 151936
    s = jax.ShapeDtypeStruct
    fn = jax.jit(lambda hi, wi, li, ht, wt, lt, lam: kernel.obrs_normalizer(hi, wi, li, ht, wt, lt, lam, 20,
                                                                             temperature_inf=0.8))
    lowered = fn.trace(s((n, 2048), jnp.bfloat16), s((2048, v), jnp.bfloat16), s((n,), jnp.float32),
                       s((n, 4096), jnp.bfloat16), s((4096, v), jnp.bfloat16), s((n,), jnp.float32),
                       s((), jnp.float32)).lower(lowering_platforms=(platform,))
    assert custom_call in lowered.as_text()


@pytest.mark.parametrize("kernel,platform,custom_call", [
    (pallas_tpu, "tpu", "tpu_custom_call"), (pallas_gpu, "cuda", "xla.gpu.triton")])
def test_pallas_kernels_lower_for_their_targets_at_a_realistic_shape(kernel, platform, custom_call):
    """Pallas -> Mosaic TPU / Triton lowering from this CPU host (an op a backend cannot lower fails
    here); compiling and running needs the device. Qwen3-8B-like head: D=4096, V=151,936, k=20."""
    n, d, v = 8192, 4096, 151936
    s = jax.ShapeDtypeStruct
    fn = jax.jit(lambda h, w, t: kernel.token_stats_forward(h, w, t, 20, temperature=0.8))
    lowered = fn.trace(s((n, d), jnp.bfloat16), s((d, v), jnp.bfloat16), s((n,), jnp.int32)).lower(
        lowering_platforms=(platform,))
    assert custom_call in lowered.as_text()


def test_pallas_tpu_kernel_rejects_k_above_its_lanes(rng):
    h, w = head(rng, 4, 8, 300)
    with pytest.raises(ValueError, match="k=129 is not allowed for the Pallas TPU kernel"):
        pk.fused_token_stats(h, w, jnp.zeros(4, jnp.int32), 129, impl="pallas")  # TPU kernel on CPU


@pytest.mark.parametrize("impl", TOKEN_STATS)
def test_topk_ties_keep_the_lower_column_first(rng, impl):
    """Small integer h and w give exactly tied logits (no rounding in the matmul); like
    lax.top_k, every implementation lists tied tokens by increasing id, across blocks too."""
    h = jnp.asarray(rng.integers(-2, 3, size=(9, 8)), jnp.float32)
    w = jnp.asarray(rng.integers(-3, 4, size=(8, 300)), jnp.float32)
    targets = jnp.zeros(9, jnp.int32)
    got = token_stats(impl, h, w, targets, 20, block_v=128)
    want = pk.fused_token_stats(h, w, targets, 20, impl="reference")
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[3], want[3])
    values, ids = np.asarray(got[2]), np.asarray(got[3])
    tied = values[:, 1:] == values[:, :-1]
    assert tied.sum() > 50 and np.all(np.diff(ids, axis=1)[tied] > 0)


@pytest.mark.parametrize("kernel,platform,custom_call", [
    (pallas_tpu, "tpu", "tpu_custom_call"), (pallas_gpu, "cuda", "xla.gpu.triton")])
def test_pallas_two_model_pass_lowers_for_its_target_at_a_realistic_shape(kernel, platform, custom_call):
    """Policy D=4096 and actor D=2048 at temperature 0.8, V=151,936, with targets."""
    n, v = 8192, 151936
    s = jax.ShapeDtypeStruct
    fn = jax.jit(lambda hp, wp, ha, wa, t: kernel.two_model_pass(hp, wp, 1.0, ha, wa, 1.25, v, None, t))
    lowered = fn.trace(s((n, 4096), jnp.bfloat16), s((4096, v), jnp.bfloat16), s((n, 2048), jnp.bfloat16),
                       s((2048, v), jnp.bfloat16), s((n,), jnp.int32)).lower(lowering_platforms=(platform,))
    assert custom_call in lowered.as_text()


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_update_step_with_fused_stats_and_normalizer_matches_the_materialized_loss(rng, impl):
    """An update step's use: fused_jackpot_stats without normalizers, then fused_obrs_normalizer (Z),
    then the batch-level OBRS filter and eq. 5, jitted. Loss and policy gradient equal those of the
    materialized log-softmax, with the same draws."""
    n, d, v, k, lam = 24, 8, 200, 6, 0.8
    h_pol, w_pol = head(rng, n, d + 4, v)
    h_act, w_act = head(rng, n, d, v)
    targets = jnp.asarray(rng.integers(0, v, n))
    valid = jnp.arange(n) < n - 3
    advantages = jnp.asarray(rng.normal(size=n), jnp.float32)
    logp_inf = pk.fused_token_stats(h_act, w_act, targets, 1, temperature=0.9, impl="reference")[0]
    logp_old = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl="reference")[0] + 0.05
    u = jax.random.uniform(jax.random.key(5), (n,))
    kw = dict(lam=lam, c1=5.0, c2=2.0)

    @jax.jit
    def fused_loss(h_pol, w_pol):
        stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, temperature_actor=0.9,
                                       normalizers=False, impl=impl, block_v=64)
        assert stats.z_topk is None and stats.topk_ids_new is None
        z_topk, _ = pk.fused_obrs_normalizer(h_act, w_act, stats.lse_actor, h_pol, w_pol, stats.lse_new, lam, k,
                                             temperature_inf=0.9, impl=impl, block_v=64)
        return filtered_loss(stats.logp_new, z_topk)

    def filtered_loss(logp_new, z_approx):
        f = obrs.obrs_filter(u, logp_inf, logp_old, logp_new, z_approx, valid, **kw)
        ppo, _ = losses.ppo_token_loss(logp_new, logp_old, advantages)
        return losses.masked_mean(f.rho * ppo, f.accepted)

    def materialized_loss(h_pol, w_pol):
        logp_new_all = jax.nn.log_softmax(h_pol @ w_pol)
        logp_inf_all = jax.nn.log_softmax(h_act @ w_act / 0.9)
        logp_new = jnp.take_along_axis(logp_new_all, targets[:, None], axis=-1)[:, 0]
        z_approx = obrs.topk_normalizer(logp_inf_all, jax.lax.stop_gradient(logp_new_all), lam, k)
        return filtered_loss(logp_new, z_approx)

    got, got_grads = jax.value_and_grad(fused_loss, argnums=(0, 1))(h_pol, w_pol)
    want, want_grads = jax.value_and_grad(materialized_loss, argnums=(0, 1))(h_pol, w_pol)
    assert abs(float(want)) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("exact", [False, True])
def test_chunked_ops_under_64_bit_mode_match_the_reference(rng, exact):
    """With ``jax_enable_x64`` on (as in the float64 tests), column ids default to int64 while the
    kernels' top-k ids are int32, and lam may be a float64 array: the chunked token stats, both
    normalizers and the step statistics (with their gradients) still run and match the reference,
    and return int32 ids."""
    n, d, v, vocab_size, k, block_v = SHAPES[1]
    with jax.enable_x64(True):
        h_pol, w_pol = head(rng, n, d + 4, v)
        h_act, w_act = head(rng, n, d, v)
        targets = jnp.asarray(rng.integers(0, vocab_size, n), jnp.int32)
        opts = dict(vocab_size=vocab_size)
        got = pk.fused_token_stats(h_act, w_act, targets, k, temperature=0.8, impl="chunked", block_v=block_v, **opts)
        want = pk.fused_token_stats(h_act, w_act, targets, k, temperature=0.8, impl="reference", **opts)
        for a, b in zip(got[:2], want[:2]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert_topk_equal(got[2], got[3], want[2], want[3], rtol=1e-5)
        assert got[3].dtype == jnp.int32
        lse_new = pk.fused_token_stats(h_pol, w_pol, targets, 1, impl="reference", **opts)[1]
        lam = jnp.array(0.7, jnp.float64)  # a strongly typed float64, as solve_lambda returns here
        args = (h_act, w_act, want[1], h_pol, w_pol, lse_new, lam, k, exact)
        z_topk, z_exact = pk.fused_obrs_normalizer(*args, temperature_inf=0.8, impl="chunked", block_v=block_v, **opts)
        want_topk, want_exact = pk.fused_obrs_normalizer(*args, temperature_inf=0.8, impl="reference", **opts)
        np.testing.assert_allclose(z_topk, want_topk, rtol=2e-5)
        assert (z_exact is None) == (not exact)
        if exact:
            np.testing.assert_allclose(z_exact, want_exact, rtol=2e-5)
        cot = {name: jnp.asarray(rng.normal(size=n), jnp.float32)
               for name in ("logp_new", "lse_new", "logp_actor", "lse_actor", "distill_kl")}

        def run(impl):
            def f(h_pol, w_pol, h_act, w_act):
                stats = pk.fused_jackpot_stats(h_pol, w_pol, h_act, w_act, targets, k, lam, temperature_actor=0.8,
                                               exact=exact, impl=impl, block_v=block_v, **opts)
                return sum(jnp.sum(c * getattr(stats, name)) for name, c in cot.items()), stats
            return jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(h_pol, w_pol, h_act, w_act)

        got_grads, got_stats = run("chunked")
        want_grads, want_stats = run("reference")
    for field in ("logp_new", "lse_new", "logp_actor", "lse_actor", "z_topk", "z_exact", "distill_kl"):
        if getattr(want_stats, field) is not None:
            np.testing.assert_allclose(getattr(got_stats, field), getattr(want_stats, field), rtol=2e-5, atol=2e-5,
                                       err_msg=field)
    assert got_stats.topk_ids_new.dtype == got_stats.topk_ids_actor.dtype == jnp.int32
    for name, a, b in zip(("h_policy", "w_policy", "h_actor", "w_actor"), got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
