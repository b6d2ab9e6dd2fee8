"""Stage III's rollouts: the policy's conditions (cached once per prompt and epoch) and SDE sampling with
CFG that keeps every latent and log-probability (:func:`rollout`); all randomness derives from
``(seed, epoch, purpose, sample index)`` (:func:`parauni.utils.seeds.purpose_seed`), so a rollout is the same on any number of processes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..diffusion.sampling import SDEStep, StepFn, denoise, flow_match_sigmas, flow_sigmas, make_sampler
from ..models.parauni import ParaUni
from ..models.vlm import PromptBatch
from ..pipeline import initial_noise
from ..utils.seeds import Purpose, purpose_generators, purpose_seed
from .config import RLConfig
from .ldam import LDAM, Perturbation, perturbation_scale


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
    """One epoch's prompts through the frozen VLM once: one forward per distinct prompt.

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
    def usable(model: ParaUni, config: RLConfig) -> bool:
        """Whether the query states are fixed for an epoch: the cache is on and the queries do not train."""
        return config.cache_conditions and not model.queries.requires_grad

    def select(self, prompts: list[str]) -> PromptConditions:
        """The cached rows of ``prompts`` (each must be one of the epoch's)."""
        rows = self.tensor[[self.row[p] for p in prompts]]
        return PromptConditions(per_layer=rows) if self.frozen_lim else PromptConditions(states=rows)


def prompt_conditions(model: ParaUni, prompts: list[str], cache: ConditionCache | None) -> PromptConditions:
    """The policy's condition input for ``prompts``: cached rows, or the tokenised prompts."""
    if cache is not None:
        return cache.select(prompts)
    return PromptConditions(batch=model.encode_prompts(prompts))


def rollout_sigmas(config: RLConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps + 1,) sigmas of the rollout: with ``rl.sampler=dpm`` DPM-Solver++'s times, otherwise
    ``rl.schedule`` 'flow_match' (Flow-GRPO's) or 'uniform'."""
    if config.sampler == "dpm":
        return make_sampler("dpm", config.steps, config.shift, device)[0]
    make = flow_match_sigmas if config.schedule == "flow_match" else flow_sigmas
    return make(config.steps, config.shift, device=device)


def _step_function(
    config: RLConfig, sigmas: torch.Tensor, generators: list[torch.Generator], ode: bool = False
) -> StepFn:
    """One rollout batch's step function: a fresh DPM-Solver++ (it keeps a history), the SDE step, or with
    ``ode`` the SDE step's deterministic Euler steps (eta 0)."""
    if config.sampler == "dpm":
        return make_sampler("dpm", config.steps, config.shift, sigmas.device)[1]
    if ode:
        return SDEStep(0.0, float(sigmas[1]), generators, [False] * config.steps)
    return SDEStep(config.eta, float(sigmas[1]), generators, config.stochastic_steps)


# --------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One epoch's samples on this process (n of them)."""

    prompts: list[str]
    metadata: list[dict | None]
    groups: torch.Tensor  # (n,) index of the prompt in the epoch
    latents: torch.Tensor  # (n, T + 1, C, h, w): x_0 (noise) .. x_T
    log_probs: torch.Tensor | None  # (n, T); None with rl.sampler=dpm (no likelihood)
    sigmas: torch.Tensor  # (T + 1,)
    ldam_eps: torch.Tensor | None  # (n, |zone|, Q, C) or None
    gamma: float | torch.Tensor  # LDAM's scale: a float or one per layer of the zone, (|zone|,)
    images: torch.Tensor  # (n, 3, H, W) in [-1, 1], CPU
    advantages: torch.Tensor | None = None  # (n,)
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)


def policy_condition(
    model: ParaUni,
    src: PromptConditions,
    eps: torch.Tensor | None,
    gamma: float | torch.Tensor,
    zone: list[int],
) -> torch.Tensor:
    """(B, Q, C): the LIM's condition, the zone's per-layer outputs scaled by ``1 + gamma * eps`` (LDAM).

    eps: (B, |zone|, Q, C) or None; gamma: a float or (|zone|,) (see :class:`parauni.rl.ldam.Perturbation`).
    """
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
    config: RLConfig,
    epoch: int,
    ldam: LDAM | Perturbation | None,
    progress: bool = False,
    cache: ConditionCache | None = None,
    ode: bool = False,
) -> Rollout:
    """Sample the given global sample ``indices`` (their prompts ``items``) with the SDE sampler (or
    ``rl.sampler=dpm``: DPM-Solver++) + CFG.

    ``ldam``: the perturbation of this rollout (an active LDAM, or a :class:`Perturbation` of several), or None.

    ``cache``: the epoch's conditions (:class:`ConditionCache`); without it the VLM runs on every batch.

    ``ode``: sample deterministically (the Euler steps of eta 0 on ``rl.schedule``'s sigmas, or DPM-Solver++),
    whatever ``rl.eta``: the held-out evaluation's sampler (:mod:`parauni.rl.evaluate`).
    """
    model.eval()
    s = model.config.sampling
    height, width = config.height or s.height, config.width or s.width
    shape = model.latent_shape(height, width)
    sigmas = rollout_sigmas(config, device=model.device)
    uncond_one = cache.uncond if cache is not None else model.condition(model.encode_prompts([None]))
    lat, logp, eps_all, images = [], [], [], []
    perturbed = ldam is not None and ldam.active
    gamma = ldam.gamma if perturbed else 0.0
    for start in tqdm(
        range(0, len(items), config.rollout_batch), desc="rollout", leave=False, disable=not progress
    ):
        chunk = items[start : start + config.rollout_batch]
        idx = indices[start : start + len(chunk)]
        src = prompt_conditions(model, [p for p, _ in chunk], cache)
        eps = None
        if perturbed:
            per_shape = (
                len(chunk),
                len(model.lim.layers),
                model.queries.shape[0],
                model.lim.projector.out_features,
            )
            eps = ldam.noise(per_shape, purpose_generators(config.seed, epoch, Purpose.LDAM_NOISE, idx))
        cond = policy_condition(model, src, eps, gamma, ldam.zone if ldam is not None else [])
        # the initial noise: one per sample, or one per prompt draw with rl.same_latent (a purpose of its own keeps the
        # per-sample streams of the default unchanged)
        keys = (
            [(Purpose.SHARED_LATENT, g) for g in groups[start : start + len(chunk)]]
            if config.same_latent
            else [(Purpose.INITIAL_NOISE, i) for i in idx]
        )
        x = initial_noise(shape, [purpose_seed(config.seed, epoch, *k) for k in keys], model.device)
        generators = purpose_generators(config.seed, epoch, Purpose.SDE_NOISE, idx)
        step = _step_function(config, sigmas, generators, ode)
        uncond = uncond_one.expand_as(cond)
        final, outs = denoise(
            functools.partial(cfg_velocity, model, cond=cond, uncond=uncond, scale=config.cfg),
            x,
            sigmas,
            step,
            record=True,
        )
        lat.append(torch.stack([x.float()] + [o.sample.float() for o in outs], dim=1))
        if config.sampler == "sde":
            logp.append(torch.stack([o.log_prob for o in outs], dim=1))
        if eps is not None:
            eps_all.append(eps)
        images.append(model.decode_latents(final).cpu())
    return Rollout(
        prompts=[p for p, _ in items],
        metadata=[m for _, m in items],
        groups=torch.tensor(groups),
        latents=torch.cat(lat),
        log_probs=torch.cat(logp) if logp else None,
        sigmas=sigmas,
        ldam_eps=torch.cat(eps_all) if eps_all else None,
        gamma=gamma,
        images=torch.cat(images),
    )
