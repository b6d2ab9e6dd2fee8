"""Stages I and II: flow-matching training of the queries + LIM (+ the DiT), under ``accelerate``.

The loop reads top to bottom (nanoGPT style) and runs unchanged on one CPU or under ``accelerate launch``
(DDP, FSDP2 or DeepSpeed ZeRO-2, any number of processes; ``configs/accelerate/``, ``distributed.py``):

    for each step: lr = warm-up then cosine;  for each micro-batch: the step's example positions ->
    inputs + captions (10% dropped to the unconditional template) -> t, noise -> flow loss (+ the optional
    condition distillation toward a teacher text encoder, ``condition_distill``) -> backward;
    clip the gradient norm; AdamW step (skipped, on every process, when a loss or the gradient is not
    finite); log; checkpoint every N steps.

Every random draw of an example (caption dropout, t, noise) comes from a generator seeded by ``(seed, its
position in the data stream)``, so a run gives the same result on any number of processes and with any
gradient accumulation for the same global batch (up to float summation order). A checkpoint (``checkpoint.py``)
holds the trained tensors, the optimizer state, the step, the data position, the learning-rate schedule, the
count of skipped steps and every process's RNG state, so ``resume`` continues exactly where an interrupted run
stopped, from the newest checkpoint that is intact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainableConfig
from ..diffusion.flow import Distillation, sample_timesteps
from ..errors import ConfigError
from ..models.parauni import ParaUni
from ..utils.optim import adamw, set_lr, warmup_cosine
from ..utils.run_files import TRAIN_LOG as LOG_FILE
from ..utils.seeds import stream_seed
from .checkpoint import trim_train_log
from .config import TrainConfig
from .distributed import all_processes_agree, grad_norm
from .loop import (
    MAX_BAD_STEPS,
    Loop,
    LoopSettings,
    enable_activation_checkpointing,
    set_trainable,
    start_accelerator,
    update_ema,
)
from .run_folder import check_resume, command_line, run_fingerprint, write_run_record

__all__ = [
    "MAX_BAD_STEPS",
    "TrainResult",
    "enable_activation_checkpointing",
    "lr_at",
    "train",
    "warmup_cosine",
]

# captions (None = unconditional) -> (states (B, S, C), mask (B, S)) of the DiT's pretraining text encoder
Teacher = Callable[[list[str | None]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainResult:
    """What a finished stage reports."""

    steps: int
    final_loss: float
    seconds: float
    model_dir: Path
    log_path: Path


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of ``step`` under ``cfg`` (warm-up, then cosine)."""
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)


def stage_trainable(stage: int, current: TrainableConfig) -> TrainableConfig:
    """Stage I: queries + LIM, DiT frozen. Stage II: + the DiT (or its LoRA if one is configured)."""
    lora = current.dit_lora_rank
    return TrainableConfig(
        queries=True,
        lim=True,
        dit=stage == 2 and lora == 0,
        dit_lora_rank=lora if stage == 2 else 0,
        dit_lora_alpha=current.dit_lora_alpha,
        dit_lora_targets=list(current.dit_lora_targets),
    )


def example_draws(
    cfg: TrainConfig, positions: list[int], shape: tuple[int, ...]
) -> tuple[list[bool], torch.Tensor, torch.Tensor]:
    """Caption dropout, time and noise of the examples at ``positions`` of the data stream.

    One generator per example, seeded by ``(cfg.seed, position)``: the draws do not depend on how the global
    batch is split over processes and micro-steps. Returns (drop flags, t (B,), noise (B, *shape)).
    """
    gens = [torch.Generator().manual_seed(stream_seed(cfg.seed, p)) for p in positions]
    drop = [bool(torch.rand(1, generator=g) < cfg.caption_dropout) for g in gens]
    t = torch.cat(
        [sample_timesteps(1, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator=g) for g in gens]
    )
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return drop, t, noise


def distillation(
    cfg: TrainConfig, teacher: Teacher, captions: list[str | None], twin, device: torch.device
) -> tuple[Distillation, list[str | None]]:
    """The step's condition-distillation term, and its captions: the batch's, then (with
    ``cfg.distill_twins``) the twin of every caption that has one, ``twin(caption) -> str | None``."""
    pairs = None
    if cfg.distill_twins > 0:
        twins = [(i, twin(c)) for i, c in enumerate(captions) if c is not None]
        twins = [(i, w) for i, w in twins if w is not None]
        rows = [[i, len(captions) + k] for k, (i, _) in enumerate(twins)]
        pairs = torch.tensor(rows, dtype=torch.long).view(-1, 2).to(device)  # (P, 2)
        captions = [*captions, *(w for _, w in twins)]
    with torch.no_grad():
        states, mask = (x.to(device) for x in teacher(captions))
    return Distillation(
        states, mask, cfg.condition_distill, cfg.distill_match, pairs, cfg.distill_twins
    ), captions


# ------------------------------------------------------------------------------------------- the loop
@dataclass
class _Stage:
    """One stage's run: what every step reads."""

    model: ParaUni
    source: object
    cfg: TrainConfig
    teacher: Teacher | None
    loop: Loop
    micro: int  # examples per process and micro-step
    data_offset: int = (
        0  # where the data stream stood at step 0 (a resume with a changed batch size moves it)
    )


def _check_inputs(acc, cfg: TrainConfig, source, teacher: Teacher | None) -> int:
    """Check that ``source`` and ``teacher`` serve ``cfg`` and the batch divides over the processes. Returns
    the micro-batch (examples per process and micro-step)."""
    if cfg.distill_twins > 0 and not callable(getattr(source, "twin", None)):
        raise ConfigError(
            f"train.distill_twins={cfg.distill_twins} needs a data source with twin(caption) -> caption "
            f"(the shapes world's has one; {type(source).__name__} has none): set train.distill_twins=0"
        )
    if cfg.condition_distill > 0 and teacher is None:
        raise ConfigError(
            f"train.condition_distill={cfg.condition_distill} needs a teacher text encoder: pass "
            "train(..., teacher=captions -> (states, mask)) from Python (the world demo passes its Stage-0 "
            "text encoder), or set train.condition_distill=0"
        )
    if cfg.batch_size % (acc.num_processes * cfg.grad_accum):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by {acc.num_processes} process(es) x "
            f"train.grad_accum={cfg.grad_accum}"
        )
    return cfg.batch_size // (acc.num_processes * cfg.grad_accum)


def _loop_settings(cfg: TrainConfig, micro: int) -> LoopSettings:
    """The loop core's settings: steps, checkpoints, EMA, and the micro-batch, accumulation and clipping that
    DeepSpeed takes from the loop."""
    deepspeed = {
        "train_micro_batch_size_per_gpu": (micro, "train.batch_size / (processes x train.grad_accum)"),
        "gradient_accumulation_steps": (cfg.grad_accum, "train.grad_accum"),
        "gradient_clipping": (cfg.grad_clip, "train.grad_clip"),
    }
    return LoopSettings(
        "step", cfg.steps, cfg.save_every, cfg.keep_last, cfg.ema, cfg, "train_config.yaml", deepspeed
    )


def _schedule(cfg: TrainConfig) -> dict:
    return {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}


def _fit_whitening(run: _Stage) -> None:
    """With ``lim.whiten`` and no statistics yet (a model that has not trained), estimate them from the first
    ``lim.whiten_captions`` captions of the data stream, before any step or checkpoint is loaded: a resumed
    run starts from the same fresh model and gets the same statistics."""
    model = run.model
    lim = getattr(model, "lim", None)  # the trainer also fits the shapes world's text-to-image model
    if lim is None or not lim.whiten or lim.whitened:
        return
    n = model.config.lim.whiten_captions
    _, captions = run.source.examples(list(range(n)), seed=run.cfg.seed)
    model.fit_whitening([c for c in captions if c is not None])
    run.loop.acc.print(f"lim.whiten: the query states' statistics from {n} training captions")


def _resume(run: _Stage, resume: bool, fingerprint: dict) -> int:
    """Load the newest intact checkpoint when ``resume``; returns the step to start from (0: a fresh start)
    and sets where the data stream continues."""
    cfg, loop = run.cfg, run.loop
    say = loop.acc.print
    check = lambda ckpt: check_resume(ckpt, fingerprint, cfg.steps, loop.out, say)  # noqa: E731
    state = loop.resume_from(run.model, resume, "was the stage or config changed?", check)
    if state is None:
        return 0
    start = state["step"]
    # the data stream continues where it stopped even if the batch size was changed for the rest
    run.data_offset = state.get("examples_seen", start * cfg.batch_size) - start * cfg.batch_size
    if state.get("schedule", _schedule(cfg)) != _schedule(cfg):
        say(f"note: the lr schedule changed since {loop.ckpt}: {state['schedule']} -> {_schedule(cfg)}")
    say(f"resuming from {loop.ckpt} at step {start}")
    return start


def _micro_inputs(run: _Stage, step: int, m: int) -> tuple:
    """The loss's arguments of micro-step ``m`` of ``step``: this process's examples of the data stream, their
    inputs in the DiT's space, dropped captions, t, noise and the optional distillation term."""
    model, cfg, acc = run.model, run.cfg, run.loop.acc
    first = run.data_offset + step * cfg.batch_size + (m * acc.num_processes + acc.process_index) * run.micro
    positions = list(range(first, first + run.micro))
    inputs, captions = run.source.examples(positions, seed=cfg.seed)
    with torch.no_grad():
        # without the flow loss the images are not read: they are not encoded either
        encoded = run.source.encoded or cfg.flow_weight == 0
        x0 = inputs if encoded else model.encode_images(inputs.to(model.device))
    drop, t, noise = example_draws(cfg, positions, tuple(x0.shape[1:]))
    kept = [None if d else c for c, d in zip(captions, drop, strict=True)]
    distill = None
    if cfg.condition_distill > 0:
        twin = getattr(run.source, "twin", None)
        distill, kept = distillation(cfg, run.teacher, kept, twin, model.device)
    batch = model.encode_prompts(kept)
    args = (batch, x0.to(model.device), t.to(model.device), noise.to(model.device))
    if distill is not None or cfg.flow_weight != 1:  # (the world's Stage-0 DiT takes only args)
        args = (*args, distill, cfg.flow_weight)
    return args


def _optimizer_step(run: _Stage, step: int) -> dict:
    """One optimizer step: the loss and backward of every micro-batch, then (on the last) the clipped gradient
    norm and the step, skipped on every process when a loss or the gradient is not finite. Returns the step's
    log values (loss averaged over processes, lr, grad norm, skipped)."""
    cfg, loop = run.cfg, run.loop
    acc = loop.acc
    lr = lr_at(step, cfg)
    set_lr(loop.optimizer, lr)
    losses, finite, skipped, norm = [], True, False, float("nan")
    for m in range(cfg.grad_accum):
        args = _micro_inputs(run, step, m)
        with acc.accumulate(loop.wrapped):
            loss = loop.wrapped(*args)
            finite = finite and bool(torch.isfinite(loss))
            # backward even for a non-finite loss: every DDP process must join the gradient all-reduce,
            # and the decision below to skip the step is taken by all of them together
            acc.backward(loss)
            losses.append(loss.detach().float())
            if acc.sync_gradients:
                # DeepSpeed: the engine has already stepped inside backward (or skipped a non-finite
                # gradient; its norm is then inf) and optimizer.step / zero_grad do nothing
                norm = grad_norm(acc, loop.params, cfg.grad_clip)
                finite = all_processes_agree(acc, finite)
                skipped = loop.step(finite, norm, f"step {step}: non-finite loss or gradient")
                if finite and not skipped:
                    update_ema(loop.ema, loop.named, cfg.ema)
                loop.optimizer.zero_grad(set_to_none=True)
    loss_value = float(acc.gather(torch.stack(losses).mean()[None]).mean())
    return {"loss": loss_value, "lr": lr, "grad_norm": norm, "skipped": skipped}


def _checkpoint_state(run: _Stage, step: int, lr: float, fingerprint: dict) -> dict:
    """What a checkpoint after ``step`` holds besides the tensors: the position in the run and the data."""
    return {
        "step": step + 1,
        "examples_seen": run.data_offset + (step + 1) * run.cfg.batch_size,
        "schedule": _schedule(run.cfg),
        "lr": lr,
        "bad_in_a_row": run.loop.bad_in_a_row,
        "num_processes": run.loop.acc.num_processes,
        "run": fingerprint,
    }


def _open_log(run: _Stage, start: int) -> Path:
    """The run folder and its log, which holds exactly the steps before ``start``."""
    loop = run.loop
    log_path = loop.out / LOG_FILE
    loop.open_folder()
    if loop.acc.is_main_process:
        if start == 0 and log_path.exists():
            log_path.unlink()
        trim_train_log(loop.out, start)  # a killed run logged steps after its last checkpoint
    loop.acc.wait_for_everyone()
    return log_path


def train(
    model: ParaUni,
    source,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    accelerator=None,
    teacher: Teacher | None = None,
) -> TrainResult:
    """Train one stage and save the result to ``out_dir`` (a model folder ``parauni generate`` reads).

    Args:
        model: a ParaUni model (its trainable parts are set from ``cfg.stage``), or any model with the same
            training interface (``encode_prompts``, ``forward``, ``param_groups``, ``encode_images``,
            ``save_pretrained``), such as the shapes world's Stage-0 text-to-image model (stage 0).
        source: an object with ``examples(indices, seed) -> (inputs, captions)`` and ``encoded`` (bool:
            inputs are already in the DiT's space; otherwise they are pixels and go through the model's VAE).
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` if there is one.
        accelerator: an ``accelerate.Accelerator`` (default: one built from ``cfg.mixed_precision`` and
            ``cfg.grad_accum``, which picks up ``accelerate launch``'s processes).
        teacher: captions (``None`` = unconditional) -> (states (B, S, C), mask (B, S)) of the text encoder
            the DiT was pretrained with; needed when ``cfg.condition_distill > 0``, whose loss term pulls the
            condition towards these states (the shapes world passes its Stage-0 text encoder).

    Raises:
        TrainingDiverged: ``MAX_BAD_STEPS`` steps in a row had a non-finite loss or gradient.
    """
    settings = {"mixed_precision": cfg.mixed_precision, "gradient_accumulation_steps": cfg.grad_accum}
    acc = start_accelerator(model, "parauni train", accelerator, **settings)
    micro = _check_inputs(acc, cfg, source, teacher)
    trainable = stage_trainable(cfg.stage, model.config.trainable) if cfg.stage in (1, 2) else None
    set_trainable(model, trainable, cfg.activation_checkpointing)
    loop = Loop(acc, Path(out_dir), _loop_settings(cfg, micro))
    model.train()
    optimizer = adamw(model.param_groups(cfg.weight_decay), cfg.lr, cfg.betas)
    run = _Stage(model, source, cfg, teacher, loop, micro)
    _fit_whitening(run)
    fingerprint = run_fingerprint(model, cfg, source)
    start = _resume(run, resume, fingerprint)
    run.loop.prepare(model, model, optimizer)
    log_path = _open_log(run, start)
    t0, row = time.time(), {"loss": float("nan")}
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"stage {cfg.stage}",
        disable=not (progress and acc.is_main_process),
    )
    for step in range(start, cfg.steps):
        row = {"step": step, **_optimizer_step(run, step)}
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if row["skipped"] or step % cfg.log_every == 0 or step == cfg.steps - 1:
            extra = {
                "bad_in_a_row": run.loop.bad_in_a_row,
                "skipped_samples": len(getattr(source, "skipped", ())),
            }
            run.loop.write_row(log_path, {**row, **extra, "seconds": time.time() - t0})
        run.loop.check_divergence(
            "steps",
            f"loss or gradient (last at step {step}; see {log_path}); lower train.lr, or use "
            "train.mixed_precision=no / bf16 instead of fp16",
        )
        if run.loop.checkpoint_due(step):
            run.loop.save(_checkpoint_state(run, step, row["lr"], fingerprint))
    bar.close()
    run.loop.finish(model, keep_raw=True)  # the last raw weights beside the EMA ones that the folder gets
    if acc.is_main_process:
        record = {"stage": cfg.stage, "steps": cfg.steps, "final_loss": row["loss"]}
        write_run_record(run.loop.out, {**record, "command": command_line(), "settings": fingerprint})
    return TrainResult(cfg.steps, row["loss"], time.time() - t0, run.loop.out, log_path)
