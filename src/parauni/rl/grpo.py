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
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import save_yaml
from ..errors import ConfigError, TrainingDiverged
from ..models.lim import zone_layers
from ..models.parauni import ParaUni
from ..training.checkpoint import (
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
from ..utils.run_files import CHECKPOINT_DIR, RL_LOG
from .config import PhaseConfig, RLConfig
from .ldam import LDAM, Perturbation
from .objective import PolicyStep, group_advantages, grpo_loss, prompt_groups, swapped, update_samples
from .prompts import Prompts
from .rollout import ConditionCache, Rollout, derived_seed, prompt_conditions, rollout

# rewards(images (N, 3, H, W) in [-1, 1], prompts, metadata) -> {reward name: N floats}
RewardFn = Callable[[torch.Tensor, list[str], list[dict | None]], dict[str, list[float]]]


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class RLResult:
    """What a finished Stage III reports; ``ldam`` holds each phase's final LDAM states ({signal: state}; the
    signal is 'phase' or a reward name, see ``rl.ldam.monitor``)."""

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


PHASE_SIGNAL = "phase"


def _phase_ldams(model: ParaUni, config: RLConfig, phase: PhaseConfig) -> dict[str, LDAM]:
    """The LDAMs of one phase by the signal each watches: ``{"phase": LDAM}`` on the phase's weighted reward
    and zone (``rl.ldam.monitor=phase``), or one per optimised reward on its own zone (``monitor=reward``)."""
    c, n = config.ldam, len(model.lim.layers)
    if c.monitor == "phase":
        return {PHASE_SIGNAL: LDAM(c, _zone_positions(model, phase.zone), n, phase.zone)}
    out = {}
    for reward in sorted(phase.rewards):
        zone = c.reward_zones.get(reward, phase.zone)
        out[reward] = LDAM(c, _zone_positions(model, zone), n, zone)
    return out


def _ldam_log(states: dict[str, dict]) -> dict:
    """One epoch's LDAM log entries from each monitor's state: one monitor's as they are; for several, the
    trigger, zone(s), trigger count, perturbation and largest gamma over all of them, then each one's own
    state under its reward's name (``aesthetic_triggered``, ...)."""
    if len(states) == 1:
        return next(iter(states.values()))
    fired = [s for s in states.values() if s["triggered"]]
    out = {
        "triggered": bool(fired),
        "zone": ",".join(s["zone"] for s in fired),
        "triggers": sum(s["triggers"] for s in states.values()),
        "perturb_next": any(s["perturb_next"] for s in states.values()),
        "gamma": max(s["gamma"] for s in states.values()),
    }
    for signal, state in states.items():
        out.update({f"{signal}_{k}": v for k, v in state.items()})
    return out


def _phase_at(config: RLConfig, epoch: int) -> tuple[int, PhaseConfig]:
    end = 0
    for i, phase in enumerate(config.phases):
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
    config: RLConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    accelerator=None,
    log=print,
) -> RLResult:
    """Run Stage III and save the final policy to ``out_dir`` (a model folder ``parauni generate`` reads).

    Args:
        model: a ParaUni model (Stage II); what trains is ``config.trainable``.
        rewards: scores images -> {reward name: floats}; must return every name of ``reward_names``.
        reward_names: every reward the phases use (checked up front).
        prompts: the RL prompt source.
        resume: continue from the newest epoch checkpoint in ``out_dir``.
    """
    from accelerate import Accelerator

    missing = sorted({r for p in config.phases for r in p.rewards} - set(reward_names))
    if missing:
        raise ConfigError(
            f"rl phases use rewards {missing} that are not configured; available: {reward_names}"
        )
    out = Path(out_dir)
    acc = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    check_backend(acc, "parauni rl", model)
    configure_deepspeed(
        acc,
        {
            "train_micro_batch_size_per_gpu": (config.micro_batch, "rl.micro_batch"),
            "gradient_accumulation_steps": (1, "Stage III accumulates each update's micro-batches itself"),
            "gradient_clipping": (config.grad_clip, "rl.grad_clip"),
        },
    )
    num_processes, rank = acc.num_processes, acc.process_index
    n_total = config.samples_per_epoch
    if n_total % num_processes:
        raise ConfigError(
            f"rl.prompts_per_epoch x rl.group_size = {n_total} samples must divide over {num_processes} processes"
        )
    n_local = n_total // num_processes
    model.set_trainable(config.trainable)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    reference = [p.detach().clone() for p in params]
    groups = (
        [{"params": params, "weight_decay": config.weight_decay}]
        if config.decay_1d
        else model.param_groups(config.weight_decay)
    )
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    ldams = [_phase_ldams(model, config, phase) for phase in config.phases]
    start, history, bad_in_a_row = 0, [], 0
    ckpt = resume_checkpoint(out, "epoch", acc) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, named, rank, "was rl.trainable changed?")
        for monitors, saved in zip(ldams, state["ldam"], strict=True):
            saved = {PHASE_SIGNAL: saved} if "rewards" in saved else saved  # written before per-reward LDAM
            for signal, ldam in monitors.items():
                ldam.load_state_dict(saved[signal])
        start, history = state["epoch"] + 1, state["history"]
        bad_in_a_row = state.get("bad_in_a_row", 0)
        acc.print(f"resuming RL from {ckpt} at epoch {start}")
    policy = PolicyStep(model, config, [])
    wrapped, optimizer = prepare(acc, ModelCalls(model), optimizer, model)
    if ckpt is not None:
        load_optimizer(acc, wrapped, optimizer, ckpt, state.get("num_processes", num_processes))
    # after prepare the parameters may be new objects (FSDP: DTensor shards); the reference and EMA follow them
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    reference = [like(p, r) for p, r in zip(params, reference, strict=True)]
    ema = init_ema(named, ckpt, config.ema)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out / "rl_config.yaml")
        remove_partial_checkpoints(out / CHECKPOINT_DIR)
        # the log holds exactly the epochs done: none on a fresh start, the checkpoint's on a resume
        (out / RL_LOG).write_text("".join(json.dumps(r) + "\n" for r in history))
    t0 = time.time()
    bar = tqdm(
        total=config.total_epochs, initial=start, desc="RL", disable=not (progress and acc.is_main_process)
    )
    for epoch in range(start, config.total_epochs):
        phase_index, phase = _phase_at(config, epoch)
        monitors = ldams[phase_index]
        perturbation = Perturbation(list(monitors.values()))
        policy.zone = perturbation.zone
        te = time.time()
        # ---- rollout on this process's share of the epoch's samples
        items = prompts.epoch(config.seed, epoch, config.prompts_per_epoch)
        indices = list(range(rank * n_local, (rank + 1) * n_local))
        groups = [i // config.group_size for i in indices]
        perturbed = perturbation.active
        with acc.autocast():  # the same precision as the update's forward, so on-policy ratios stay 1
            cache = None
            if ConditionCache.usable(model, config):
                local_prompts = [items[g][0] for g in groups]
                cache = outside_training(
                    acc, wrapped, ConditionCache, model, local_prompts, config.rollout_batch
                )
            ro = outside_training(
                acc,
                wrapped,
                rollout,
                model,
                [items[g] for g in groups],
                groups,
                indices,
                config,
                epoch,
                perturbation if perturbed else None,
                False,
                cache,
            )
        # ---- rewards, gathered over processes, and advantages
        names = (
            sorted({r for p in config.phases for r in p.rewards})
            if config.log_all_rewards
            else sorted(phase.rewards)
        )
        scores = rewards(ro.images, ro.prompts, ro.metadata)
        local = {n: torch.tensor(scores[n], dtype=torch.float32, device=model.device) for n in names}
        gathered = {n: acc.gather(v).cpu() for n, v in local.items()}
        total = sum(w * gathered[n] for n, w in phase.rewards.items())
        if config.group_by == "prompt":
            all_groups = prompt_groups([items[i // config.group_size][0] for i in range(n_total)])
        else:
            all_groups = torch.arange(n_total) // config.group_size
        adv = group_advantages(total, all_groups, config.adv_std, config.adv_clip)
        ro.advantages = adv[rank * n_local : (rank + 1) * n_local].to(model.device)
        keep = update_samples(
            adv,
            n_local,
            rank,
            config.drop_zero_advantage,
            torch.Generator().manual_seed(derived_seed(config.seed, epoch, 4)),
        )
        # ---- policy update
        stats, grad_norms, skips = _update(
            wrapped,
            policy,
            model,
            ro,
            config,
            phase,
            params,
            reference,
            optimizer,
            acc,
            epoch,
            ema,
            keep,
            cache,
        )
        for skipped in skips:
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        # ---- LDAM and the epoch log (identical on every process: inputs are gathered / all-reduced)
        reward_mean = float(total.mean())
        grad_norm = float(np.mean(grad_norms)) if grad_norms else float("nan")
        states = {
            signal: ldam.update(
                reward_mean if signal == PHASE_SIGNAL else float(gathered[signal].mean()), grad_norm
            )
            for signal, ldam in monitors.items()
        }
        ldam_state = _ldam_log(states)
        _check_same_everywhere(
            acc,
            f"LDAM state of phase {phase.name!r} at epoch {epoch}",
            {k: x.state_dict() for k, x in monitors.items()},
        )
        row = {
            "epoch": epoch,
            "phase": phase.name,
            "phase_reward": reward_mean,
            **{f"reward_{n}": float(v.mean()) for n, v in gathered.items()},
            **{f"reward_{n}_std": float(v.std(unbiased=False)) for n, v in gathered.items()},
            "grad_norm": grad_norm,
            "samples": n_total,
            "skipped_updates": sum(skips),
            "update_samples": len(keep) * num_processes,
            "lr": _lr(config, epoch, config.inner_epochs - 1, config.updates_per_epoch - 1),
            "cached_conditions": cache is not None,
            **stats,
            "ldam_perturbed": perturbed,
            "ldam_gamma_used": perturbation.gamma_max if perturbed else 0.0,
            **{f"ldam_{k}": v for k, v in ldam_state.items()},
            "seconds": time.time() - te,
        }
        history.append(row)
        for signal, ldam in monitors.items():
            if states[signal]["triggered"] and acc.is_main_process:
                watched = "the phase reward" if signal == PHASE_SIGNAL else f"reward {signal!r}"
                log(
                    f"RL epoch {epoch}: LDAM trigger {ldam.triggers} on {watched} of phase {phase.name!r}: zone "
                    f"{ldam.zone_name} (LIM layers {ldam.zone}), gamma {ldam.gamma:.4g}; the next "
                    f"{config.ldam.perturb_epochs} rollout(s) perturbed"
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
        last = epoch == config.total_epochs - 1
        if config.save_every and (epoch + 1) % config.save_every == 0 and not last:
            state = {
                "epoch": epoch,
                "history": history,
                "ldam": [{k: x.state_dict() for k, x in m.items()} for m in ldams],
                "bad_in_a_row": bad_in_a_row,
                "num_processes": num_processes,
            }
            save_checkpoint(out, "epoch", acc, wrapped, optimizer, named, state, config.keep_last, ema)
    bar.close()
    save_model(acc, model, out, values=ema)
    log(f"RL: {config.total_epochs} epochs in {time.time() - t0:.0f} s; policy saved to {out}")
    ldam_states = [{k: x.state_dict() for k, x in m.items()} for m in ldams]
    return RLResult(config.total_epochs, out, out / RL_LOG, time.time() - t0, history, config, ldam_states)


def _step_index(config: RLConfig, epoch: int, inner: int, update: int) -> int:
    """The run-wide index of one optimizer step (the same after a resume)."""
    per_epoch = config.inner_epochs * config.updates_per_epoch
    return epoch * per_epoch + inner * config.updates_per_epoch + update


def ema_decay(config: RLConfig, step: int) -> float | None:
    """The EMA decay applied after optimizer step ``step`` (0-based), or None when the EMA skips it.

    As Flow-GRPO's EMA: every ``rl.ema_every``-th step, with the decay ramped as ``min(rl.ema, (1 + s) / (10 +
    s))`` so that the first updates follow the policy closely.
    """
    if config.ema == 0 or (step + 1) % config.ema_every:
        return None
    return min(config.ema, (1 + step) / (10 + step))


def _lr(config: RLConfig, epoch: int, inner: int, update: int) -> float:
    """The learning rate of one optimizer step: ``rl.lr`` constant, or cosine to 0 over the run's steps."""
    if config.lr_schedule == "constant":
        return config.lr
    per_epoch = config.inner_epochs * config.updates_per_epoch
    return warmup_cosine(
        _step_index(config, epoch, inner, update), config.lr, 0, config.total_epochs * per_epoch
    )


def _update(
    wrapped,
    policy,
    model,
    ro: Rollout,
    config: RLConfig,
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
    n = len(keep)
    steps = config.trained_steps
    if cache is not None:
        uncond = cache.uncond
    else:
        with torch.no_grad(), acc.autocast():  # as in the rollout
            uncond = outside_training(acc, wrapped, model.condition, model.encode_prompts([None]))
    kept = torch.tensor(keep, dtype=torch.long)
    totals: dict[str, float] = {}
    count, grad_norms, skips = 0, [], []
    for inner in range(config.inner_epochs):
        order = torch.randperm(
            n, generator=torch.Generator().manual_seed(derived_seed(config.seed, epoch, 3, inner))
        )
        chunks = [c for c in kept[order].chunk(min(config.updates_per_epoch, n)) if len(c)]
        for update, chunk in enumerate(chunks):
            for group in optimizer.param_groups:  # before the backward passes: DeepSpeed steps in the last
                group["lr"] = _lr(config, epoch, inner, update)
            micro = list(chunk.split(config.micro_batch))
            n_backward = len(micro) * len(steps)
            done = 0
            for mb in micro:
                idx = mb.tolist()
                batch = prompt_conditions(model, [ro.prompts[i] for i in idx], cache)
                eps = ro.ldam_eps[idx] if ro.ldam_eps is not None else None
                adv = ro.advantages[idx]
                for j in steps:
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
                            logp,
                            ro.log_probs[idx, j],
                            adv,
                            config.clip_range,
                            mean,
                            ref_mean,
                            std,
                            phase.beta,
                        )
                        backward(acc, wrapped, loss / n_backward, last)
                    for k, v in st.items():
                        totals[k] = totals.get(k, 0.0) + v
                    count += 1
            # the norm is of the reduced gradient; agreeing on it keeps the processes in step regardless.
            # DeepSpeed: the engine stepped (or skipped a non-finite gradient) in the last backward already
            norm = grad_norm(acc, params, config.grad_clip)
            finite = all_processes_agree(acc, math.isfinite(norm))
            if finite:
                optimizer.step()
                grad_norms.append(norm)
            else:
                acc.print(f"RL epoch {epoch}: non-finite gradient (norm {norm}), update skipped")
            skips.append(not finite)
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                decay = ema_decay(config, _step_index(config, epoch, inner, update))
                if decay is not None:
                    with torch.no_grad():
                        for e, p in zip(ema.values(), params, strict=True):
                            e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    model.eval()
    local = torch.tensor([totals[k] / max(1, count) for k in sorted(totals)], device=acc.device)
    means = acc.gather(local[None]).mean(dim=0).tolist() if totals else []
    return dict(zip(sorted(totals), means, strict=True)), grad_norms, skips
