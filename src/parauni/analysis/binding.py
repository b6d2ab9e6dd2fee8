"""Where colour-shape binding is kept and where it is lost, from the VLM's layers to the condition.

"a red circle and a blue square" and its swap "a blue circle and a red square" name the same colours and
shapes; only the binding differs. For a set of such pairs, each quantity x is compared as

    binding ratio = mean ||x(prompt) - x(swap)||^2 / mean ||x(prompt) - x(other prompt)||^2

(0: the swap is invisible; about 1: a swap changes x as much as a different prompt of the same template).
It is taken for the query states of every VLM layer (what the LIM reads), the LIM's per-layer outputs, the
condition, and, when given, the teacher text encoder's states that the DiT was pretrained to read. A model
whose query states keep the binding but whose condition does not loses it in the LIM.

A SANA DiT reads its condition as a set of tokens (its cross-attention has no positions), so for the condition
and the teacher the ratio is also taken set-wise (:func:`set_binding_ratio`): each distance is that of the
best one-to-one matching of the two token sets. Position by position, a teacher's swap counts the colour words
changing places; as a set, only what the shape tokens took from their colour is left.
"""

from __future__ import annotations

import torch

from ..diffusion.flow import assign_teacher_tokens
from ..models.parauni import ParaUni


def _others(n: int, seed: int) -> torch.Tensor:
    """(n,) for each of n prompts another one of the set: all shifted by one seeded offset in 1 .. n - 1."""
    shift = 1 + torch.randperm(n - 1, generator=torch.Generator().manual_seed(seed))[0]
    return (torch.arange(n) + shift) % n


def binding_ratio(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """x, y: (N, ...) the quantity for N prompts and for their swaps. Returns the binding ratio (see above)."""
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(
            f"need two equal shapes of at least 2 prompts, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.flatten(1).float(), y.flatten(1).float()
    other = _others(x.shape[0], seed)
    swap = (x - y).pow(2).sum(1).mean()
    return float(swap / (x - x[other]).pow(2).sum(1).mean().clamp_min(1e-12))


def set_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance between two token sets, (N, T, C) each, after the best one-to-one matching of each
    example's tokens (:func:`parauni.diffusion.flow.assign_teacher_tokens`). Returns (N,)."""
    aligned, _ = assign_teacher_tokens(a, b, torch.ones(b.shape[:2], device=b.device))
    return (a.float() - aligned.float()).pow(2).sum((1, 2))


def set_binding_ratio(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> float:
    """:func:`binding_ratio` with token sets: x, y (N, T, C), distances from :func:`set_distance` (the order of
    the T tokens carries nothing)."""
    if x.dim() != 3 or x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(
            f"need two equal (N >= 2, T, C) token sets, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    other = _others(x.shape[0], seed)
    return float(set_distance(x, y).mean() / set_distance(x, x[other]).mean().clamp_min(1e-12))


@torch.no_grad()
def binding_profile(
    model: ParaUni, prompts: list[str], swapped: list[str], teacher=None
) -> dict[str, list[float] | float]:
    """Binding ratios of ``prompts`` against ``swapped`` (the same prompts with the bindings exchanged).

    Returns {"query_states": [per VLM layer], "lim_layers": [per selected layer], "condition": float,
    "condition_set": float (set-wise)} and "teacher", "teacher_set" when ``teacher(captions) -> (states (B, S,
    C), mask)`` is given.
    """
    qa = model.query_states(model.encode_prompts(prompts))  # (N, L, Q, D)
    qb = model.query_states(model.encode_prompts(swapped))
    pa, pb = model.lim.per_layer(qa), model.lim.per_layer(qb)  # (N, L_sel, Q, C)
    out: dict[str, list[float] | float] = {
        "query_states": [binding_ratio(qa[:, i], qb[:, i]) for i in range(qa.shape[1])],
        "lim_layers": [binding_ratio(pa[:, i], pb[:, i]) for i in range(pa.shape[1])],
    }
    ca, cb = model.lim.aggregate(pa), model.lim.aggregate(pb)  # (N, Q, C)
    out["condition"], out["condition_set"] = binding_ratio(ca, cb), set_binding_ratio(ca, cb)
    if teacher is not None:
        ta, tb = teacher(prompts)[0], teacher(swapped)[0]
        out["teacher"], out["teacher_set"] = binding_ratio(ta, tb), set_binding_ratio(ta, tb)
    return out
