"""Does a model use its prompt? How much the query states, the condition and the velocity vary across prompts.

A model whose LIM has collapsed to one condition for every prompt still has a low training loss (the image's
background is most of it) and still draws objects, just not the requested ones. These figures show it
directly: for prompts that differ only in their content, each quantity is compared across the prompts as
its relative spread, ``||x - mean_prompts(x)|| / ||x||``: 0 means identical for every prompt.

* ``query_states``: per VLM layer, what the LIM reads (prompt information available at the query positions);
* ``condition``: the LIM's output, the DiT's cross-attention input;
* ``velocity``: the DiT's velocity for one shared noise image at ``t`` (what reaches the image);
* ``velocity_vs_uncond``: the same velocity against the unconditional prompt's (does a prompt matter at all).
"""

from __future__ import annotations

import torch

from ..models.parauni import ParaUni

DEFAULT_PROMPTS = (
    "a photo of a red circle",
    "a photo of a blue square",
    "a photo of a green triangle",
    "a photo of a white cross",
)


def relative_spread(x: torch.Tensor) -> float:
    """``||x - mean_0(x)|| / ||x||`` for x (P, ...): how much the P rows differ, relative to their size."""
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 prompts to compare, got {x.shape[0]}")
    return float((x - x.mean(0, keepdim=True)).norm() / x.norm().clamp_min(1e-12))


@torch.no_grad()
def prompt_sensitivity(
    model: ParaUni, prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS, t: float = 0.8, seed: int = 0
) -> dict:
    """Relative spreads across ``prompts`` (see the module docstring).

    Returns:
        {"query_states": [one float per VLM layer], "condition": float, "velocity": float,
         "velocity_vs_uncond": float}.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t={t} must lie in [0, 1] (1 = pure noise)")
    model.eval()
    prompts = list(prompts)
    batch = model.encode_prompts(prompts)
    states = model.query_states(batch)  # (P, L, Q, D)
    cond = model.condition(batch)  # (P, Q, C)
    uncond = model.condition(model.encode_prompts([None] * len(prompts)))
    h, w = model.config.sampling.height, model.config.sampling.width
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(model.latent_shape(h, w), generator=g).to(model.device)
    x = noise[None].expand(len(prompts), *noise.shape)
    times = torch.full((len(prompts),), t, device=model.device)
    v = model.velocity(x, times, cond).float()
    v_uncond = model.velocity(x, times, uncond).float()
    return {
        "query_states": [relative_spread(states[:, i]) for i in range(states.shape[1])],
        "condition": relative_spread(cond),
        "velocity": relative_spread(v),
        "velocity_vs_uncond": float((v - v_uncond).norm() / v_uncond.norm().clamp_min(1e-12)),
    }


def format_sensitivity(result: dict) -> str:
    """The figures of :func:`prompt_sensitivity` as text lines."""
    layers = " ".join(f"{s:.3f}" for s in result["query_states"])
    return "\n".join(
        [
            f"query states across prompts, per VLM layer: {layers}",
            f"condition across prompts: {result['condition']:.4f}",
            f"velocity across prompts (same noise): {result['velocity']:.4f}",
            f"velocity, prompt vs unconditional: {result['velocity_vs_uncond']:.4f}",
        ]
    )
