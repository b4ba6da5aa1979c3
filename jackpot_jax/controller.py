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
than ``target_kl``, and falls back, returning weight to the actor's RL term, once the two agree. Its
state (beta) is saved with every checkpoint, so a resumed run continues the same sequence.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class KLController:
    """beta from the actor-policy KL (see the module docstring); ``update`` once per step."""

    target_kl: float
    rate: float
    beta_min: float
    beta_max: float
    beta: float

    def __post_init__(self):
        for name in ("target_kl", "rate", "beta_min", "beta_max"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: it must be a finite number > 0.")
        if self.beta_min > self.beta_max:
            raise ValueError(f"beta_min={self.beta_min} > beta_max={self.beta_max} is not allowed.")
        self.beta = min(max(self.beta, self.beta_min), self.beta_max)

    @classmethod
    def from_config(cls, algorithm) -> "KLController | None":
        """The controller of ``config.algorithm`` (None with ``controller.kind = "none"``)."""
        c = algorithm.controller
        if c.kind == "none":
            return None
        return cls(target_kl=c.target_kl, rate=c.rate, beta_min=c.beta_min, beta_max=c.beta_max, beta=algorithm.beta)

    def update(self, kl: float) -> float:
        """The next beta after a step whose measured actor-policy KL is ``kl``. A non-finite
        measurement leaves beta where it is; a KL of 0 counts as far below the target."""
        if math.isnan(kl) or kl == math.inf:
            return self.beta
        error = -1.0 if kl <= 0 else min(max(math.log(kl / self.target_kl), -1.0), 1.0)
        log_beta = math.log(self.beta) + self.rate * error
        self.beta = min(max(math.exp(log_beta), self.beta_min), self.beta_max)
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = float(state["beta"])
