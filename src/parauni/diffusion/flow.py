"""Rectified-flow conventions, as pure functions (docs/how-it-works.md, "Conventions").

One convention everywhere: ``t`` (= sigma) in [0, 1], ``t = 1`` is pure noise,

    x_t = (1 - t) * x0 + t * eps,        the network predicts  v = eps - x0,

loss = MSE(v_pred, eps - x0). The conversion to the DiT's own timestep scale happens in :func:`dit_timestep`
and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def dit_timestep(
    t: torch.Tensor, scale: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """The DiT's timestep input for flow time ``t`` in [0, 1]: ``t * 1000 * scale`` in fp32.

    SANA was trained on ``sigma * 1000``; ``scale`` is the DiT's ``timestep_scale`` (1.0 for SANA-1.5), as
    ``SanaPipeline`` applies it. Kept in fp32 even for a bf16 DiT (bf16 would round 999 to 1000).
    """
    return t.float() * (num_train_timesteps * scale)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift of flow sigmas: ``shift * s / (1 + (shift - 1) * s)`` (identity for shift 1)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_timesteps(
    n: int,
    mode: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times t in (0, 1): uniform (OpenUni's default) or logit-normal. Returns (n,)."""
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if mode == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    raise ConfigError(f"unknown timestep sampling {mode!r}; choose one of {list(TIMESTEP_SAMPLING)}")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise. x0, noise: (B, C, H, W); t: (B,)."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target v = noise - x0."""
    return noise - x0


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the target velocity (computed in fp32)."""
    return F.mse_loss(v_pred.float(), velocity_target(x0, noise).float())


def assign_teacher_tokens(
    cond: torch.Tensor, states: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's real teacher tokens reordered to the condition tokens they are matched to, one to one.

    The matching minimises the total squared distance (the Hungarian method on the detached distances;
    scipy's ``linear_sum_assignment``). A SANA DiT's cross-attention has no positions, so the order of the
    condition tokens carries nothing, and a fixed "query j = teacher token j" asks one query to hold the
    colour word of one caption and the shape word of another.

    cond: (B, Q, C); states: (B, S, C); mask: (B, S), 1 = a real token. Returns (states (B, Q, C), mask
    (B, Q)): row i holds the teacher token matched to condition token i (zeros and mask 0 where none is).
    """
    from scipy.optimize import linear_sum_assignment

    b, q, c = cond.shape
    cost = torch.cdist(cond.detach().float(), states.detach().float()).pow(2).cpu()  # (B, Q, S)
    keep = mask.detach().bool().cpu()
    index = torch.zeros(b, q, dtype=torch.long)
    assigned = torch.zeros(b, q, dtype=torch.bool)
    for k in range(b):
        real = keep[k].nonzero().squeeze(1)  # (S_real,)
        rows, cols = linear_sum_assignment(cost[k][:, real].numpy())
        index[k, torch.as_tensor(rows)] = real[torch.as_tensor(cols)]
        assigned[k, torch.as_tensor(rows)] = True
    index, assigned = index.to(states.device), assigned.to(states.device)
    aligned = states.gather(1, index[..., None].expand(b, q, states.shape[-1])) * assigned[..., None]
    return aligned, assigned.to(mask.dtype)


CONDITION_MATCHES = ("position", "assignment")


def align_teacher_tokens(
    cond: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, match: str = "position"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's tokens lined up with the condition's Q tokens: (states (B, Q, C), mask (B, Q)).

    ``"position"``: token j to token j, cut or padded (mask 0) to Q; ``"assignment"``:
    :func:`assign_teacher_tokens`.
    """
    if match == "assignment":
        return assign_teacher_tokens(cond, states, mask)
    if match != "position":
        raise ConfigError(f"unknown condition match {match!r}; choose one of {list(CONDITION_MATCHES)}")
    q, n = cond.shape[1], min(cond.shape[1], states.shape[1])
    return F.pad(states[:, :n], (0, 0, 0, q - n)), F.pad(mask[:, :n], (0, q - n))


def condition_match_loss(
    cond: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, match: str = "position"
) -> torch.Tensor:
    """How far a condition's tokens are from a teacher's text states (fp32): MSE + centred error.

    The teacher's tokens are first lined up with the condition's (:func:`align_teacher_tokens`):
    ``match="position"`` pairs position j with the teacher's token j, for the tokens the mask keeps (the
    condition's positions past the teacher's length are free); ``"assignment"`` reorders each example's
    teacher tokens by :func:`assign_teacher_tokens`. cond: (B, Q, C); states: (B, S, C) (the
    text encoder a DiT was pretrained with, on the same captions); mask: (B, S), 1 = a real token.

    The loss is the mean squared error plus the relative squared error of the batch-centred parts: at each
    position, both are centred on their mean over the batch's real tokens there, and the error of the student's
    deviations is divided by the teacher's total squared deviation. A causal text encoder's states are mostly
    alike across prompts (every caption starts alike), so the plain error is met by the common part, leaving
    what tells prompts apart unlearnt; the centred term is 1 for a condition that is the same for every
    prompt, and 0 when it varies as the teacher's does. With one example (or identical captions) it is 0. Under
    data parallelism the batch is each process's own micro-batch.
    """
    if cond.shape[0] != states.shape[0] or cond.shape[-1] != states.shape[-1]:
        raise ValueError(
            f"condition {tuple(cond.shape)} and teacher states {tuple(states.shape)} must share the batch "
            "and channel sizes (the teacher must be the text encoder whose width the DiT's cross-attention takes)"
        )
    states, mask = align_teacher_tokens(cond, states, mask, match)  # (B, Q, C), (B, Q)
    keep = mask[..., None].to(torch.float32)  # (B, Q, 1)
    student, teacher = cond.float(), states.float()
    mse = ((student - teacher).pow(2) * keep).sum() / (keep.sum() * cond.shape[-1]).clamp_min(1.0)
    count = keep.sum(0, keepdim=True).clamp_min(1.0)  # (1, Q, 1) real tokens per position

    def deviation(x: torch.Tensor) -> torch.Tensor:  # from the batch mean at each position, real tokens only
        return (x - (x * keep).sum(0, keepdim=True) / count) * keep

    student_dev, teacher_dev = deviation(student), deviation(teacher)
    spread = teacher_dev.pow(2).sum()
    centred = (student_dev - teacher_dev).pow(2).sum() / spread.clamp_min(1e-12)
    return mse + torch.where(spread > 1e-12, centred, torch.zeros_like(centred))  # no host sync


def pair_loss(
    cond: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """How differently two captions' conditions differ from how their teacher states differ (fp32).

    For each pair (a, b) of rows (captions that differ in one thing: "a red circle and a blue square" / "a red
    circle and a blue cross", or the same things bound differently, "a blue circle and a red square"), the
    relative squared error of the condition's difference against the teacher's, over the tokens real in both:
    1 for a condition that does not see the change, 0 for one that moves as the teacher does. cond: (B, Q, C);
    states: (B, Q, C) and mask (B, Q), already aligned to the condition's tokens; pairs: (P, 2) row indices.
    """
    a, b = pairs[:, 0], pairs[:, 1]
    keep = (mask[a] * mask[b])[..., None].float()  # (P, Q, 1)
    dc, dt = (cond[a] - cond[b]).float(), (states[a] - states[b]).float()
    return ((dc - dt).pow(2) * keep).sum() / (dt.pow(2) * keep).sum().clamp_min(1e-12)


@dataclass
class Distillation:
    """The condition-distillation term of a training loss (``train.condition_distill``) for one batch.

    ``states`` (B, S, C) and ``mask`` (B, S) are the teacher's on the batch's captions; ``pairs`` (P, 2) are rows
    whose captions differ in one thing, a caption and its twin (``train.distill_twins``).
    """

    states: torch.Tensor
    mask: torch.Tensor
    weight: float
    match: str = "position"
    pairs: torch.Tensor | None = None
    pair_weight: float = 0.0

    def loss(self, cond: torch.Tensor) -> torch.Tensor:
        """``weight`` x (:func:`condition_match_loss` + ``pair_weight`` x :func:`pair_loss`). cond: (B, Q, C)."""
        states, mask = align_teacher_tokens(cond, self.states, self.mask, self.match)
        loss = condition_match_loss(cond, states, mask)
        if self.pairs is not None and self.pair_weight > 0:
            loss = loss + self.pair_weight * pair_loss(cond, states, mask, self.pairs)
        return self.weight * loss
