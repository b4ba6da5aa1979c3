"""The OBRS simulation: the paper's Figure 2 on synthetic LLM-like distributions.

For a range of actor-policy mismatch levels it builds pairs (p_inf, p_target) over the vocabulary,
applies OBRS at fixed lam and at solved acceptance budgets, and measures the acceptance rate Z and
KL(p_target || .) before (p_inf) and after (the accepted distribution p'_inf, eq. 4). Writes
``results.json``, ``obrs_simulation.md`` (a table) and ``obrs_simulation.png`` into ``--out``.

    python -m jackpot_jax.experiments.obrs_simulation --out runs/obrs_simulation \
        [--config configs/obrs_simulation.py] [--config.vocab_size=4096]
"""
from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jackpot_jax import obrs
from jackpot_jax.config import ConfigError, validate
from jackpot_jax.losses import kl_divergence

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "obrs_simulation.py"


def _positive(v):
    return v > 0


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


FAMILIES = ("noise", "sharpen")

RULES = {
    "seed": (_is_int, "an integer"),
    "vocab_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "num_positions": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "zipf_exponent": (_positive, "> 0"),
    "inv_temperature_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "a pair 0 < low <= high"),
    "logit_jitter": (lambda v: v >= 0, ">= 0"),
    "families": (lambda v: len(v) >= 1 and set(v) <= set(FAMILIES), f"a non-empty subset of {FAMILIES}"),
    "noise_strengths": (lambda v: len(v) >= 1 and all(s > 0 for s in v), "a non-empty list of scales > 0"),
    "sharpen_strengths": (lambda v: len(v) >= 1 and all(s > 0 for s in v),
                          "a non-empty list of inverse temperatures > 0"),
    "sharpen_noise": (lambda v: v >= 0, ">= 0"),
    "lams": (lambda v: all(x > 0 for x in v), "a list of lam > 0"),
    "budgets": (lambda v: all(0 < b <= 1 for b in v), "a list of acceptance budgets in (0, 1]"),
    "per_position_budgets": (lambda v: all(0 < b <= 1 for b in v), "a list of acceptance budgets in (0, 1]"),
    "ratio_panel_family": (lambda v: v in FAMILIES, f"one of {FAMILIES}"),
    "ratio_panel_level": (_is_int, "an integer index into that family's strengths"),
    "ratio_panel_lam": (_positive, "> 0"),
}


def make_pair(key, config, family, strength):
    """Actor and target log-distributions ``[num_positions, vocab_size]`` for one mismatch level."""
    n, v = config.num_positions, config.vocab_size
    k_rank, k_temp, k_jitter, k_noise = jax.random.split(key, 4)
    ranks = jnp.argsort(jax.random.uniform(k_rank, (n, v)), axis=-1) + 1
    low, high = config.inv_temperature_range
    beta = jnp.exp(jax.random.uniform(k_temp, (n, 1), minval=math.log(low), maxval=math.log(high)))
    logits = -config.zipf_exponent * beta * jnp.log(ranks.astype(jnp.float32))
    logits = logits + config.logit_jitter * jax.random.normal(k_jitter, (n, v))
    noise = jax.random.normal(k_noise, (n, v))
    if family == "noise":
        target_logits = logits + strength * noise
    else:
        target_logits = strength * logits + config.sharpen_noise * noise
    # Measured in float64 (see simulate) so that KL values near 0 are not rounding noise.
    as_f64 = lambda x: jax.nn.log_softmax(x.astype(jnp.float64))
    return as_f64(logits), as_f64(target_logits)


@jax.jit
def _after_obrs(logp_inf, logp_target, lam):
    """Mean acceptance Z and mean KL(p_target || p'_inf) at one lam."""
    z = obrs.normalizer(logp_inf, logp_target, lam)
    kl = kl_divergence(logp_target, obrs.accepted_log_distribution(logp_inf, logp_target, lam))
    return jnp.mean(z), jnp.mean(kl)


@jax.jit
def _before(logp_inf, logp_target):
    """Mean KL(p_target || p_inf) and the mean acceptance of classic rejection sampling,
    lam = max_x p_target / p_inf (exact, so KL after is 0, but acceptance 1 / lam)."""
    kl = kl_divergence(logp_target, logp_inf)
    classic = jnp.exp(-jnp.max(logp_target - logp_inf, axis=-1))
    return jnp.mean(kl), jnp.mean(classic)


_solve_budget = functools.partial(obrs.solve_lambda, full_vocab=True)
# Verine et al.'s form: one lam per position (state), each meeting the budget exactly.
_solve_budget_per_position = jax.jit(jax.vmap(lambda li, lt, b: _solve_budget(li, lt, b)[None], (0, 0, None)))


def _settings(config):
    return ([("lam", float(x)) for x in config.lams] + [("budget", float(b)) for b in config.budgets]
            + [("budget_per_position", float(b)) for b in config.per_position_budgets])


def _label(kind, value):
    return {"lam": "lam={:g}", "budget": "budget={:g}", "budget_per_position": "per-position budget={:g}"}[
        kind].format(value)


def _lam(setting, logp_inf, logp_target):
    """lam for a setting: a scalar, or ``[N, 1]`` (one per position) for per-position budgets."""
    kind, value = setting
    if kind == "lam":
        return value
    solve = _solve_budget if kind == "budget" else _solve_budget_per_position
    return solve(logp_inf, logp_target, value)


def _levels(config):
    """(family, strength, key) for every level; the keys depend only on the seed and position."""
    key = jax.random.PRNGKey(config.seed)
    out = []
    for family in config.families:
        strengths = config[f"{family}_strengths"]
        keys = jax.random.split(jax.random.fold_in(key, FAMILIES.index(family)), len(strengths))
        out += [(family, float(s), k) for s, k in zip(strengths, keys)]
    return out


def simulate(config):
    """Run every level and setting, in float64; returns a JSON-able dict of results."""
    validate(config, RULES)
    with jax.enable_x64(True):
        return _simulate(config)


def _simulate(config):
    panel_strengths = config[f"{config.ratio_panel_family}_strengths"]
    if config.ratio_panel_family not in config.families or not (
            -len(panel_strengths) <= config.ratio_panel_level < len(panel_strengths)):
        raise ConfigError(f"config.ratio_panel_family={config.ratio_panel_family!r} with "
                         f"config.ratio_panel_level={config.ratio_panel_level} names no simulated level.")
    levels, panel = [], None
    panel_strength = float(panel_strengths[config.ratio_panel_level])
    for family, strength, key in _levels(config):
        logp_inf, logp_target = make_pair(key, config, family, strength)
        kl_before, classic_accept = _before(logp_inf, logp_target)
        level = {"family": family, "strength": strength, "kl_before": float(kl_before),
                 "classic_rs_accept": float(classic_accept), "settings": {}}
        for setting in _settings(config):
            lam = _lam(setting, logp_inf, logp_target)
            accept, kl_after = _after_obrs(logp_inf, logp_target, lam)
            level["settings"][_label(*setting)] = {
                "lam": float(jnp.mean(lam)), "accept": float(accept), "kl_after": float(kl_after)}
        levels.append(level)
        if (family, strength) == (config.ratio_panel_family, panel_strength):
            panel = _ratio_histograms(logp_inf, logp_target, float(config.ratio_panel_lam))
            panel.update(family=family, strength=strength)
    return {"config": config.to_dict(), "levels": levels, "ratio_panel": panel}


def _ratio_histograms(logp_inf, logp_target, lam):
    """Distribution of log10 p_target/p_inf under x ~ p_inf, and of log10 p_target/p'_inf under
    x ~ p'_inf, at one level and lam: exact histograms weighted by the sampling probabilities."""
    logp_acc = obrs.accepted_log_distribution(logp_inf, logp_target, lam)
    edges = np.linspace(-6, 3, 91)
    out = {"setting": _label("lam", lam), "edges": edges.tolist()}
    for name, logq in (("before", logp_inf), ("after", logp_acc)):
        log10_ratio = np.asarray((logp_target - logq) / np.log(10)).ravel()
        weights = np.asarray(jnp.exp(logq)).ravel() / logq.shape[0]
        hist, _ = np.histogram(np.clip(log10_ratio, edges[0], edges[-1]), edges, weights=weights)
        out[name] = hist.tolist()
    return out


def write_table(results, path):
    cfg = results["config"]
    names = list(results["levels"][0]["settings"])
    head = ["strength", "KL before", "classic RS accept"] + [
        f"{n}: {col}" for n in names for col in ("accept", "KL after", "KL ratio")]
    parts = [f"OBRS on synthetic LLM-like distributions: vocabulary {cfg['vocab_size']}, "
             f"{cfg['num_positions']} positions per level, seed {cfg['seed']}. KL is KL(p_target || .) "
             "averaged over positions; 'KL ratio' is KL before / KL after; 'accept' is the mean Z "
             "(the expected acceptance rate); 'budget' solves one lam per level (all positions), "
             "'per-position budget' one lam per position.\n"]
    for family in cfg["families"]:
        parts += [f"\n### Mismatch family: {family}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for level in (lv for lv in results["levels"] if lv["family"] == family):
            row = [f"{level['strength']:g}", f"{level['kl_before']:.4g}", f"{level['classic_rs_accept']:.3g}"]
            for n in names:
                s = level["settings"][n]
                ratio = level["kl_before"] / max(s["kl_after"], 1e-30)
                row += [f"{s['accept']:.3f}", f"{s['kl_after']:.4g}", f"{ratio:.3g}x"]
            parts.append("| " + " | ".join(row) + " |")
    Path(path).write_text("\n".join(parts) + "\n")


def write_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_kl, ax_ratio) = plt.subplots(1, 3, figsize=(18, 6.5))
    styles = {"noise": "o-", "sharpen": "s--"}
    names = list(results["levels"][0]["settings"])
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for family in results["config"]["families"]:
        levels = [lv for lv in results["levels"] if lv["family"] == family]
        kl_before = np.array([lv["kl_before"] for lv in levels])
        for name in names:
            accept = [lv["settings"][name]["accept"] for lv in levels]
            kl_after = [lv["settings"][name]["kl_after"] for lv in levels]
            kw = dict(color=colors[name], label=f"{family}, {name}", ms=4)
            ax_acc.plot(kl_before, accept, styles[family], **kw)
            ax_kl.plot(kl_before, kl_after, styles[family], **kw)
        ax_kl.plot([], [], styles[family], color="k", ms=3, lw=0.8, label=f"{family}, classic RS (KL 0)")
        ax_acc.plot(kl_before, [lv["classic_rs_accept"] for lv in levels], styles[family], color="k",
                    ms=3, lw=0.8)
    kl_all = np.array([lv["kl_before"] for lv in results["levels"]])
    span = np.array([kl_all.min(), kl_all.max()])
    ax_kl.plot(span, span, "k-", lw=0.8, label="no change")
    ax_kl.plot(span, span / 10, "k:", lw=0.8, label="10x lower")
    ax_acc.set(xscale="log", xlabel="initial KL(p_target || p_inf)", ylabel="acceptance rate (mean Z)",
               ylim=(0, 1.02), title="Acceptance vs initial KL")
    ax_kl.set(xscale="log", yscale="log", xlabel="KL before (p_inf)", ylabel="KL after (p'_inf)",
              title="KL(p_target || .) before vs after OBRS", ylim=(1e-7, None))
    panel = results["ratio_panel"]
    centers = 0.5 * (np.array(panel["edges"][1:]) + np.array(panel["edges"][:-1]))
    width = panel["edges"][1] - panel["edges"][0]
    ax_ratio.bar(centers, panel["before"], width, alpha=0.5, label="x ~ p_inf: p_target/p_inf")
    ax_ratio.bar(centers, panel["after"], width, alpha=0.5, label="x ~ p'_inf: p_target/p'_inf")
    ax_ratio.set(yscale="log", xlabel="log10 per-token ratio (ends clipped)", ylabel="probability",
                 title=f"Per-token ratio: {panel['family']} {panel['strength']:g}, {panel['setting']}",
                 ylim=(1e-8, 1))
    ax_ratio.legend(fontsize=8)
    for ax in (ax_acc, ax_kl, ax_ratio):
        ax.grid(alpha=0.3)
    fig.legend(*ax_kl.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config, out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = simulate(config)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out / "obrs_simulation.md")
    write_plot(results, out / "obrs_simulation.png")
    return results


def main(argv):
    from absl import flags

    del argv
    config, out = flags.FLAGS.config, flags.FLAGS.out
    try:
        run(config, out)
    except ConfigError as e:  # a bad config value: say which, without a traceback
        raise SystemExit(f"error: {e}") from None
    print(Path(out, "obrs_simulation.md").read_text())
    print(f"Wrote {os.path.join(out, 'obrs_simulation.png')} and results.json")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Simulation config file.")
    flags.DEFINE_string("out", None, "Output directory.", required=True)
    app.run(main)
