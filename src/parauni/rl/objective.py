"""Stage III's objective: group advantages, the clipped policy loss with its KL term (:func:`grpo_loss`), and
the policy's view of one rollout step (:class:`PolicyStep`), which recomputes the stored step's
log-probability under the current weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..diffusion.sampling import sde_noise_scale, sde_step
from ..models.parauni import ParaUni
from .config import RLConfig
from .rollout import PromptConditions, cfg_velocity, policy_condition, rollout_sigmas


# --------------------------------------------------------------------------------------------- objective
def prompt_standard_error(rewards: torch.Tensor, group_size: int) -> float:
    """The standard error of an epoch's mean reward with its prompts as the units: ``rewards`` (P * group_size,),
    prompt-major as gathered, -> std of the P prompt means / sqrt(P) (NaN for one prompt). A group's images share
    their prompt, so their rewards are not independent draws and ``std / sqrt(samples)`` would understate it."""
    means = rewards.reshape(-1, group_size).mean(1)
    return float(means.std() / len(means) ** 0.5) if len(means) > 1 else float("nan")


def group_advantages(
    rewards: torch.Tensor, groups: torch.Tensor, std: str = "global", clip: float = 5.0
) -> torch.Tensor:
    """Per-prompt advantages: ``(r - mean_group(r)) / (std + 1e-4)``, clipped to +-clip.

    rewards, groups: (N,). ``std`` 'global' uses the standard deviation of the whole batch, 'group' each
    group's own. Returns (N,) float32; each group's advantages have zero mean (before clipping).
    """
    r = rewards.double()
    out = torch.empty_like(r)
    global_std = r.std(unbiased=False)
    for g in groups.unique():
        m = groups == g
        spread = r[m].std(unbiased=False) if std == "group" else global_std
        out[m] = (r[m] - r[m].mean()) / (spread + 1e-4)
    return out.clamp(-clip, clip).float()


def prompt_groups(prompts: list[str]) -> torch.Tensor:
    """(N,) group ids: samples with the same prompt text share one (numbered by first appearance).

    Flow-GRPO's per-prompt statistics group this way, so a prompt drawn twice in an epoch is one group.
    """
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.long)


def update_samples(
    advantages: torch.Tensor, n_local: int, rank: int, drop_zero: bool, generator: torch.Generator
) -> list[int]:
    """This process's samples (local indices, sorted) the policy update trains on.

    advantages: (N,) of every process, process p holding samples ``[p n_local, (p + 1) n_local)``. With
    ``drop_zero``, samples of advantage 0 are left out (Flow-GRPO's filter); every process then trains on the
    largest kept count of any process, topping its own up with randomly chosen zero-advantage samples (as
    Flow-GRPO tops up to a multiple of its batch count), so that all processes run the same number of
    backward passes. An empty list means no process has a sample with a non-zero advantage.
    """
    if not drop_zero:
        return list(range(n_local))
    nonzero = (advantages != 0).view(-1, n_local)  # (processes, n_local); NaN counts as non-zero
    target = int(nonzero.sum(dim=1).max())
    mine = nonzero[rank]
    kept = torch.nonzero(mine).flatten()
    zeros = torch.nonzero(~mine).flatten()
    fill = zeros[torch.randperm(len(zeros), generator=generator)][: target - len(kept)]
    return sorted(torch.cat([kept, fill]).tolist())


def kl_std(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float, sigma_max: float, mode: str = "flow_grpo"
) -> torch.Tensor:
    """The std the KL term divides by, ``kl = mean((mean - ref_mean)^2) / (2 std^2)`` (scalar fp32 tensor).

    'flow_grpo': Flow-GRPO's ``std_dev_t = eta sqrt(sigma / (1 - sigma))`` (sigma_max in place of sigma = 1);
    'step': that times ``sqrt(sigma - sigma_next)``, the step's own std (the exact KL of the two Gaussians).
    """
    s = sde_noise_scale(sigma, eta, sigma_max)
    if mode == "flow_grpo":
        return s
    if mode == "step":
        return s * torch.sqrt(torch.as_tensor(sigma, dtype=torch.float32) - sigma_next)
    raise ValueError(f"unknown kl_std {mode!r}; choose 'flow_grpo' or 'step'")


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO's clipped objective for one step of a batch, plus beta x KL to the reference policy.

    log_prob, old_log_prob, advantages: (B,). mean, ref_mean: (B, C, h, w) step means under the policy and
    the reference; std: the scalar the squared difference is scaled by, ``kl = mean((mean - ref)^2) /
    (2 std^2)`` (see :func:`kl_std`: Flow-GRPO's ``std_dev_t`` by default). Returns (loss, statistics).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    loss = policy
    kl = torch.zeros((), device=log_prob.device)
    if beta > 0 and mean is not None and ref_mean is not None:
        kl = (((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * std**2)).mean()
        loss = loss + beta * kl
    stats = {
        "policy_loss": float(policy.detach()),
        "kl": float(kl.detach()),
        "clipfrac": float(((ratio.detach() - 1).abs() > clip_range).float().mean()),
        "approx_kl": float(0.5 * ((log_prob.detach() - old_log_prob) ** 2).mean()),
        "ratio_mean": float(ratio.detach().mean()),
        "ratio_min": float(ratio.detach().min()),
        "ratio_max": float(ratio.detach().max()),
    }
    return loss, stats


class PolicyStep(nn.Module):
    """The policy's view of one rollout step (the loop runs it as a forward of the prepared ``ModelCalls``).

    forward(src, uncond, x, prev, sigma, sigma_next, eps, gamma) -> (log_prob, mean, std) of the stored next
    latent ``prev`` under the current weights, with CFG (unconditional branch detached); ``src`` is the
    samples' :class:`PromptConditions` and ``std`` the KL term's scale (:func:`kl_std`, ``rl.kl_std``).
    """

    def __init__(self, model: ParaUni, config: RLConfig, zone: list[int]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.zone = zone
        # the SDE's noise scale is set at the first step below pure noise, as the rollouts have it
        self.sigma_max = float(rollout_sigmas(config)[1])

    def velocity(self, src: PromptConditions, uncond, x, sigma, eps, gamma: float) -> torch.Tensor:
        """(B, C, h, w) the guided velocity at ``x`` (B, C, h, w) and ``sigma`` (scalar or (B,)), with CFG
        (unconditional branch detached) and LDAM's perturbation ``eps``/``gamma`` on the zone."""
        cond = policy_condition(self.model, src, eps, gamma, self.zone)
        t = sigma.expand(x.shape[0])
        return cfg_velocity(self.model, x, t, cond, uncond.expand_as(cond), self.config.cfg)

    def forward(self, src: PromptConditions, uncond, x, prev, sigma, sigma_next, eps, gamma: float):
        c = self.config
        v = self.velocity(src, uncond, x, sigma, eps, gamma)
        out = sde_step(x, v, sigma, sigma_next, eta=c.eta, sigma_max=self.sigma_max, prev_sample=prev)
        std = out.std if c.kl_std == "step" else kl_std(sigma, sigma_next, c.eta, self.sigma_max, c.kl_std)
        return out.log_prob, out.mean, std


@contextlib.contextmanager
def swapped(params: list[nn.Parameter], values: list[torch.Tensor]):
    """Temporarily give ``params`` other values (the reference policy); no autograd graph may span it.

    The values are copied in place (and back): FSDP gathers a parameter from its own storage.
    """
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)
