"""LDAM, the Layer-wise Dynamic Adjustment Mechanism (paper section 3.3, Algorithm 1; supplementary eqs. 1-5).

While a reward is optimised, LDAM watches two signals once per round (an RL epoch: one rollout and its
policy update): the epoch mean of that reward and the gradient norm. When training stalls, it perturbs the
per-layer LIM outputs of the layer zone tied to the reward, ``c_i <- c_i * (1 + gamma * eps)``,
``eps ~ N(0, I)``, for the next rollout(s). What the paper says, and how each round implements it:

* reward gate ("a reward consistently drops, r_s >= 5 consecutive rounds"): a counter ``r_s`` (the drop
  streak) grows by one in every round whose reward is below the previous round's and is reset to 0 by any
  other round; the gate is open while ``r_s >= drop_epochs`` (5);
* grad-norm gate ("the gradient norm spikes"; the paper gives no threshold): this round's gradient norm is
  above mean + ``grad_sigmas`` (2) x std of the ``window`` rounds before it;
* dual gate: a round triggers when every enabled gate is open in that round (``gate_logic="all"``, the
  paper's Algorithm 1 and its ablations (6)/(7), which each switch one gate off); ``"any"`` triggers on
  either (the summary's wording "declines or fluctuates") and is an option;
* ``gamma = gamma0 * ((G_max - G_min) + (R_max - R_min))`` over the last ``window`` (W = 5) rounds
  (gamma0 = 0.1);
* after a trigger the perturbation is applied to the next ``perturb_epochs`` rollouts, and the ``cooldown``
  rounds after the trigger round (default W) cannot trigger: exactly that many.
* what is watched (``monitor``): "reward", the paper's "monitors training signals for each reward": one LDAM per
  optimised reward of the phase, fed that reward's epoch mean, perturbing that reward's zone (``reward_zones``;
  several active at once perturb the union of their zones, :class:`Perturbation`); or "phase", one LDAM fed
  the phase's weighted reward, perturbing the phase's zone.

The perturbation noise of every rollout sample is drawn here and stored with the trajectory, so that its
log-probability is recomputed with exactly the same condition (ratio 1 on-policy).

How often the gates open depends on the run: fed i.i.d. noise, the paper's constants (5 consecutive drops and
a 2-sigma spike) fire about once per 20,000 rounds, so short runs (the shapes world's 12 epochs a phase) use
looser constants; ``benchmarks/bench_rl.py --gate-rates`` measures the rates of any setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError

GATE_LOGIC = ("all", "any")
MONITORS = ("phase", "reward")
# the zone each reward's own LDAM perturbs under ldam.monitor=reward (the paper, section 3.3 / Fig. 5)
PAPER_REWARD_ZONES = {"aesthetic": "middle", "pickscore": "middle", "clip": "deep", "geneval": "deep"}


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
    gate_logic: str = field(
        default="all",
        metadata={
            "help": "'all': trigger when every enabled gate is open in the same round (Algorithm 1); "
            "'any': when one is"
        },
    )

    monitor: str = field(
        default="reward",
        metadata={
            "help": "what LDAM watches: 'reward' (one LDAM per optimised reward, each with its own gates on its "
            "own epoch mean, perturbing its own zone from reward_zones: the paper's 'monitors training signals "
            "for each reward') or 'phase' (one LDAM on the phase's weighted reward, perturbing the phase's zone)"
        },
    )
    reward_zones: dict[str, str] = field(
        default_factory=lambda: dict(PAPER_REWARD_ZONES),
        metadata={
            "help": "reward name -> the zone its LDAM perturbs under monitor=reward (a reward not listed uses "
            "its phase's zone)"
        },
    )

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ConfigError(f"ldam.monitor={self.monitor!r}; choose one of {list(MONITORS)}")
        for name in ("window", "drop_epochs", "perturb_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ldam.{name}={getattr(self, name)} must be >= 1")
        if self.window < 2:
            raise ConfigError(f"ldam.window={self.window} must be >= 2 (the grad-norm gate needs a spread)")
        if self.gamma0 < 0:
            raise ConfigError(f"ldam.gamma0={self.gamma0} must be >= 0")
        if self.cooldown is not None and self.cooldown < 0:
            raise ConfigError(f"ldam.cooldown={self.cooldown} must be >= 0")
        if self.gate_logic not in GATE_LOGIC:
            raise ConfigError(f"ldam.gate_logic={self.gate_logic!r}; choose one of {list(GATE_LOGIC)}")

    @property
    def cooling_epochs(self) -> int:
        return self.window if self.cooldown is None else self.cooldown


def ldam_gamma(rewards: list[float], grad_norms: list[float], gamma0: float) -> float:
    """Supplementary eqs. 1-5: ``gamma0 * ((G_max - G_min) + (R_max - R_min))`` over the given window."""
    if not rewards or not grad_norms:
        return 0.0
    return gamma0 * ((max(grad_norms) - min(grad_norms)) + (max(rewards) - min(rewards)))


def drop_streak(rewards: list[float], before: int = 0) -> int:
    """The drop streak ``r_s`` after the rounds ``rewards``: how many rounds in a row, up to the last, fell below
    the round before. ``before``: the streak at ``rewards[0]`` (earlier rounds that the list does not hold)."""
    streak = before
    for a, b in zip(rewards[:-1], rewards[1:], strict=True):
        streak = streak + 1 if b < a else 0
    return streak


def reward_gate(rewards: list[float], drop_epochs: int, before: int = 0) -> bool:
    """The reward gate: True when the reward fell in each of the last ``drop_epochs`` rounds of ``rewards``
    (its drop streak, continuing ``before``, reaches ``drop_epochs``)."""
    return drop_streak(rewards, before) >= drop_epochs


def grad_norm_gate(grad_norms: list[float], window: int, sigmas: float) -> bool:
    """True when the latest grad norm exceeds mean + sigmas x std of the ``window`` epochs before it."""
    if len(grad_norms) < window + 1:
        return False
    previous = torch.tensor(grad_norms[-(window + 1) : -1], dtype=torch.float64)
    return grad_norms[-1] > float(previous.mean() + sigmas * previous.std(unbiased=False))


class LDAM:
    """The state of LDAM for one reward phase (its zone, histories, drop streak, cooling and perturbation).

    Args:
        config: the switches and constants.
        zone: positions, within the model's *selected* layers (the LIM's layer axis), of the zone to perturb.
        num_layers: number of selected layers (the size of the LIM's layer axis).
        zone_name: the zone's name for logs and plots ('middle', 'deep', ...).
    """

    def __init__(self, config: LDAMConfig, zone: list[int], num_layers: int, zone_name: str = "") -> None:
        if config.enabled and not zone:
            raise ConfigError(
                "LDAM's zone holds none of the model's selected layers; pick another rl phase zone or "
                "set rl.ldam.enabled=false"
            )
        if any(not 0 <= i < num_layers for i in zone):
            raise ConfigError(f"LDAM zone positions {zone} fall outside the {num_layers} selected layers")
        self.config = config
        self.zone = list(zone)
        self.zone_name = zone_name
        self.num_layers = num_layers
        self.rewards: list[float] = []
        self.grad_norms: list[float] = []
        self.drop_streak = 0
        self.gamma = 0.0
        self.active_left = 0
        self.cooling_left = 0
        self.triggers = 0

    # ------------------------------------------------------------------------------------------ state
    @property
    def active(self) -> bool:
        """Whether the next rollout is perturbed."""
        return self.config.enabled and self.active_left > 0 and self.gamma > 0

    def _record(self, reward: float, grad_norm: float) -> None:
        """Append this round's finite values and advance the drop streak ``r_s``."""
        if math.isfinite(reward):
            before = self.drop_streak if self.rewards else 0
            self.drop_streak = drop_streak([*self.rewards[-1:], reward], before)
            self.rewards.append(float(reward))
        if math.isfinite(grad_norm):
            self.grad_norms.append(float(grad_norm))
        keep = self.config.window + 1
        self.rewards, self.grad_norms = self.rewards[-keep:], self.grad_norms[-keep:]

    def _gates_fire(self, gates: dict[str, bool]) -> bool:
        """Whether the enabled gates open the dual gate this round (all of them, or any under 'any')."""
        c = self.config
        enabled = [gates[name] for name in ("reward_gate", "grad_gate") if getattr(c, name)]
        if not enabled:
            return False
        return all(enabled) if c.gate_logic == "all" else any(enabled)

    def update(self, reward: float, grad_norm: float) -> dict:
        """Record one round (the optimised reward's epoch mean, the epoch's gradient norm); decide on a trigger.

        Call once per epoch, after its policy update. Returns what the epoch log records: the two gates, the
        drop streak, the trigger, gamma, the zone, cooling and whether the next rollout is perturbed.
        """
        c = self.config
        if self.active_left > 0:
            self.active_left -= 1  # the rollout of this epoch consumed one perturbed epoch
        cooling = self.cooling_left > 0  # this round lies inside the cooling period of an earlier trigger
        if cooling:
            self.cooling_left -= 1
        self._record(reward, grad_norm)
        gates = {
            "reward_gate": reward_gate(self.rewards[-1:], c.drop_epochs, before=self.drop_streak),
            "grad_gate": grad_norm_gate(self.grad_norms, c.window, c.grad_sigmas),
        }
        fired = c.enabled and self._gates_fire(gates) and not cooling
        gamma = ldam_gamma(self.rewards[-c.window :], self.grad_norms[-c.window :], c.gamma0)
        if fired:
            self.gamma = gamma
            self.active_left = c.perturb_epochs
            self.cooling_left = max(c.cooling_epochs, c.perturb_epochs - 1)  # no trigger while perturbing
            self.triggers += 1
        return {
            **gates,
            "drop_streak": self.drop_streak,
            "triggered": fired,
            "zone": self.zone_name,
            "gamma": self.gamma if fired or self.active_left > 0 else gamma,
            "perturb_next": self.active,
            "cooling": self.cooling_left,
            "triggers": self.triggers,
        }

    def state_dict(self) -> dict:
        return {
            "rewards": list(self.rewards),
            "grad_norms": list(self.grad_norms),
            "drop_streak": self.drop_streak,
            "gamma": self.gamma,
            "active_left": self.active_left,
            "cooling_left": self.cooling_left,
            "triggers": self.triggers,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("rewards", "grad_norms", "gamma", "active_left", "cooling_left", "triggers"):
            setattr(self, key, state[key])
        self.drop_streak = state.get("drop_streak", drop_streak(self.rewards))

    # ------------------------------------------------------------------------------------------ noise
    def noise(
        self, per_layer_shape: tuple[int, ...], generators: list[torch.Generator]
    ) -> torch.Tensor | None:
        """eps for the zone of each sample: (B, len(zone), Q, C), one generator per sample; None if inactive.

        per_layer_shape: (B, L_sel, Q, C), the shape of the per-layer conditions.
        """
        if not self.active:
            return None
        return zone_noise(len(self.zone), per_layer_shape, generators)


def zone_noise(
    zone_size: int, per_layer_shape: tuple[int, ...], generators: list[torch.Generator]
) -> torch.Tensor:
    """(B, zone_size, Q, C) standard normal noise, sample b drawn from ``generators[b]``.

    per_layer_shape: (B, L_sel, Q, C), the shape of the per-layer conditions.
    """
    b, _, q, ch = per_layer_shape
    if len(generators) != b:
        raise ValueError(f"need one generator per sample: got {len(generators)} for a batch of {b}")
    return torch.stack([torch.randn(zone_size, q, ch, generator=g) for g in generators])


class Perturbation:
    """The perturbation of one rollout by every LDAM that is active (the LDAM interface the rollout reads:
    ``active``, ``zone``, ``gamma``, ``noise``).

    With one active LDAM it is that LDAM's (the same zone, gamma and noise draws). With several (per-reward
    monitoring, e.g. aesthetic and PickScore both in the middle zone), the zone is the union of theirs and a
    layer perturbed by several gets ``gamma = sqrt(sum of their gamma^2)``: the standard deviation of
    ``(1 + g1 e1)(1 + g2 e2) - 1`` to first order. ``gamma`` is then a (len(zone),) tensor.
    """

    def __init__(self, ldams: list[LDAM]) -> None:
        active = [x for x in ldams if x.active]
        self.active = bool(active)
        self.zone: list[int] = sorted({i for x in active for i in x.zone})
        self.gamma: float | torch.Tensor = 0.0
        if len(active) == 1:
            self.gamma = active[0].gamma
        elif active:
            var = [sum(x.gamma**2 for x in active if i in x.zone) for i in self.zone]
            self.gamma = torch.tensor(var, dtype=torch.float32).sqrt()

    @property
    def gamma_max(self) -> float:
        """The largest gamma of the zone (for logs)."""
        return float(torch.as_tensor(self.gamma).max()) if self.active else 0.0

    def noise(
        self, per_layer_shape: tuple[int, ...], generators: list[torch.Generator]
    ) -> torch.Tensor | None:
        """eps for the zone of each sample, (B, len(zone), Q, C); None if no LDAM is active."""
        if not self.active:
            return None
        return zone_noise(len(self.zone), per_layer_shape, generators)


def replay(config: LDAMConfig, rewards: list[float], grad_norms: list[float]) -> list[dict]:
    """Feed a fresh LDAM one round per (reward, grad norm) pair; returns each round's state (for logs and
    measuring how often a setting fires, e.g. on an ``rl_log.jsonl``'s ``phase_reward`` and ``grad_norm``)."""
    ldam = LDAM(config, [0], 1)
    return [ldam.update(r, g) for r, g in zip(rewards, grad_norms, strict=True)]


def perturbation_scale(
    eps: torch.Tensor | None, gamma: float | torch.Tensor, zone: list[int], num_layers: int
) -> torch.Tensor | None:
    """The multiplicative factor on the per-layer conditions: ``1 + gamma * eps`` on the zone, 1 elsewhere.

    eps: (B, len(zone), Q, C) or None; gamma: a float or a (len(zone),) tensor (one per layer of the zone).
    Returns (B, num_layers, Q, C) or None.
    """
    if eps is None:
        return None
    b, _, q, ch = eps.shape
    scale = torch.ones(b, num_layers, q, ch, dtype=eps.dtype, device=eps.device)
    g = torch.as_tensor(gamma, dtype=eps.dtype, device=eps.device).reshape(-1, 1, 1)
    scale[:, zone] = 1 + g * eps
    return scale
