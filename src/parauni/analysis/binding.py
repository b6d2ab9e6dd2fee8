"""Where colour-shape binding is kept and where it is lost, from the VLM's layers to the condition.

"a red circle and a blue square" and its swap "a blue circle and a red square" name the same colours and
shapes; only the binding differs. For a set of such pairs, each quantity x is compared as

    binding ratio = mean ||x(prompt) - x(swap)||^2 / mean ||x(prompt) - x(other prompt)||^2

(0: the swap is invisible; about 1: a swap changes x as much as a different prompt of the same template).
It is taken for the query states of every VLM layer (what the LIM reads), the LIM's per-layer outputs, the
condition, and, when given, the teacher text encoder's states that the DiT was pretrained to read. A model
whose query states keep the binding but whose condition does not loses it in the LIM.
"""

from __future__ import annotations

import torch

from ..models.parauni import ParaUni


def binding_ratio(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """x, y: (N, ...) the quantity for N prompts and for their swaps. Returns the binding ratio (see above)."""
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(
            f"need two equal shapes of at least 2 prompts, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.flatten(1).float(), y.flatten(1).float()
    n = x.shape[0]
    other = (
        torch.arange(n) + 1 + torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[0]
    ) % n
    swap = (x - y).pow(2).sum(1).mean()
    return float(swap / (x - x[other]).pow(2).sum(1).mean().clamp_min(1e-12))


@torch.no_grad()
def binding_profile(
    model: ParaUni, prompts: list[str], swapped: list[str], teacher=None
) -> dict[str, list[float] | float]:
    """Binding ratios of ``prompts`` against ``swapped`` (the same prompts with the bindings exchanged).

    Returns {"query_states": [per VLM layer], "lim_layers": [per selected layer], "condition": float} and
    "teacher" (a float) when ``teacher(captions) -> (states (B, S, C), mask)`` is given.
    """
    qa = model.query_states(model.encode_prompts(prompts))  # (N, L, Q, D)
    qb = model.query_states(model.encode_prompts(swapped))
    pa, pb = model.lim.per_layer(qa), model.lim.per_layer(qb)  # (N, L_sel, Q, C)
    out: dict[str, list[float] | float] = {
        "query_states": [binding_ratio(qa[:, i], qb[:, i]) for i in range(qa.shape[1])],
        "lim_layers": [binding_ratio(pa[:, i], pb[:, i]) for i in range(pa.shape[1])],
        "condition": binding_ratio(model.lim.aggregate(pa), model.lim.aggregate(pb)),
    }
    if teacher is not None:
        out["teacher"] = binding_ratio(teacher(prompts)[0], teacher(swapped)[0])
    return out
