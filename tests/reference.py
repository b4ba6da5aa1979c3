"""Independent float64 references, written from the paper's equations as stated (linear
probabilities, explicit loops where the definition is a loop), not from our log-space code.

Functions taking ``xp`` run on NumPy (values) or on ``jax.numpy`` under 64-bit mode (so that
``jax.grad`` of the reference can be compared with ``jax.grad`` of ours); ``sg`` is the stop-gradient
to use (identity for NumPy).
"""
import numpy as np


def identity(x):
    return x


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    m = np.max(logits, axis=-1, keepdims=True)
    return logits - m - np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True))


def accept_prob(p_target, p_inf, lam, xp=np):
    """Eq. 3: min(1, p_target / (lam p_inf)); 1 where p_inf = 0 (never proposed)."""
    proposed = p_inf > 0
    return xp.where(proposed, xp.minimum(1.0, p_target / (lam * xp.where(proposed, p_inf, 1.0))), 1.0)


def normalizer(p_inf, p_target, lam):
    """Eq. 4: Z = sum_x min(p_inf(x), p_target(x) / lam)."""
    return np.sum(np.minimum(p_inf, p_target / lam), axis=-1)


def topk_normalizer(logp_inf, logp_target, lam, k):
    """Section 4.4.1, by its definition: a Python set union of the two top-k index sets."""
    logp_inf, logp_target = np.asarray(logp_inf, np.float64), np.asarray(logp_target, np.float64)
    flat_inf = logp_inf.reshape(-1, logp_inf.shape[-1])
    flat_target = logp_target.reshape(-1, logp_target.shape[-1])
    out = []
    for li, lt in zip(flat_inf, flat_target):
        union = set(np.argsort(-li, kind="stable")[:k]) | set(np.argsort(-lt, kind="stable")[:k])
        out.append(sum(min(np.exp(li[x]), np.exp(lt[x]) / lam) for x in union))
    return np.array(out).reshape(logp_inf.shape[:-1])


def kappa(z_approx, accepted, valid):
    """Section 4.4.2: (#accepted / #proposed) / mean Z_approx, over valid tokens only."""
    z, acc, val = (np.ravel(np.asarray(x, np.float64)) for x in (z_approx, accepted, valid))
    idx = [i for i in range(len(val)) if val[i]]
    if not idx:
        return 1.0
    abar_hat = sum(acc[i] for i in idx) / len(idx)
    return abar_hat / (sum(z[i] for i in idx) / len(idx))


def jackpot_weights(p_new, p_inf, p_old, z, lam, c1, c2, target, xp=np):
    """Algorithm 1 lines 23-24: min(Z max(lam, p_target/p_inf), c1) * min(p_old/p_target, c2)."""
    p_target = p_new if target == "new" else p_old
    w_obrs = z * xp.maximum(lam, p_target / p_inf)
    second = xp.minimum(p_old / p_target, c2) if target == "new" else 1.0
    return xp.minimum(w_obrs, c1) * second


def kl(p, q, xp=np):
    """KL(p || q) = sum_x p log(p / q), with 0 log 0 = 0."""
    pos = p > 0
    return xp.sum(xp.where(pos, p * xp.log(xp.where(pos, p, 1.0) / xp.where(pos, q, 1.0)), 0.0), axis=-1)


def grpo_advantages(rewards, group_size, normalize_std=True, eps=1e-6):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        g = rewards[start:start + group_size]
        if np.all(g == g[0]):
            continue
        centered = g - g.mean()
        out[start:start + group_size] = centered / (g.std(ddof=1) + eps) if normalize_std else centered
    return out


def ppo_token_loss(p_new, p_old, adv, eps_low, eps_high, clip, xp=np):
    """-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = p_new / p_old (eq. 5-6 inner term)."""
    r = p_new / p_old
    if not clip:
        return -r * adv
    return -xp.minimum(r * adv, xp.clip(r, 1 - eps_low, 1 + eps_high) * adv)


def masked_mean(values, mask, mode, xp=np):
    mask = mask.astype(bool)
    values = xp.where(mask, values, 0.0)
    if mode == "token_mean":
        n = mask.sum()
        return values.sum() / n if n else 0.0 * values.sum()
    rows = [values[b].sum() / mask[b].sum() for b in range(mask.shape[0]) if mask[b].sum()]
    return sum(rows) / len(rows) if rows else 0.0 * values.sum()


def obrs_filter(logp_new, logp_old, logp_inf, valid, z_approx, uniforms, *, lam, target, calibrate):
    """Algorithm 1 lines 18-22 in NumPy: the accepted mask (from given uniform draws), kappa and Z_t."""
    valid = np.asarray(valid, bool)
    p_new, p_old, p_inf = (np.exp(np.where(valid, np.asarray(x, np.float64), 0.0))
                           for x in (logp_new, logp_old, logp_inf))
    z_approx = np.where(valid, np.asarray(z_approx, np.float64), 0.0)
    a = accept_prob(p_new if target == "new" else p_old, p_inf, lam)
    accepted = (np.asarray(uniforms, np.float64) < a) & valid
    k = kappa(z_approx, accepted, valid)
    return accepted, k, (k * z_approx if calibrate else z_approx)


def policy_loss(logp_new, logp_old, logp_inf, adv, valid, accepted, z, *, lam, c1, c2, target,
                eps_low, eps_high, clip, aggregation, xp=np, sg=identity):
    """Eq. 5: mean over accepted tokens of SG(rho) * PPO, given the filter's mask and Z_t."""
    valid = np.asarray(valid, bool)
    fill = lambda x: xp.where(valid, x, 0.0)
    p_new, p_old, p_inf = xp.exp(fill(logp_new)), xp.exp(fill(logp_old)), xp.exp(fill(logp_inf))
    adv = fill(xp.broadcast_to(adv[:, None], valid.shape))
    rho = sg(jackpot_weights(p_new, p_inf, p_old, z, lam, c1, c2, target, xp=xp))
    ppo = ppo_token_loss(p_new, p_old, adv, eps_low, eps_high, clip, xp=xp)
    return masked_mean(rho * ppo, accepted, aggregation, xp=xp)


def actor_loss(logp_actor, logp_actor_old, logp_inf, adv, valid, distill, *, beta, tis_cap, eps_low,
               eps_high, clip, aggregation, xp=np, sg=identity):
    """Eq. 6 + beta * eq. 7."""
    valid = np.asarray(valid, bool)
    fill = lambda x: xp.where(valid, x, 0.0)
    p_a, p_a_old, p_inf = xp.exp(fill(logp_actor)), xp.exp(fill(logp_actor_old)), xp.exp(fill(logp_inf))
    adv = fill(xp.broadcast_to(adv[:, None], valid.shape))
    tis = sg(xp.minimum(p_a_old / p_inf, tis_cap))
    ppo = ppo_token_loss(p_a, p_a_old, adv, eps_low, eps_high, clip, xp=xp)
    return (masked_mean(tis * ppo, valid, aggregation, xp=xp)
            + beta * masked_mean(fill(distill), valid, aggregation, xp=xp))
