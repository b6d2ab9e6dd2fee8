"""Stage III: Flow-GRPO on a ParaUni model, with LDAM and a sequential reward curriculum, under ``accelerate``.

One epoch, read top to bottom:

    prompts (P) -> each repeated k times (N = P k samples, split evenly over the processes)
    rollout: per sample, SDE sampling with CFG from seeded noise, keeping every latent x_0..x_T and the
             log-probability of every step; LDAM's perturbation noise (when active) is drawn and stored
    rewards: every reward model scores the decoded images; the phase's weighted sum is the reward optimised
    advantages: (r - mean of the prompt's group) / (std + 1e-4), clipped to +-5 (gathered over processes)
    update: for the trained steps (the first 99%), recompute the step's log-probability under the current
            policy (same stored condition noise) -> clipped policy loss + beta x KL to the reference policy;
            accumulate, clip the gradient norm, AdamW step (``updates_per_epoch`` times per pass); with
            ``rl.objective=nft``, DiffusionNFT's flow-matching loss on the final latents instead (:mod:`.nft`)
    LDAM: record the phase reward's epoch mean and the gradient norm; maybe trigger a perturbation
    held-out (``rl.eval_prompts``, before the first epoch, after each phase's last and every ``rl.eval_every``):
            the same prompts from the same noise, sampled with the ODE and scored (:mod:`.evaluate`)

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models.lim import zone_layers
from ..models.parauni import ParaUni
from ..training.distributed import (
    ModelCalls,
    all_processes_agree,
    backward,
    grad_norm,
    like,
    outside_training,
    save_model,
)
from ..training.loop import (
    MAX_BAD_STEPS,
    Loop,
    LoopSettings,
    set_trainable,
    start_accelerator,
    trained_tensors,
    update_ema,
)
from ..utils.optim import adamw, decay_groups, set_lr, warmup_cosine
from ..utils.run_files import RL_EVAL_LOG, RL_LOG
from ..utils.seeds import Purpose, purpose_generator
from .config import PhaseConfig, RLConfig
from .evaluate import eval_due, evaluate, held_out
from .ldam import LDAM, Perturbation
from .nft import forward_noised, nft_loss, optimality, training_times, velocity_kl
from .objective import (
    PolicyStep,
    group_advantages,
    grpo_loss,
    prompt_groups,
    prompt_standard_error,
    swapped,
    update_samples,
)
from .prompts import Prompts
from .rollout import ConditionCache, Rollout, prompt_conditions, rollout

__all__ = ["MAX_BAD_STEPS", "RLResult", "RewardFn", "ema_decay", "train_rl"]

# rewards(images (N, 3, H, W) in [-1, 1], prompts, metadata) -> {reward name: N floats}
RewardFn = Callable[[torch.Tensor, list[str], list[dict | None]], dict[str, list[float]]]


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
    evals: list[dict] = field(default_factory=list)  # the held-out evaluations (rl.eval_prompts), in order
    copied: list[str] | None = (
        None  # frozen parts copied into the folder (``rl.run.run_rl``'s self_contained)
    )


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


@dataclass
class _Run:
    """One Stage-III run: what every epoch reads."""

    model: ParaUni
    config: RLConfig
    ldams: list[dict[str, LDAM]]  # per phase, its LDAMs by signal
    policy: PolicyStep
    loop: Loop
    n_local: int  # samples of an epoch on this process
    epochs: range  # the epochs to run: after a resume, from the one after the checkpoint's
    reference: list[torch.Tensor] = field(default_factory=list)  # the reference policy's trained tensors
    history: list[dict] = field(default_factory=list)  # the log rows of the epochs done
    evals: list[dict] = field(default_factory=list)  # the held-out evaluations done (rl.eval_prompts)


@dataclass
class _Epoch:
    """One epoch's values, from the rollout to the log row."""

    index: int
    phase: PhaseConfig
    monitors: dict[str, LDAM]
    perturbation: Perturbation
    items: list
    started: float
    ro: Rollout | None = None
    cache: ConditionCache | None = None
    gathered: dict[str, torch.Tensor] = field(default_factory=dict)  # reward name -> (N,) over processes
    total: torch.Tensor | None = None  # (N,) the phase's weighted reward
    keep: list[int] | None = None  # local samples the update trains on
    inner: int = 0  # the inner epoch the update is in
    old: list[torch.Tensor] | None = None  # rl.objective=nft: the rollout policy's trained tensors (None: the
    # update's only step, where they are the current ones)
    grad_norms: list[float] = field(default_factory=list)
    skips: list[bool] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- the run
def _loop_settings(config: RLConfig) -> LoopSettings:
    """The loop core's settings: epochs, checkpoints, EMA, and what Stage III fixes under DeepSpeed."""
    deepspeed = {
        "train_micro_batch_size_per_gpu": (config.micro_batch, "rl.micro_batch"),
        "gradient_accumulation_steps": (1, "Stage III accumulates each update's micro-batches itself"),
        "gradient_clipping": (config.grad_clip, "rl.grad_clip"),
    }
    return LoopSettings(
        "epoch",
        config.total_epochs,
        config.save_every,
        config.keep_last,
        config.ema,
        config,
        "rl_config.yaml",
        deepspeed,
    )


def _start(model: ParaUni, config: RLConfig, out: Path, resume: bool, accelerator) -> _Run:
    """Stage III's setup: first what is Stage III's own (the LDAMs, the loop's settings, the policy step), then
    the loop core, which takes plain values: the accelerator, the trained parts (``config.trainable``; the
    reference policy kept), the optimiser, resume, prepare and the run folder."""
    ldams = [_phase_ldams(model, config, phase) for phase in config.phases]
    settings = _loop_settings(config)
    policy = PolicyStep(model, config, [])
    acc = start_accelerator(model, "parauni rl", accelerator, mixed_precision=config.mixed_precision)
    n_total = config.samples_per_epoch
    if n_total % acc.num_processes:
        raise ConfigError(
            f"rl.prompts_per_epoch x rl.group_size = {n_total} samples must divide over {acc.num_processes} "
            "processes"
        )
    if (config.eval_prompts * config.eval_images) % acc.num_processes:
        raise ConfigError(
            f"rl.eval_prompts x rl.eval_images = {config.eval_prompts * config.eval_images} held-out images must "
            f"divide over {acc.num_processes} processes"
        )
    set_trainable(model, config.trainable, config.activation_checkpointing)
    loop = Loop(acc, out, settings)
    named = trained_tensors(model)
    reference = [p.detach().clone() for p in named.values()]
    groups = decay_groups(named.values(), config.weight_decay, config.decay_1d)  # (ParaUni.param_groups')
    optimizer = adamw(groups, config.lr, config.betas)
    run = _Run(model, config, ldams, policy, loop, n_total // acc.num_processes, range(config.total_epochs))
    _resume(run, resume)
    loop.prepare(model, ModelCalls(model), optimizer)
    # after prepare the parameters may be new objects (FSDP: DTensor shards); the reference follows them
    run.reference = [like(p, r) for p, r in zip(loop.params, reference, strict=True)]
    loop.open_folder()
    if acc.is_main_process:
        # the log holds exactly the epochs done: none on a fresh start, the checkpoint's on a resume
        (loop.out / RL_LOG).write_text("".join(json.dumps(r) + "\n" for r in run.history))
        if config.eval_prompts:
            (loop.out / RL_EVAL_LOG).write_text("".join(json.dumps(r) + "\n" for r in run.evals))
    return run


def _resume(run: _Run, resume: bool) -> None:
    """Load the newest intact checkpoint when ``resume``: the trained tensors (by the loop), every LDAM's
    state, the log so far and the epoch to start from."""
    loop = run.loop
    state = loop.resume_from(run.model, resume, "was rl.trainable changed?")
    if state is None:
        return
    for monitors, saved in zip(run.ldams, state["ldam"], strict=True):
        saved = {PHASE_SIGNAL: saved} if "rewards" in saved else saved  # written before per-reward LDAM
        for signal, ldam in monitors.items():
            ldam.load_state_dict(saved[signal])
    run.epochs, run.history = range(state["epoch"] + 1, run.epochs.stop), state["history"]
    run.evals = state.get("evals", [])  # (none in a checkpoint written before the held-out evaluation)
    loop.acc.print(f"resuming RL from {loop.ckpt} at epoch {run.epochs.start}")


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

    Each epoch is rollout -> rewards -> advantages -> update -> LDAM (see the module's docstring).

    Args:
        model: a ParaUni model (Stage II); what trains is ``config.trainable``.
        rewards: scores images -> {reward name: floats}; must return every name of ``reward_names``.
        reward_names: every reward the phases use (checked up front).
        prompts: the RL prompt source.
        resume: continue from the newest epoch checkpoint in ``out_dir``.
    """
    missing = sorted({r for p in config.phases for r in p.rewards} - set(reward_names))
    if missing:
        raise ConfigError(
            f"rl phases use rewards {missing} that are not configured; available: {reward_names}"
        )
    run = _start(model, config, Path(out_dir), resume, accelerator)
    loop, out, t0 = run.loop, run.loop.out, time.time()
    bar = tqdm(
        total=config.total_epochs,
        initial=run.epochs.start,
        desc="RL",
        disable=not (progress and loop.acc.is_main_process),
    )
    eval_items = held_out(prompts, config) if config.eval_prompts else []
    if eval_due(config, run.epochs.start) and not any(
        e["epochs_done"] == run.epochs.start for e in run.evals
    ):
        _evaluate(run, eval_items, rewards, run.epochs.start)
    for epoch in run.epochs:
        ep = _rollout(run, epoch, prompts)
        _rewards_and_advantages(run, ep, rewards)
        stats = _update(run, ep)
        row = _ldam_and_row(run, ep, stats, log)
        loop.write_row(out / RL_LOG, row)
        if eval_due(config, epoch + 1):
            _evaluate(run, eval_items, rewards, epoch + 1)
        bar.update(1)
        bar.set_postfix(
            phase=ep.phase.name, reward=f"{row['phase_reward']:.3f}", gn=f"{row['grad_norm']:.2f}"
        )
        loop.check_divergence(
            "RL updates",
            f"gradient (last in epoch {epoch}; see {out / RL_LOG}): check the rewards for NaN, lower rl.lr, "
            "or use rl.mixed_precision=no / bf16",
        )
        if loop.checkpoint_due(epoch):
            loop.save(_checkpoint_state(run, epoch))
    bar.close()
    save_model(loop.acc, model, out, values=loop.ema)  # (Loop.finish without the raw weights beside the EMA)
    log(f"RL: {config.total_epochs} epochs in {time.time() - t0:.0f} s; policy saved to {out}")
    ldam_states = [{k: x.state_dict() for k, x in m.items()} for m in run.ldams]
    return RLResult(
        config.total_epochs, out, out / RL_LOG, time.time() - t0, run.history, config, ldam_states, run.evals
    )


def _evaluate(run: _Run, items: list, rewards: RewardFn, epochs_done: int) -> None:
    """The held-out evaluation after ``epochs_done`` epochs (:mod:`.evaluate`), kept in the run and appended to
    ``RL_EVAL_LOG``: of the EMA weights when ``rl.ema`` keeps one (the model the run saves, and what Flow-GRPO
    evaluates), else of the policy."""
    config, loop = run.config, run.loop
    names = sorted({r for p in config.phases for r in p.rewards})
    weights = contextlib.nullcontext()
    if loop.ema is not None:
        weights = swapped(loop.params, [loop.ema[n] for n in loop.named])
    with weights:
        row = evaluate(run.model, items, rewards, names, config, loop.acc, loop.wrapped)
    row = {"epochs_done": epochs_done, **row}
    run.evals.append(row)
    loop.write_row(loop.out / RL_EVAL_LOG, row)


def _checkpoint_state(run: _Run, epoch: int) -> dict:
    """What an epoch checkpoint holds besides the tensors: the epoch, the log so far and every LDAM's state."""
    return {
        "epoch": epoch,
        "history": run.history,
        "evals": run.evals,
        "ldam": [{k: x.state_dict() for k, x in m.items()} for m in run.ldams],
        "bad_in_a_row": run.loop.bad_in_a_row,
        "num_processes": run.loop.acc.num_processes,
    }


# --------------------------------------------------------------------------------------------- one epoch
def _rollout(run: _Run, epoch: int, prompts: Prompts) -> _Epoch:
    """The epoch's prompts and the rollout of this process's share of its samples (perturbed by the phase's
    active LDAMs)."""
    config, loop, model = run.config, run.loop, run.model
    acc, rank = loop.acc, loop.acc.process_index
    phase_index, phase = _phase_at(config, epoch)
    monitors = run.ldams[phase_index]
    perturbation = Perturbation(list(monitors.values()))
    run.policy.zone = perturbation.zone
    ep = _Epoch(epoch, phase, monitors, perturbation, [], time.time())
    n = config.prompts_per_epoch  # tags only when the phase names some: a source without them keeps working
    ep.items = (
        prompts.epoch(config.seed, epoch, n, phase.tags)
        if phase.tags
        else prompts.epoch(config.seed, epoch, n)
    )
    indices = list(range(rank * run.n_local, (rank + 1) * run.n_local))
    groups = [i // config.group_size for i in indices]
    with acc.autocast():  # the same precision as the update's forward, so on-policy ratios stay 1
        if ConditionCache.usable(model, config):
            local_prompts = [ep.items[g][0] for g in groups]
            ep.cache = outside_training(
                acc, loop.wrapped, ConditionCache, model, local_prompts, config.rollout_batch
            )
        perturbed = perturbation if perturbation.active else None
        ep.ro = outside_training(
            acc,
            loop.wrapped,
            rollout,
            model,
            [ep.items[g] for g in groups],
            groups,
            indices,
            config,
            epoch,
            perturbed,
            False,
            ep.cache,
        )
    return ep


def _rewards_and_advantages(run: _Run, ep: _Epoch, rewards: RewardFn) -> None:
    """Score the rollout, gather the scores over processes, and set the advantages and the samples the update
    trains on."""
    config, acc, model = run.config, run.loop.acc, run.model
    rank, n_local, n_total = acc.process_index, run.n_local, config.samples_per_epoch
    ro, phase = ep.ro, ep.phase
    names = (
        sorted({r for p in config.phases for r in p.rewards})
        if config.log_all_rewards
        else sorted(phase.rewards)
    )
    scores = rewards(ro.images, ro.prompts, ro.metadata)
    local = {n: torch.tensor(scores[n], dtype=torch.float32, device=model.device) for n in names}
    ep.gathered = {n: acc.gather(v).cpu() for n, v in local.items()}
    ep.total = sum(w * ep.gathered[n] for n, w in phase.rewards.items())
    if config.group_by == "prompt":
        all_groups = prompt_groups([ep.items[i // config.group_size][0] for i in range(n_total)])
    else:
        all_groups = torch.arange(n_total) // config.group_size
    adv = group_advantages(ep.total, all_groups, config.adv_std, config.adv_clip)
    ro.advantages = adv[rank * n_local : (rank + 1) * n_local].to(model.device)
    generator = purpose_generator(config.seed, ep.index, Purpose.UPDATE_SAMPLES)
    ep.keep = update_samples(adv, n_local, rank, config.drop_zero_advantage, generator)


def _ldam_and_row(run: _Run, ep: _Epoch, stats: dict, log) -> dict:
    """Feed the epoch's phase reward and gradient norm to the phase's LDAMs (identical on every process: their
    inputs are gathered or all-reduced) and return the epoch's log row (also kept in the run's history)."""
    config, acc, phase = run.config, run.loop.acc, ep.phase
    reward_mean = float(ep.total.mean())
    norm = float(np.mean(ep.grad_norms)) if ep.grad_norms else float("nan")
    states = {
        signal: ldam.update(
            reward_mean if signal == PHASE_SIGNAL else float(ep.gathered[signal].mean()), norm
        )
        for signal, ldam in ep.monitors.items()
    }
    ldam_state = _ldam_log(states)
    _check_same_everywhere(
        acc,
        f"LDAM state of phase {phase.name!r} at epoch {ep.index}",
        {k: x.state_dict() for k, x in ep.monitors.items()},
    )
    perturbed = ep.perturbation.active
    row = {
        "epoch": ep.index,
        "phase": phase.name,
        "phase_reward": reward_mean,
        **{f"reward_{n}": float(v.mean()) for n, v in ep.gathered.items()},
        **{f"reward_{n}_std": float(v.std(unbiased=False)) for n, v in ep.gathered.items()},
        **{f"se_reward_{n}": prompt_standard_error(v, config.group_size) for n, v in ep.gathered.items()},
        "grad_norm": norm,
        "samples": config.samples_per_epoch,
        "skipped_updates": sum(ep.skips),
        "update_samples": len(ep.keep) * acc.num_processes,
        "lr": _lr(config, ep.index, config.inner_epochs - 1, config.updates_per_epoch - 1),
        "cached_conditions": ep.cache is not None,
        **stats,
        "ldam_perturbed": perturbed,
        "ldam_gamma_used": ep.perturbation.gamma_max if perturbed else 0.0,
        **{f"ldam_{k}": v for k, v in ldam_state.items()},
        "seconds": time.time() - ep.started,
    }
    run.history.append(row)
    for signal, ldam in ep.monitors.items():
        if states[signal]["triggered"] and acc.is_main_process:
            watched = "the phase reward" if signal == PHASE_SIGNAL else f"reward {signal!r}"
            log(
                f"RL epoch {ep.index}: LDAM trigger {ldam.triggers} on {watched} of phase {phase.name!r}: zone "
                f"{ldam.zone_name} (LIM layers {ldam.zone}), gamma {ldam.gamma:.4g}; the next "
                f"{config.ldam.perturb_epochs} rollout(s) perturbed"
            )
    return row


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


def _update(run: _Run, ep: _Epoch) -> dict:
    """The policy update of one epoch: inner epochs x updates, each accumulating over micro-batches and the
    trained steps, on the samples ``ep.keep`` (local indices; default all). Returns the statistics (means over
    every process); records in ``ep`` the gradient norm of every optimizer step taken and, per update, whether
    it was skipped for a non-finite gradient (on every process)."""
    config, loop, model = run.config, run.loop, run.model
    acc = loop.acc
    keep = list(range(len(ep.ro.prompts))) if ep.keep is None else ep.keep
    if not keep:
        return {}
    model.train()
    n = len(keep)
    if ep.cache is not None:
        uncond = ep.cache.uncond
    else:
        with torch.no_grad(), acc.autocast():  # as in the rollout
            uncond = outside_training(acc, loop.wrapped, model.condition, model.encode_prompts([None]))
    kept = torch.tensor(keep, dtype=torch.long)
    totals: dict[str, float] = {}
    count = 0
    if config.objective == "nft" and config.inner_epochs * min(config.updates_per_epoch, n) > 1:
        ep.old = [p.detach().clone() for p in loop.params]
    for inner in range(config.inner_epochs):
        ep.inner = inner
        order = torch.randperm(
            n, generator=purpose_generator(config.seed, ep.index, Purpose.UPDATE_ORDER, inner)
        )
        chunks = [c for c in kept[order].chunk(min(config.updates_per_epoch, n)) if len(c)]
        for update, chunk in enumerate(chunks):
            # before the backward passes: DeepSpeed steps in the last
            set_lr(loop.optimizer, _lr(config, ep.index, inner, update))
            count += _accumulate(run, ep, chunk, uncond, totals)
            # the norm is of the reduced gradient; agreeing on it keeps the processes in step regardless.
            # DeepSpeed: the engine stepped (or skipped a non-finite gradient) in the last backward already
            norm = grad_norm(acc, loop.params, config.grad_clip)
            finite = all_processes_agree(acc, math.isfinite(norm))
            skipped = loop.step(finite, norm, f"RL epoch {ep.index}: non-finite gradient")
            if not skipped:
                ep.grad_norms.append(norm)
            ep.skips.append(skipped)
            loop.optimizer.zero_grad(set_to_none=True)
            decay = ema_decay(config, _step_index(config, ep.index, inner, update))
            if loop.ema is not None and decay is not None:
                update_ema(loop.ema, loop.named, decay, form="scale_add")
    model.eval()
    local = torch.tensor([totals[k] / max(1, count) for k in sorted(totals)], device=acc.device)
    means = acc.gather(local[None]).mean(dim=0).tolist() if totals else []
    return dict(zip(sorted(totals), means, strict=True))


def _accumulate(run: _Run, ep: _Epoch, chunk: torch.Tensor, uncond: torch.Tensor, totals: dict) -> int:
    """Backward of the objective's loss on one update's samples ``chunk``, over its micro-batches and each
    one's terms (:func:`_grpo_terms` or :func:`_nft_terms`), the gradient all-reduced once, in the last
    backward; adds the loss statistics to ``totals``. Returns the number of backward passes."""
    config, acc, wrapped = run.config, run.loop.acc, run.loop.wrapped
    terms = _nft_terms if config.objective == "nft" else _grpo_terms
    micro = list(chunk.split(config.micro_batch))
    n_backward, done = len(micro) * len(config.trained_steps), 0
    for mb in micro:
        for loss_of in terms(run, ep, mb.tolist(), uncond):
            done += 1
            last = done == n_backward
            with contextlib.nullcontext() if last else acc.no_sync(wrapped):
                loss, st = loss_of()
                backward(acc, wrapped, loss / n_backward, last)
            for key, value in st.items():
                totals[key] = totals.get(key, 0.0) + value
    return done


Term = Callable[[], tuple[torch.Tensor, dict[str, float]]]  # the forward of one backward pass: (loss, stats)


def _grpo_terms(run: _Run, ep: _Epoch, idx: list[int], uncond: torch.Tensor) -> Iterator[Term]:
    """Flow-GRPO's terms of the samples ``idx``: one per trained step, the clipped policy loss of the step's
    recomputed log-probability (+ beta x KL to the reference policy, whose forward runs before the term's)."""
    config, loop, ro, beta = run.config, run.loop, ep.ro, ep.phase.beta
    acc, wrapped, policy = loop.acc, loop.wrapped, run.policy
    batch = prompt_conditions(run.model, [ro.prompts[i] for i in idx], ep.cache)
    eps = ro.ldam_eps[idx] if ro.ldam_eps is not None else None
    adv = ro.advantages[idx]
    for j in config.trained_steps:
        x, prev = ro.latents[idx, j], ro.latents[idx, j + 1]
        args = (batch, uncond, x, prev, ro.sigmas[j], ro.sigmas[j + 1], eps, ro.gamma)
        ref_mean = None
        if beta > 0:
            with torch.no_grad(), swapped(loop.params, run.reference), acc.autocast():
                _, ref_mean, _ = outside_training(acc, wrapped, policy, *args)

        def term(args=args, j=j, ref_mean=ref_mean) -> tuple[torch.Tensor, dict[str, float]]:
            logp, mean, std = wrapped(policy, *args)
            return grpo_loss(logp, ro.log_probs[idx, j], adv, config.clip_range, mean, ref_mean, std, beta)

        yield term


def _nft_terms(run: _Run, ep: _Epoch, idx: list[int], uncond: torch.Tensor) -> Iterator[Term]:
    """DiffusionNFT's terms of the samples ``idx`` (:mod:`parauni.rl.nft`): each image at
    ``len(rl.trained_steps)`` random times of the rollout's schedule with fresh forward noise, against the
    rollout policy's velocity (+ beta x the velocity's KL to the reference policy)."""
    config, loop, ro, beta = run.config, run.loop, ep.ro, ep.phase.beta
    acc, wrapped, velocity = loop.acc, loop.wrapped, run.policy.velocity
    count = len(config.trained_steps)
    ids = [acc.process_index * run.n_local + i for i in idx]  # global sample indices: the seeds
    seed = (config.seed, ep.index)
    times = training_times(
        config.nft_time_steps, count, [purpose_generator(*seed, Purpose.NFT_TIMES, i, ep.inner) for i in ids]
    )
    noises = [purpose_generator(*seed, Purpose.NFT_NOISE, i, ep.inner) for i in ids]
    batch = prompt_conditions(run.model, [ro.prompts[i] for i in idx], ep.cache)
    eps = ro.ldam_eps[idx] if ro.ldam_eps is not None else None
    x0, r = ro.latents[idx, -1], optimality(ro.advantages[idx], config.adv_clip)
    for k in range(count):
        sigma = ro.sigmas[times[:, k].to(ro.sigmas.device)]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in noises]).to(x0)
        args = (batch, uncond, forward_noised(x0, sigma, noise), sigma, eps, ro.gamma)
        v_old = _velocity_under(run, ep.old, args) if ep.old is not None else None
        v_ref = _velocity_under(run, run.reference, args) if beta > 0 else None

        def term(args=args, sigma=sigma, v_old=v_old, v_ref=v_ref) -> tuple[torch.Tensor, dict[str, float]]:
            v = wrapped(velocity, *args)
            loss, st = nft_loss(
                v, v.detach() if v_old is None else v_old, args[2], x0, sigma, r, config.nft_beta
            )
            if v_ref is not None:
                kl = velocity_kl(v, v_ref)
                loss, st["kl"] = loss + beta * kl, float(kl.detach())
            return loss, st

        yield term


def _velocity_under(run: _Run, values: list[torch.Tensor], args: tuple) -> torch.Tensor:
    """The policy's guided velocity (no gradient) with the trained tensors set to ``values`` for the call."""
    loop = run.loop
    with torch.no_grad(), swapped(loop.params, values), loop.acc.autocast():
        return outside_training(loop.acc, loop.wrapped, run.policy.velocity, *args)
