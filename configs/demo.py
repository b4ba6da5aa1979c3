"""The embedded default: Jackpot RL on `jackpot_arithmetic` with a tiny actor and a larger tiny
policy, on 2 CPU cores in under 10 minutes (`make demo`).

    jackpot-train [--config configs/demo.py] [--workdir DIR] [--config.algorithm.lam=0.5 ...]

Both models start from scratch with a character-level tokenizer; a short supervised warm start on
the task's worked solutions (cached in the work dir) makes rewards non-zero, then Jackpot trains the
policy on the actor's rollouts and the actor towards the policy. Every key is validated at start-up
by `jackpot_jax.train.config.validate` (which also documents it).
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # The two models: a registered model name (`jackpot_jax.models.registry`) with a preset, or a
    # Hugging Face checkpoint directory in `path` (then `preset` is ignored). `dtype` (computation)
    # and `param_dtype` (storage; keep float32 for small learning rates): "" keeps the checkpoint's.
    # `remat`: recompute each block's activations in the backward pass (long sequences).
    model = dict(model="transformer", path="", dtype="", param_dtype="", remat=False)
    config.policy = ml_collections.ConfigDict(dict(model, preset="tiny-qwen3-large"))
    # The actor's `init`: "own", its own weights (a fresh init and its own warm start, or `path`);
    # "policy", a copy of the policy once the policy is warm-started or loaded (the actor's preset must
    # give the policy's architecture; the actor has no warm start of its own). Then the actor starts
    # where the policy does and differs from it only by training or staleness
    # (algorithm.actor_sync_every): the paper's small mismatch.
    config.actor = ml_collections.ConfigDict(dict(model, preset="tiny-qwen3", init="own"))
    # The tokenizer follows the models: "auto" (the default) is the tokenizer directory in `path` when
    # set, else the tokenizer files of policy.path's checkpoint (else actor.path's), else, for models
    # trained from scratch, the built-in character-level one. "char": that one (refused with a
    # checkpoint path: a checkpoint reads its own tokenizer's ids); "hf": the directory in `path`.
    # A run records the tokenizer "auto" resolved to (kind "char" or "hf" with its path) in its
    # checkpoints. A checkpoint's own tokenizer files must equal the run's, token for token.
    config.tokenizer = ml_collections.ConfigDict(dict(kind="auto", path=""))

    config.data = ml_collections.ConfigDict(dict(
        dataset="jackpot_arithmetic", config="d1", split="train", eval_split="test",
        data_dir="",  # TFDS data directory ("": the default, $JACKPOT_TFDS_DIR or ~/.cache/jackpot_jax/tfds)
        manual_dir="",  # for gsm8k / math / deepscaler: where their files are
        reward="math",  # a reward of jackpot_jax.data.rewards' registry, or an import path
        template="plain", instruction="",  # no instruction line: shorter sequences on a CPU
        max_prompt_tokens=36, train_limit=12000, eval_limit=200))

    # Supervised warm start of both models on the train split's worked solutions, cached in `dir`
    # ("": WORKDIR/warm_start; runs that share one reuse a warm start with the same settings)
    # (steps=0: none; models loaded from `path` are not warm-started).
    # `problems` > 0: the warm start sees only the first `problems` train problems and RL only the
    # others, so that RL works on problems the models have not been fitted on (0: both see all).
    # d1 has 12,000: 11,000 are enough for the models to learn the digit procedures, not memorize.
    # `boxed`: the fraction of warm-start solutions that end with the boxed answer (the others stop
    # after the worked line; `warm_start.unbox`). The `math` reward reads only boxed answers, so the
    # warm-started models earn it on only part of their otherwise right completions: the gap between
    # the supervised data's habit and the reward that RL closes in the demo's 100 steps (1.0: none;
    # docs/training.md, "The demo").
    # `seed`: the seed of the starting models (their initial weights, the warm start's data order and
    # unboxing); -1: `config.seed`. Runs with several seeds and one `warm_start.seed` start from the
    # same models and differ only in RL's randomness, as runs from one pretrained checkpoint do.
    config.warm_start = ml_collections.ConfigDict(dict(policy_steps=800, actor_steps=1000, batch_size=64,
                                                       policy_lr=1e-3, actor_lr=3e-3, problems=11000,
                                                       boxed=0.5, seed=-1, dir=""))

    config.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=16, n=8,  # GRPO groups: n samples of each prompt
        max_new_tokens=30, temperature=1.0, top_p=1.0, top_k=0,
        # top-k ids and log-probs of p_inf stored with each token (0: off). Jackpot with z="topk" and
        # p_target="new" takes p_inf's part of V_k from them when logprobs_top_k >= algorithm.k
        # (Algorithm 1, phase 1) instead of ranking the actor's logits in the update, where the
        # update's actor is the one that sampled: with train_actor=False. A trained actor's updates
        # (the demo's) read p_inf from the rollout actor's copy with a pass of their own, so the
        # demo stores none.
        logprobs_top_k=0,
        max_concurrent_decodes=128,
        # the process's devices the engine spreads its slots (and KV pool) over; 0: all of them
        engine_devices=1))

    config.algorithm = ml_collections.ConfigDict(dict(
        mode="jackpot",  # on_policy | off_policy | tis | tis_distill | jackpot
        p_target="new",  # what OBRS aligns p_inf towards: "old" or "new" (section 4.3)
        lam=1.0, target_accept=0.0,  # fixed lam, or (> 0) lam solved per mini-batch for this acceptance
        z="topk", k=20,  # Z from the union of top-k sets (with kappa), or "exact"
        c1=10.0, c2=10.0,  # truncation of the OBRS weight and of p_old / p_target (Algorithm 1)
        # PPO clipping; eps_high > eps_low is DAPO's "clip-higher" (Yu et al. 2025), where the paper's
        # eq. 1 / eq. 5 clip is symmetric (eps_low = eps_high = 0.2, as in the paper presets)
        clip=True, eps_low=0.2, eps_high=0.28,
        train_batch_size=64,  # sequences per update; the rollout batch is a multiple of it (staleness)
        micro_batch_size=64,  # gradient accumulation: train_batch_size / micro_batch_size micro-batches
        ppo_epochs=1,
        aggregation="token_mean",
        train_actor=True, actor_ppo=1.0, actor_tis_cap=2.0,  # eq. 6 weight and its truncation C
        # N > 0: after every N steps the actor becomes a copy of the policy (with actor.init="policy"
        # and train_actor=False): rollouts from the policy of up to N steps ago, a stale policy
        # (0: never)
        actor_sync_every=0,
        beta=0.1, distill_direction="forward",  # eq. 7 weight and direction
        grpo_std=True,
        # beyond the paper: kind="kl" sets beta each step from the measured actor-policy KL,
        # log beta += rate * clip(log(KL / target_kl), -1, 1), within [beta_min, beta_max], from beta
        # (jackpot_jax/controller.py); "none" keeps beta fixed. lr_rate > 0 also scales the actor's
        # learning rate by s, log s -= lr_rate * the same clipped error, within [lr_scale_min, 1]
        controller=dict(kind="none", target_kl=0.1, rate=0.2, beta_min=0.01, beta_max=10.0, lr_rate=0.0,
                        lr_scale_min=0.01)))

    optimizer = dict(lr=2e-5, schedule="constant", warmup_steps=5, weight_decay=0.0, clip_norm=1.0, b1=0.9,
                     b2=0.999)
    config.optim = ml_collections.ConfigDict(dict(policy=dict(optimizer), actor=dict(optimizer)))

    # The update step's device mesh (jackpot_jax.parallel): sizes of the axes ("data", "fsdp",
    # "tensor"), one of them -1 for the devices left over; both models and their optimizer states
    # are sharded by the logical-axis rules (FSDP, tensor parallelism), the batch over data x fsdp.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    # Where the models run: "colocated" (policy, actor and rollout engine on config.mesh) or
    # "disaggregated" (the actor, its optimizer state and the rollout engine on config.actor_mesh,
    # the last data x fsdp x tensor devices; the policy on config.mesh, from the devices before them).
    config.placement = "colocated"
    config.actor_mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))

    config.train = ml_collections.ConfigDict(dict(
        # evaluation: Mean@k / Pass@k of eval_k samples per problem at eval_temperature (0: greedy);
        # the demo's, 4 samples at the rollouts' temperature, measures what RL maximizes
        steps=100, eval_every=25, eval_k=4, eval_temperature=1.0,
        save_every=20, keep=2, max_nonfinite=3, log_every=1, kernel_impl="auto", progress=True,
        # --resume compares the checkpoint's config with this one and logs every changed key; it
        # refuses a change that makes another experiment (the models, tokenizer, data, warm start,
        # seed, algorithm.mode, rollout.prompts_per_step: train.config.RESUME_REFUSED) unless
        # allow_changes=True. Logging, IO and device-layout keys (RESUME_FREE) may always change.
        allow_changes=False))
    return config
