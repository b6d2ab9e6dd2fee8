"""Stage III: Flow-GRPO on a ParaUni model, with LDAM and a sequential reward curriculum, under ``accelerate``.

One epoch, read top to bottom:

    prompts (P) -> each repeated k times (N = P k samples, split evenly over the processes)
    rollout: per sample, SDE sampling with CFG from seeded noise, keeping every latent x_0..x_T and the
             log-probability of every step; LDAM's perturbation noise (when active) is drawn and stored
    rewards: every reward model scores the decoded images; the phase's weighted sum is the reward optimised
    advantages: (r - mean of the prompt's group) / (std + 1e-4), clipped to +-5 (gathered over processes)
    update: for the trained steps (the first 99%), recompute the step's log-probability under the current
            policy (same stored condition noise) -> clipped policy loss + beta x KL to the reference policy;
            accumulate, clip the gradient norm, AdamW step (``updates_per_epoch`` times per pass)
    LDAM: record the phase reward's epoch mean and the gradient norm; maybe trigger a perturbation

All randomness of an epoch derives from ``(seed, epoch, sample index)``, so the run is the same on any number
of processes (a prompt's group may span processes; rewards are gathered before the advantages) and a resumed
run continues exactly. Under ``accelerate launch`` (DDP, FSDP2 or DeepSpeed ZeRO-2; see
``training/distributed.py``) every process holds the same LDAM state: its inputs, the gathered reward mean
and the gradient norm of the reduced gradients, are the same everywhere, and this is checked every epoch.
The policy step trains as a forward of the prepared ``ModelCalls``; under FSDP the sampling and the reference
policy run as its forwards too, where FSDP gathers the sharded parameters. An update whose gradient is not
finite is skipped on every process; after ``MAX_BAD_STEPS`` skipped updates in a row the run stops.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import save_yaml
from ..diffusion.sampling import SDEStep, denoise, flow_match_sigmas, flow_sigmas, sde_noise_scale, sde_step
from ..errors import ConfigError, TrainingDiverged
from ..models.lim import zone_layers
from ..models.parauni import ParaUni
from ..models.vlm import PromptBatch
from ..pipeline import initial_noise
from ..training.checkpoint import (
    CHECKPOINT_DIR,
    RL_LOG,
    init_ema,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from ..training.distributed import (
    ModelCalls,
    all_processes_agree,
    backward,
    check_backend,
    configure_deepspeed,
    grad_norm,
    like,
    load_optimizer,
    outside_training,
    prepare,
    save_model,
)
from ..training.trainer import MAX_BAD_STEPS, enable_activation_checkpointing, warmup_cosine
from .config import PhaseConfig, RLConfig
from .ldam import LDAM, perturbation_scale
from .prompts import Prompts

# rewards(images (N, 3, H, W) in [-1, 1], prompts, metadata) -> {reward name: N floats}
RewardFn = Callable[[torch.Tensor, list[str], list[dict | None]], dict[str, list[float]]]


def _seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**62)
    return h


def _generators(*prefix: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(_seed(*prefix, i)) for i in indices]


# --------------------------------------------------------------------------------------------- conditions
@dataclass
class PromptConditions:
    """What the policy's condition of a batch of samples is computed from; the first one set is used.

    per_layer: (B, L_sel, Q, C) cached LIM outputs (VLM, queries and LIM frozen);
    states: (B, L, Q, D) cached VLM query states (VLM and queries frozen; the LIM runs on them);
    batch: the tokenised prompts (the VLM runs).
    """

    batch: PromptBatch | None = None
    states: torch.Tensor | None = None
    per_layer: torch.Tensor | None = None

    def per_layer_conditions(self, model: ParaUni) -> torch.Tensor:
        """(B, L_sel, Q, C): the LIM's per-layer outputs, computed only as far as nothing is cached."""
        if self.per_layer is not None:
            return self.per_layer
        if self.states is not None:
            return model.lim.per_layer(self.states)
        return model.per_layer_conditions(self.batch)


class ConditionCache:
    """One epoch's prompts through the frozen VLM once: one forward per distinct prompt (issue 15, item 8).

    With the queries frozen (Stage III's default) a prompt's query states cannot change within an epoch; with
    the LIM frozen too, neither can its per-layer outputs, which are then kept instead. LDAM's perturbation
    is applied after the LIM, as without the cache. ``uncond`` (1, Q, C) is the unconditional condition.
    """

    def __init__(self, model: ParaUni, prompts: list[str], batch_size: int) -> None:
        unique = list(dict.fromkeys(prompts))
        self.row = {p: i for i, p in enumerate(unique)}
        self.frozen_lim = not any(p.requires_grad for p in model.lim.parameters())
        with torch.no_grad():
            states = torch.cat(
                [
                    model.query_states(model.encode_prompts(unique[i : i + batch_size]))
                    for i in range(0, len(unique), batch_size)
                ]
            )
            self.tensor = model.lim.per_layer(states) if self.frozen_lim else states
            self.uncond = model.condition(model.encode_prompts([None]))
        self.vlm_forwards = len(unique) + 1

    @staticmethod
    def usable(model: ParaUni, cfg: RLConfig) -> bool:
        """Whether the query states are fixed for an epoch: the cache is on and the queries do not train."""
        return cfg.cache_conditions and not model.queries.requires_grad

    def select(self, prompts: list[str]) -> PromptConditions:
        """The cached rows of ``prompts`` (each must be one of the epoch's)."""
        rows = self.tensor[[self.row[p] for p in prompts]]
        return PromptConditions(per_layer=rows) if self.frozen_lim else PromptConditions(states=rows)


def prompt_conditions(model: ParaUni, prompts: list[str], cache: ConditionCache | None) -> PromptConditions:
    """The policy's condition input for ``prompts``: cached rows, or the tokenised prompts."""
    if cache is not None:
        return cache.select(prompts)
    return PromptConditions(batch=model.encode_prompts(prompts))


def rollout_sigmas(cfg: RLConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps + 1,) sigmas of the rollout: ``rl.schedule`` 'flow_match' (Flow-GRPO's) or 'uniform'."""
    make = flow_match_sigmas if cfg.schedule == "flow_match" else flow_sigmas
    return make(cfg.steps, cfg.shift, device=device)


# --------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One epoch's samples on this process (n of them)."""

    prompts: list[str]
    metadata: list[dict | None]
    groups: torch.Tensor  # (n,) index of the prompt in the epoch
    latents: torch.Tensor  # (n, T + 1, C, h, w): x_0 (noise) .. x_T
    log_probs: torch.Tensor  # (n, T)
    sigmas: torch.Tensor  # (T + 1,)
    ldam_eps: torch.Tensor | None  # (n, |zone|, Q, C) or None
    gamma: float
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1], CPU
    advantages: torch.Tensor | None = None  # (n,)
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)


def policy_condition(
    model: ParaUni, src: PromptConditions, eps: torch.Tensor | None, gamma: float, zone: list[int]
) -> torch.Tensor:
    """(B, Q, C): the LIM's condition, the zone's per-layer outputs scaled by ``1 + gamma * eps`` (LDAM)."""
    per_layer = src.per_layer_conditions(model)
    if eps is None:
        return model.lim.aggregate(per_layer)
    scale = perturbation_scale(eps.to(per_layer.device, per_layer.dtype), gamma, zone, per_layer.shape[1])
    return model.lim.aggregate(per_layer, scale)


def cfg_velocity(
    model: ParaUni, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scale: float
) -> torch.Tensor:
    """Guided velocity ``v_u + scale (v_c - v_u)`` with the unconditional branch detached (no graph).

    Rollout and policy update both use this function, in two DiT calls (not one batched call), so that the
    update recomputes the rollout's log-probabilities with the same arithmetic. x: (B, C, h, w); t: (B,).
    """
    v_c = model.velocity(x, t, cond)
    if scale == 1.0:
        return v_c
    with torch.no_grad():
        v_u = model.velocity(x, t, uncond)
    return v_u + scale * (v_c - v_u)


@torch.no_grad()
def rollout(
    model: ParaUni,
    items: list[tuple[str, dict | None]],
    groups: list[int],
    indices: list[int],
    cfg: RLConfig,
    epoch: int,
    ldam: LDAM | None,
    progress: bool = False,
    cache: ConditionCache | None = None,
) -> Rollout:
    """Sample the given global sample ``indices`` (their prompts ``items``) with the SDE sampler + CFG.

    ``cache``: the epoch's conditions (:class:`ConditionCache`); without it the VLM runs on every batch.
    """
    model.eval()
    s = model.config.sampling
    height, width = cfg.height or s.height, cfg.width or s.width
    shape = model.latent_shape(height, width)
    sigmas = rollout_sigmas(cfg, device=model.device)
    uncond_one = cache.uncond if cache is not None else model.condition(model.encode_prompts([None]))
    lat, logp, eps_all, images = [], [], [], []
    gamma = ldam.gamma if ldam is not None and ldam.active else 0.0
    for start in tqdm(
        range(0, len(items), cfg.rollout_batch), desc="rollout", leave=False, disable=not progress
    ):
        chunk = items[start : start + cfg.rollout_batch]
        idx = indices[start : start + len(chunk)]
        src = prompt_conditions(model, [p for p, _ in chunk], cache)
        eps = None
        if gamma > 0:
            per_shape = (
                len(chunk),
                len(model.lim.layers),
                model.queries.shape[0],
                model.lim.projector.out_features,
            )
            eps = ldam.noise(per_shape, _generators(cfg.seed, epoch, 2, indices=idx))
        cond = policy_condition(model, src, eps, gamma, ldam.zone if ldam is not None else [])
        x = initial_noise(shape, [_seed(cfg.seed, epoch, 0, i) for i in idx], model.device)
        step = SDEStep(cfg.eta, float(sigmas[1]), _generators(cfg.seed, epoch, 1, indices=idx))
        uncond = uncond_one.expand_as(cond)
        final, outs = denoise(
            functools.partial(cfg_velocity, model, cond=cond, uncond=uncond, scale=cfg.cfg),
            x,
            sigmas,
            step,
            record=True,
        )
        lat.append(torch.stack([x.float()] + [o.sample.float() for o in outs], dim=1))
        logp.append(torch.stack([o.log_prob for o in outs], dim=1))
        if eps is not None:
            eps_all.append(eps)
        images.append(model.decode_latents(final).cpu())
    return Rollout(
        prompts=[p for p, _ in items],
        metadata=[m for _, m in items],
        groups=torch.tensor(groups),
        latents=torch.cat(lat),
        log_probs=torch.cat(logp),
        sigmas=sigmas,
        ldam_eps=torch.cat(eps_all) if eps_all else None,
        gamma=gamma,
        images=torch.cat(images),
    )


# --------------------------------------------------------------------------------------------- objective
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

    def __init__(self, model: ParaUni, cfg: RLConfig, zone: list[int]) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.zone = zone

    def forward(self, src: PromptConditions, uncond, x, prev, sigma, sigma_next, eps, gamma: float):
        m, c = self.model, self.cfg
        t = sigma.expand(x.shape[0])
        cond = policy_condition(m, src, eps, gamma, self.zone)
        v = cfg_velocity(m, x, t, cond, uncond.expand_as(cond), c.cfg)
        out = sde_step(x, v, sigma, sigma_next, eta=c.eta, sigma_max=self._sigma_max, prev_sample=prev)
        std = out.std if c.kl_std == "step" else kl_std(sigma, sigma_next, c.eta, self._sigma_max, c.kl_std)
        return out.log_prob, out.mean, std

    _sigma_max: float = 0.0


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


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class RLResult:
    """What a finished Stage III reports; ``ldam`` holds each phase's final LDAM state."""

    epochs: int
    model_dir: Path
    log_path: Path
    seconds: float
    history: list[dict]
    config: RLConfig
    ldam: list[dict] = field(default_factory=list)


def _zone_positions(model: ParaUni, zone: str) -> list[int]:
    """Positions within the LIM's selected layers of the VLM layers of ``zone`` ('all' = every one)."""
    selected = list(model.lim.layers)
    if zone == "all":
        return list(range(len(selected)))
    wanted = set(zone_layers(model.vlm.num_layers, zone, model.config.lim.zone_bounds))
    return [i for i, layer in enumerate(selected) if layer in wanted]


def _phase_at(cfg: RLConfig, epoch: int) -> tuple[int, PhaseConfig]:
    end = 0
    for i, phase in enumerate(cfg.phases):
        end += phase.epochs
        if epoch < end:
            return i, phase
    raise IndexError(epoch)


def _check_same_everywhere(acc, what: str, value) -> None:
    """Raise when ``value`` (JSON-serialisable) differs between processes: state that must be shared."""
    if acc.num_processes == 1:
        return
    from accelerate.utils import gather_object

    seen = gather_object([json.dumps(value, sort_keys=True)])
    if len(set(seen)) > 1:
        raise RuntimeError(
            f"{what} differs between processes ({len(set(seen))} versions); it must be computed from gathered "
            f"values only. Process 0: {seen[0][:300]}"
        )


def train_rl(
    model: ParaUni,
    rewards: RewardFn,
    reward_names: list[str],
    prompts: Prompts,
    cfg: RLConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    accelerator=None,
    log=print,
) -> RLResult:
    """Run Stage III and save the final policy to ``out_dir`` (a model folder ``parauni generate`` reads).

    Args:
        model: a ParaUni model (Stage II); what trains is ``cfg.trainable``.
        rewards: scores images -> {reward name: floats}; must return every name of ``reward_names``.
        reward_names: every reward the phases use (checked up front).
        prompts: the RL prompt source.
        resume: continue from the newest epoch checkpoint in ``out_dir``.
    """
    from accelerate import Accelerator

    missing = sorted({r for p in cfg.phases for r in p.rewards} - set(reward_names))
    if missing:
        raise ConfigError(
            f"rl phases use rewards {missing} that are not configured; available: {reward_names}"
        )
    out = Path(out_dir)
    acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
    check_backend(acc, "parauni rl", model)
    configure_deepspeed(
        acc,
        {
            "train_micro_batch_size_per_gpu": (cfg.micro_batch, "rl.micro_batch"),
            "gradient_accumulation_steps": (1, "Stage III accumulates each update's micro-batches itself"),
            "gradient_clipping": (cfg.grad_clip, "rl.grad_clip"),
        },
    )
    world, rank = acc.num_processes, acc.process_index
    n_total = cfg.samples_per_epoch
    if n_total % world:
        raise ConfigError(
            f"rl.prompts_per_epoch x rl.group_size = {n_total} samples must divide over {world} processes"
        )
    n_local = n_total // world
    model.set_trainable(cfg.trainable)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    reference = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    ldams = [
        LDAM(cfg.ldam, _zone_positions(model, phase.zone), len(model.lim.layers), phase.zone)
        for phase in cfg.phases
    ]
    start, history, bad_in_a_row = 0, [], 0
    ckpt = resume_checkpoint(out, "epoch", acc) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, named, rank, "was rl.trainable changed?")
        for ldam, s in zip(ldams, state["ldam"], strict=True):
            ldam.load_state_dict(s)
        start, history = state["epoch"] + 1, state["history"]
        bad_in_a_row = state.get("bad_in_a_row", 0)
        acc.print(f"resuming RL from {ckpt} at epoch {start}")
    policy = PolicyStep(model, cfg, [])
    wrapped, optimizer = prepare(acc, ModelCalls(model), optimizer, model)
    if ckpt is not None:
        load_optimizer(acc, wrapped, optimizer, ckpt, state.get("num_processes", world))
    # after prepare the parameters may be new objects (FSDP: DTensor shards); the reference and EMA follow them
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    reference = [like(p, r) for p, r in zip(params, reference, strict=True)]
    ema = init_ema(named, ckpt, cfg.ema)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "rl_config.yaml")
        remove_partial_checkpoints(out / CHECKPOINT_DIR)
        # the log holds exactly the epochs done: none on a fresh start, the checkpoint's on a resume
        (out / RL_LOG).write_text("".join(json.dumps(r) + "\n" for r in history))
    t0 = time.time()
    bar = tqdm(
        total=cfg.total_epochs, initial=start, desc="RL", disable=not (progress and acc.is_main_process)
    )
    for epoch in range(start, cfg.total_epochs):
        phase_index, phase = _phase_at(cfg, epoch)
        ldam = ldams[phase_index]
        policy.zone = ldam.zone
        te = time.time()
        # ---- rollout on this process's share of the epoch's samples
        items = prompts.epoch(cfg.seed, epoch, cfg.prompts_per_epoch)
        indices = list(range(rank * n_local, (rank + 1) * n_local))
        groups = [i // cfg.group_size for i in indices]
        perturbed = ldam.active
        with acc.autocast():  # the same precision as the update's forward, so on-policy ratios stay 1
            cache = None
            if ConditionCache.usable(model, cfg):
                local_prompts = [items[g][0] for g in groups]
                cache = outside_training(
                    acc, wrapped, ConditionCache, model, local_prompts, cfg.rollout_batch
                )
            ro = outside_training(
                acc,
                wrapped,
                rollout,
                model,
                [items[g] for g in groups],
                groups,
                indices,
                cfg,
                epoch,
                ldam if perturbed else None,
                False,
                cache,
            )
        # ---- rewards, gathered over processes, and advantages
        names = (
            sorted({r for p in cfg.phases for r in p.rewards})
            if cfg.log_all_rewards
            else sorted(phase.rewards)
        )
        scores = rewards(ro.images, ro.prompts, ro.metadata)
        local = {n: torch.tensor(scores[n], dtype=torch.float32, device=model.device) for n in names}
        gathered = {n: acc.gather(v).cpu() for n, v in local.items()}
        total = sum(w * gathered[n] for n, w in phase.rewards.items())
        if cfg.group_by == "prompt":
            all_groups = prompt_groups([items[i // cfg.group_size][0] for i in range(n_total)])
        else:
            all_groups = torch.arange(n_total) // cfg.group_size
        adv = group_advantages(total, all_groups, cfg.adv_std, cfg.adv_clip)
        ro.advantages = adv[rank * n_local : (rank + 1) * n_local].to(model.device)
        keep = update_samples(
            adv,
            n_local,
            rank,
            cfg.drop_zero_advantage,
            torch.Generator().manual_seed(_seed(cfg.seed, epoch, 4)),
        )
        # ---- policy update
        stats, grad_norms, skips = _update(
            wrapped, policy, model, ro, cfg, phase, params, reference, optimizer, acc, epoch, ema, keep, cache
        )
        for skipped in skips:
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        # ---- LDAM and the epoch log (identical on every process: inputs are gathered / all-reduced)
        reward_mean = float(total.mean())
        grad_norm = float(np.mean(grad_norms)) if grad_norms else float("nan")
        ldam_state = ldam.update(reward_mean, grad_norm)
        _check_same_everywhere(acc, f"LDAM state of phase {phase.name!r} at epoch {epoch}", ldam.state_dict())
        row = {
            "epoch": epoch,
            "phase": phase.name,
            "phase_reward": reward_mean,
            **{f"reward_{n}": float(v.mean()) for n, v in gathered.items()},
            **{f"reward_{n}_std": float(v.std(unbiased=False)) for n, v in gathered.items()},
            "grad_norm": grad_norm,
            "skipped_updates": sum(skips),
            "update_samples": len(keep) * world,
            "lr": _lr(cfg, epoch, cfg.inner_epochs - 1, cfg.updates_per_epoch - 1),
            "cached_conditions": cache is not None,
            **stats,
            "ldam_perturbed": perturbed,
            "ldam_gamma_used": ro.gamma,
            **{f"ldam_{k}": v for k, v in ldam_state.items()},
            "seconds": time.time() - te,
        }
        history.append(row)
        if ldam_state["triggered"] and acc.is_main_process:
            log(
                f"RL epoch {epoch}: LDAM trigger {ldam.triggers} of phase {phase.name!r}: zone {phase.zone} "
                f"(LIM layers {ldam.zone}), gamma {ldam.gamma:.4g}; the next {cfg.ldam.perturb_epochs} "
                "rollout(s) perturbed"
            )
        if acc.is_main_process:
            with (out / RL_LOG).open("a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(phase=phase.name, reward=f"{reward_mean:.3f}", gn=f"{grad_norm:.2f}")
        if bad_in_a_row >= MAX_BAD_STEPS:
            raise TrainingDiverged(
                f"{bad_in_a_row} RL updates in a row had a non-finite gradient (last in epoch {epoch}; see "
                f"{out / RL_LOG}): check the rewards for NaN, lower rl.lr, or use rl.mixed_precision=no / bf16"
            )
        last = epoch == cfg.total_epochs - 1
        if cfg.save_every and (epoch + 1) % cfg.save_every == 0 and not last:
            state = {
                "epoch": epoch,
                "history": history,
                "ldam": [x.state_dict() for x in ldams],
                "bad_in_a_row": bad_in_a_row,
                "num_processes": world,
            }
            save_checkpoint(out, "epoch", acc, wrapped, optimizer, named, state, cfg.keep_last, ema)
    bar.close()
    save_model(acc, model, out, values=ema)
    log(f"RL: {cfg.total_epochs} epochs in {time.time() - t0:.0f} s; policy saved to {out}")
    ldam_states = [x.state_dict() for x in ldams]
    return RLResult(cfg.total_epochs, out, out / RL_LOG, time.time() - t0, history, cfg, ldam_states)


def _lr(cfg: RLConfig, epoch: int, inner: int, update: int) -> float:
    """The learning rate of one optimizer step: ``rl.lr`` constant, or cosine to 0 over the run's steps."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    per_epoch = cfg.inner_epochs * cfg.updates_per_epoch
    step = epoch * per_epoch + inner * cfg.updates_per_epoch + update
    return warmup_cosine(step, cfg.lr, 0, cfg.total_epochs * per_epoch)


def _update(
    wrapped,
    policy,
    model,
    ro: Rollout,
    cfg: RLConfig,
    phase: PhaseConfig,
    params,
    reference,
    optimizer,
    acc,
    epoch: int,
    ema,
    keep: list[int] | None = None,
    cache: ConditionCache | None = None,
) -> tuple[dict, list[float], list[bool]]:
    """The policy update of one epoch: inner epochs x updates, each accumulating over micro-batches and the
    trained steps, on the samples ``keep`` (local indices; default all). Returns the statistics (means over
    every process), the gradient norm of every optimizer step taken and, per update, whether it was skipped
    for a non-finite gradient (on every process)."""
    keep = list(range(len(ro.prompts))) if keep is None else keep
    if not keep:
        return {}, [], []
    model.train()
    policy._sigma_max = float(ro.sigmas[1])
    n = len(keep)
    steps = cfg.train_steps
    if cache is not None:
        uncond = cache.uncond
    else:
        with torch.no_grad(), acc.autocast():  # as in the rollout
            uncond = outside_training(acc, wrapped, model.condition, model.encode_prompts([None]))
    kept = torch.tensor(keep, dtype=torch.long)
    totals: dict[str, float] = {}
    count, grad_norms, skips = 0, [], []
    for inner in range(cfg.inner_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(cfg.seed, epoch, 3, inner)))
        chunks = [c for c in kept[order].chunk(min(cfg.updates_per_epoch, n)) if len(c)]
        for update, chunk in enumerate(chunks):
            for group in optimizer.param_groups:  # before the backward passes: DeepSpeed steps in the last
                group["lr"] = _lr(cfg, epoch, inner, update)
            micro = list(chunk.split(cfg.micro_batch))
            n_backward = len(micro) * steps
            done = 0
            for mb in micro:
                idx = mb.tolist()
                batch = prompt_conditions(model, [ro.prompts[i] for i in idx], cache)
                eps = ro.ldam_eps[idx] if ro.ldam_eps is not None else None
                adv = ro.advantages[idx]
                for j in range(steps):
                    x, prev = ro.latents[idx, j], ro.latents[idx, j + 1]
                    sigma, sigma_next = ro.sigmas[j], ro.sigmas[j + 1]
                    ref_mean = None
                    if phase.beta > 0:
                        with torch.no_grad(), swapped(params, reference), acc.autocast():
                            _, ref_mean, _ = outside_training(
                                acc, wrapped, policy, batch, uncond, x, prev, sigma, sigma_next, eps, ro.gamma
                            )
                    done += 1
                    last = done == n_backward
                    with contextlib.nullcontext() if last else acc.no_sync(wrapped):
                        logp, mean, std = wrapped(
                            policy, batch, uncond, x, prev, sigma, sigma_next, eps, ro.gamma
                        )
                        loss, st = grpo_loss(
                            logp, ro.log_probs[idx, j], adv, cfg.clip_range, mean, ref_mean, std, phase.beta
                        )
                        backward(acc, wrapped, loss / n_backward, last)
                    for k, v in st.items():
                        totals[k] = totals.get(k, 0.0) + v
                    count += 1
            # the norm is of the reduced gradient; agreeing on it keeps the processes in step regardless.
            # DeepSpeed: the engine stepped (or skipped a non-finite gradient) in the last backward already
            norm = grad_norm(acc, params, cfg.grad_clip)
            finite = all_processes_agree(acc, math.isfinite(norm))
            if finite:
                optimizer.step()
                grad_norms.append(norm)
            else:
                acc.print(f"RL epoch {epoch}: non-finite gradient (norm {norm}), update skipped")
            skips.append(not finite)
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.values(), params, strict=True):
                        e.mul_(cfg.ema).add_(p.detach(), alpha=1 - cfg.ema)
    model.eval()
    local = torch.tensor([totals[k] / max(1, count) for k in sorted(totals)], device=acc.device)
    means = acc.gather(local[None]).mean(dim=0).tolist() if totals else []
    return dict(zip(sorted(totals), means, strict=True)), grad_norms, skips
