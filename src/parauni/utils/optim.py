"""The optimiser and schedule every training loop of the package builds: AdamW over decay groups, warm-up then
cosine.

Weight decay falls on matrices (and the queries), never on 1-D tensors (biases, norms, scales): the usual AdamW
split, built here once for the ParaUni model, the world's Stage-0 models and their loops.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch


def decay_groups(params: Iterable[torch.Tensor], weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """AdamW parameter groups of the parameters that require a gradient, in their order: decay on tensors of
    2 dimensions or more, none on 1-D ones; with ``decay_1d`` one group decaying all of them."""
    trained = [p for p in params if p.requires_grad]
    if decay_1d:
        return [{"params": trained, "weight_decay": weight_decay}]
    return [
        {"params": [p for p in trained if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw(groups: list[dict], lr: float, betas: Sequence[float]) -> torch.optim.AdamW:
    """AdamW over ``groups`` (see :func:`decay_groups`)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
