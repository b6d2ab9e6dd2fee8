"""LDAM, the Layer-wise Dynamic Adjustment Mechanism (paper section 3.3, Algorithm 1; supplementary eqs. 1-5).

While a reward is optimised, LDAM watches two per-epoch signals: the epoch mean of that reward and the
gradient norm. When training stalls, it perturbs the per-layer LIM outputs of the layer zone tied to the
reward, ``c_i <- c_i * (1 + gamma * eps)``, ``eps ~ N(0, I)``, for the next rollout(s):

* window: the last ``window`` (W = 5) epochs of both signals;
* ``gamma = gamma0 * ((G_max - G_min) + (R_max - R_min))`` over that window (gamma0 = 0.1);
* reward gate: the reward fell in each of the last ``drop_epochs`` (5) consecutive epochs;
* grad-norm gate: the latest gradient norm exceeds mean + ``grad_sigmas`` (2) x std of the W epochs before it;
* a perturbation fires when every enabled gate fires and no cooling period is running; it is applied to the
  next ``perturb_epochs`` rollouts, and no new trigger fires for ``cooldown`` epochs (default W) after it.

The perturbation noise of every rollout sample is drawn here and stored with the trajectory, so that its
log-probability is recomputed with exactly the same condition (ratio 1 on-policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError


@dataclass
class LDAMConfig:
    """LDAM's switches and constants (defaults: the paper's)."""

    enabled: bool = field(default=True, metadata={"help": "perturb layer zones when training stalls"})
    window: int = field(default=5, metadata={"help": "epochs of reward and grad-norm history (W)"})
    gamma0: float = field(default=0.1, metadata={"help": "gamma = gamma0 x (grad-norm range + reward range)"})
    reward_gate: bool = field(default=True, metadata={"help": "require the reward-drop gate"})
    grad_gate: bool = field(default=True, metadata={"help": "require the grad-norm spike gate"})
    drop_epochs: int = field(
        default=5, metadata={"help": "consecutive reward drops that open the reward gate"}
    )
    grad_sigmas: float = field(
        default=2.0, metadata={"help": "grad-norm gate: latest > mean + grad_sigmas x std of the window"}
    )
    cooldown: int | None = field(
        default=None, metadata={"help": "epochs after a trigger with no new trigger (default: window)"}
    )
    perturb_epochs: int = field(default=1, metadata={"help": "rollouts perturbed after each trigger"})

    def __post_init__(self) -> None:
        for name in ("window", "drop_epochs", "perturb_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ldam.{name}={getattr(self, name)} must be >= 1")
        if self.window < 2:
            raise ConfigError(f"ldam.window={self.window} must be >= 2 (the grad-norm gate needs a spread)")
        if self.gamma0 < 0:
            raise ConfigError(f"ldam.gamma0={self.gamma0} must be >= 0")
        if self.cooldown is not None and self.cooldown < 0:
            raise ConfigError(f"ldam.cooldown={self.cooldown} must be >= 0")

    @property
    def cooling_epochs(self) -> int:
        return self.window if self.cooldown is None else self.cooldown


def ldam_gamma(rewards: list[float], grad_norms: list[float], gamma0: float) -> float:
    """Supplementary eqs. 1-5: ``gamma0 * ((G_max - G_min) + (R_max - R_min))`` over the given window."""
    if not rewards or not grad_norms:
        return 0.0
    return gamma0 * ((max(grad_norms) - min(grad_norms)) + (max(rewards) - min(rewards)))


def reward_gate(rewards: list[float], drop_epochs: int) -> bool:
    """True when the reward fell in each of the last ``drop_epochs`` epochs (needs drop_epochs + 1 values)."""
    if len(rewards) < drop_epochs + 1:
        return False
    tail = rewards[-(drop_epochs + 1) :]
    return all(b < a for a, b in zip(tail[:-1], tail[1:], strict=True))


def grad_norm_gate(grad_norms: list[float], window: int, sigmas: float) -> bool:
    """True when the latest grad norm exceeds mean + sigmas x std of the ``window`` epochs before it."""
    if len(grad_norms) < window + 1:
        return False
    previous = torch.tensor(grad_norms[-(window + 1) : -1], dtype=torch.float64)
    return grad_norms[-1] > float(previous.mean() + sigmas * previous.std(unbiased=False))


class LDAM:
    """The state of LDAM for one reward phase (its zone, histories, cooling and any active perturbation).

    Args:
        config: the switches and constants.
        zone: positions, within the model's *selected* layers (the LIM's layer axis), of the zone to perturb.
        num_layers: number of selected layers (the size of the LIM's layer axis).
    """

    def __init__(self, config: LDAMConfig, zone: list[int], num_layers: int) -> None:
        if config.enabled and not zone:
            raise ConfigError(
                "LDAM's zone holds none of the model's selected layers; pick another rl phase zone or "
                "set rl.ldam.enabled=false"
            )
        if any(not 0 <= i < num_layers for i in zone):
            raise ConfigError(f"LDAM zone positions {zone} fall outside the {num_layers} selected layers")
        self.config = config
        self.zone = list(zone)
        self.num_layers = num_layers
        self.rewards: list[float] = []
        self.grad_norms: list[float] = []
        self.gamma = 0.0
        self.active_left = 0
        self.cooling_left = 0
        self.triggers = 0

    # ------------------------------------------------------------------------------------------ state
    @property
    def active(self) -> bool:
        """Whether the next rollout is perturbed."""
        return self.config.enabled and self.active_left > 0 and self.gamma > 0

    def update(self, reward: float, grad_norm: float) -> dict:
        """Record one epoch (the optimised reward's mean, the epoch's gradient norm); decide on a trigger.

        Call once per epoch, after its policy update. Returns what the epoch log records: the two gates, the
        trigger, gamma, cooling and whether the next rollout is perturbed.
        """
        c = self.config
        if self.active_left > 0:
            self.active_left -= 1  # the rollout of this epoch consumed one perturbed epoch
        if self.cooling_left > 0:
            self.cooling_left -= 1
        if math.isfinite(reward):
            self.rewards.append(float(reward))
        if math.isfinite(grad_norm):
            self.grad_norms.append(float(grad_norm))
        keep = max(c.window, c.drop_epochs) + 1
        self.rewards, self.grad_norms = self.rewards[-keep:], self.grad_norms[-keep:]
        gates = {
            "reward_gate": reward_gate(self.rewards, c.drop_epochs),
            "grad_gate": grad_norm_gate(self.grad_norms, c.window, c.grad_sigmas),
        }
        enabled = [gates[name] for name in ("reward_gate", "grad_gate") if getattr(c, name)]
        fired = c.enabled and bool(enabled) and all(enabled) and self.cooling_left == 0
        gamma = ldam_gamma(self.rewards[-c.window :], self.grad_norms[-c.window :], c.gamma0)
        if fired:
            self.gamma = gamma
            self.active_left = c.perturb_epochs
            self.cooling_left = max(c.cooling_epochs, c.perturb_epochs)
            self.triggers += 1
        return {
            **gates,
            "triggered": fired,
            "gamma": self.gamma if fired or self.active_left > 0 else gamma,
            "perturb_next": self.active,
            "cooling": self.cooling_left,
            "triggers": self.triggers,
        }

    def state_dict(self) -> dict:
        return {
            "rewards": list(self.rewards),
            "grad_norms": list(self.grad_norms),
            "gamma": self.gamma,
            "active_left": self.active_left,
            "cooling_left": self.cooling_left,
            "triggers": self.triggers,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("rewards", "grad_norms", "gamma", "active_left", "cooling_left", "triggers"):
            setattr(self, key, state[key])

    # ------------------------------------------------------------------------------------------ noise
    def noise(
        self, per_layer_shape: tuple[int, ...], generators: list[torch.Generator]
    ) -> torch.Tensor | None:
        """eps for the zone of each sample: (B, len(zone), Q, C), one generator per sample; None if inactive.

        per_layer_shape: (B, L_sel, Q, C), the shape of the per-layer conditions.
        """
        if not self.active:
            return None
        b, _, q, ch = per_layer_shape
        if len(generators) != b:
            raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {b}")
        return torch.stack([torch.randn(len(self.zone), q, ch, generator=g) for g in generators])


def perturbation_scale(
    eps: torch.Tensor | None, gamma: float, zone: list[int], num_layers: int
) -> torch.Tensor | None:
    """The multiplicative factor on the per-layer conditions: ``1 + gamma * eps`` on the zone, 1 elsewhere.

    eps: (B, len(zone), Q, C) or None. Returns (B, num_layers, Q, C) or None.
    """
    if eps is None:
        return None
    b, _, q, ch = eps.shape
    scale = torch.ones(b, num_layers, q, ch, dtype=eps.dtype, device=eps.device)
    scale[:, zone] = 1 + gamma * eps
    return scale
