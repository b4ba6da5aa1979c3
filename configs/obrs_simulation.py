"""The OBRS simulation (the paper's Figure 2), run by `make demo` until the trainer lands.

    python -m jackpot_jax.experiments.obrs_simulation --out DIR \
        [--config configs/obrs_simulation.py] [--config.vocab_size=4096 ...]
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.vocab_size = 32768
    config.num_positions = 128  # token positions (states) per mismatch level
    # Actor (p_inf) logits: a Zipf law over a random ranking of the vocabulary, -s * beta * log(rank),
    # with a per-position inverse temperature beta ~ log-uniform and Gaussian jitter. This gives
    # next-token entropies of about 1.3 nats on average (0.4 to 2.6 from the 10th to 90th percentile).
    config.zipf_exponent = 1.5
    config.inv_temperature_range = (1.0, 3.0)
    config.logit_jitter = 0.5
    # Two families of mismatch, one level per strength:
    #   noise:   target logits = actor logits + strength * N(0, 1) (symmetric disagreement);
    #   sharpen: target logits = strength * actor logits + sharpen_noise * N(0, 1), a more confident
    #            target, as a larger policy is next to a small actor that spreads mass on the tail.
    config.families = ("noise", "sharpen")
    config.noise_strengths = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    config.sharpen_strengths = (1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
    config.sharpen_noise = 0.3
    config.lams = (0.5, 1.0)  # fixed lam settings
    config.budgets = (0.95, 0.9, 0.8)  # target acceptance; one lam solved for all positions of a level
    config.per_position_budgets = (0.9,)  # one lam per position, each meeting the budget exactly
    # The per-token ratio histogram: family, index into its strengths, and lam.
    config.ratio_panel_family = "sharpen"
    config.ratio_panel_level = 6
    config.ratio_panel_lam = 1.0
    return config
