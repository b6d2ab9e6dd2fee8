"""DiffusionNFT's objective (Zheng et al., 2025, "Online Diffusion Reinforcement with Forward Process"), Stage
III's alternative to Flow-GRPO's policy gradient (``rl.objective=nft``; not in the paper).

Flow-GRPO trains on the reverse process: the log-probability of each stored SDE step. DiffusionNFT trains on
the forward process, by flow matching on the rollout's clean images: for a sample ``x0`` with optimality
``r`` in [0, 1] (its advantage mapped linearly, :func:`optimality`), a time ``sigma`` and fresh noise, with
``x_t = (1 - sigma) x0 + sigma noise``, the current velocity ``v`` and the rollout policy's ``v_old``::

    v+ = beta v + (1 - beta) v_old           (the implicit positive policy)
    v- = (1 + beta) v_old - beta v           (the implicit negative policy)
    loss = [r |x0(v+) - x0|^2 / w+  +  (1 - r) |x0(v-) - x0|^2 / w-] / beta,   x0(u) = x_t - sigma u

where ``w`` is the (detached) mean absolute x0-error of each side, the paper's adaptive weight. On the old
policy (``v = v_old``) a sample of ``r = 1/2`` gives no gradient; above it the policy moves toward the image,
below it away. Every term is a dense regression target, so no likelihood and no stochastic sampler is needed:
``rl.eta=0`` samples the rollouts with the deterministic ODE (Euler steps), as an evaluation samples.
"""

from __future__ import annotations

import torch


def optimality(advantages: torch.Tensor, clip: float) -> torch.Tensor:
    """(B,) ``r = 1/2 + A / (2 clip)``, the advantage clipped to +-clip mapped onto [0, 1]."""
    return (advantages.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)


def forward_noised(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) ``x_t = (1 - sigma) x0 + sigma noise``; sigma: (B,)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def nft_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The NFT loss of one batch at one time (see the module's docstring), computed in fp32.

    v (with its graph), v_old, x_t, x0: (B, C, h, w); sigma, r: (B,). Returns (loss, statistics).
    """
    dims = tuple(range(1, x0.dim()))
    s = sigma.float().view(-1, *([1] * (x0.dim() - 1)))
    v, v_old, x_t, x0 = v.float(), v_old.detach().float(), x_t.float(), x0.float()
    sides = []
    for u in (beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v):
        err = x_t - s * u - x0
        weight = err.detach().abs().mean(dim=dims).clamp_min(1e-5)
        sides.append((err**2).mean(dim=dims) / weight)
    per_sample = (r * sides[0] + (1 - r) * sides[1]) / beta
    stats = {
        "nft_loss": float(per_sample.detach().mean()),
        "old_deviation": float(((v.detach() - v_old) ** 2).mean()),
        "optimality_mean": float(r.mean()),
    }
    return per_sample.mean(), stats


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """Scalar: the mean squared difference of the velocity from the reference policy's (NFT's KL term)."""
    return ((v.float() - v_ref.detach().float()) ** 2).mean()


def training_times(steps: int, count: int, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, count) indices into the rollout's sigmas (0 .. steps - 1, the noisiest first): per sample, ``count``
    distinct times drawn from its own generator, as DiffusionNFT permutes the sampler's times per sample."""
    return torch.stack([torch.randperm(steps, generator=g)[:count] for g in generators])
