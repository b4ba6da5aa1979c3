"""A closed-loop controller of the actor's distillation strength, from the measured actor-policy KL.

This goes past the paper. Its stated limitation: training still diverges after long runs, and a
controller that adapts the distillation vs RL strength from the measured actor-policy KL is future
work (JACKPOT.md, "What the paper reports"). Eq. 8 weighs the actor's RL term (eq. 6, weight
``actor_ppo``) against its distillation towards the policy (eq. 7, weight ``beta``). A fixed beta
either lets the actor drift from a policy that keeps moving, so OBRS rejects more and its weights
grow, or holds the actor back when the two agree.

``config.algorithm.controller.kind = "kl"`` closes the loop. Each step measures
KL_s = KL(p_omega_old || p_old) over the full vocabulary on the rollout's tokens (``mismatch/kl_full``,
computed in the same pass as p_old) and sets that step's beta by a proportional step in log space:

    log beta_s = clip(log beta_{s-1} + rate * clip(log(KL_s / target_kl), -1, 1), log beta_min, log beta_max)

The step is multiplicative, like PPO's adaptive KL penalty. One batch moves beta by at most a
factor e^rate. beta_0 is ``algorithm.beta``. beta rises while the actor is further from the policy
than ``target_kl``, and falls back, returning weight to the actor's RL term, once the two agree.

A second lever, off by default (``lr_rate = 0``): the size of the actor's step. Adam's update has a
size set by its learning rate, whatever the weights of the loss's terms, so beta alone changes the
direction of an actor's step but not how far it goes: an actor whose learning rate is too high
drifts from the policy at any beta (docs/results.md, the controller study). With ``lr_rate > 0``
the same measured error also sets a factor s_s on the actor's optimizer update (its learning rate
times s_s, weight decay included):

    log s_s = clip(log s_{s-1} - lr_rate * clip(log(KL_s / target_kl), -1, 1), log lr_scale_min, 0)

from s_0 = 1. The actor slows down while it is further from the policy than ``target_kl`` and
returns to its full learning rate once the two agree; it never goes faster than its schedule.
The state (beta and s) is saved with every checkpoint, so a resumed run continues the same sequence.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class KLController:
    """beta (and the actor's learning-rate factor) from the actor-policy KL (see the module
    docstring); ``update`` once per step."""

    target_kl: float
    rate: float
    beta_min: float
    beta_max: float
    beta: float
    lr_rate: float = 0.0  # 0: the actor's learning rate is not controlled (lr_scale stays 1)
    lr_scale_min: float = 0.01
    lr_scale: float = 1.0

    def __post_init__(self):
        for name in ("target_kl", "rate", "beta_min", "beta_max", "lr_scale_min"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: it must be a finite number > 0.")
        if not (math.isfinite(self.lr_rate) and self.lr_rate >= 0):
            raise ValueError(f"lr_rate={self.lr_rate} is not allowed: it must be a finite number >= 0 (0: off).")
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min={self.beta_min} > beta_max={self.beta_max} is not allowed.")
        if self.lr_scale_min > 1:
            raise ValueError(f"lr_scale_min={self.lr_scale_min} is not allowed: it must be <= 1 (the controller "
                             "only slows the actor down).")
        self.beta = min(max(self.beta, self.beta_min), self.beta_max)
        self.lr_scale = min(max(self.lr_scale, self.lr_scale_min), 1.0)

    @classmethod
    def from_config(cls, algorithm) -> "KLController | None":
        """The controller of ``config.algorithm`` (None with ``controller.kind = "none"``)."""
        c = algorithm.controller
        if c.kind == "none":
            return None
        return cls(target_kl=c.target_kl, rate=c.rate, beta_min=c.beta_min, beta_max=c.beta_max, beta=algorithm.beta,
                   lr_rate=c.get("lr_rate", 0.0), lr_scale_min=c.get("lr_scale_min", 0.01))

    def update(self, kl: float) -> float:
        """The next beta (returned) and ``lr_scale`` after a step whose measured actor-policy KL is
        ``kl``. A non-finite measurement leaves both where they are; a KL of 0 counts as far below
        the target."""
        if math.isnan(kl) or kl == math.inf:
            return self.beta
        error = -1.0 if kl <= 0 else min(max(math.log(kl / self.target_kl), -1.0), 1.0)
        log_beta = math.log(self.beta) + self.rate * error
        self.beta = min(max(math.exp(log_beta), self.beta_min), self.beta_max)
        log_scale = math.log(self.lr_scale) - self.lr_rate * error
        self.lr_scale = min(max(math.exp(log_scale), self.lr_scale_min), 1.0)
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
        self.lr_scale = float(state.get("lr_scale", 1.0))  # checkpoints from before the second lever
