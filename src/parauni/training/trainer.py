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

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainableConfig, save_yaml
from ..diffusion.flow import Distillation, sample_timesteps
from ..errors import ConfigError, TrainingDiverged
from ..models.parauni import ParaUni
from ..utils.files import save_safetensors
from ..utils.run_files import CHECKPOINT_DIR
from ..utils.run_files import TRAIN_LOG as LOG_FILE
from .checkpoint import (
    RAW_FILE,
    init_ema,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
    trim_train_log,
)
from .config import TrainConfig
from .distributed import (
    all_processes_agree,
    check_backend,
    configure_deepspeed,
    grad_norm,
    load_optimizer,
    prepare,
    save_model,
    whole_tensors,
)
from .run_folder import check_resume, command_line, run_fingerprint, write_run_record

MAX_BAD_STEPS = 5
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


def warmup_cosine(step: int, lr: float, warmup: int, steps: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to lr * min_ratio."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = lr * min_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + p) for p in positions]
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
    ``cfg.distill_twins``) the binding twin of every caption that has one, ``twin(caption) -> str | None``."""
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


# ------------------------------------------------------------------------------------------- distribution
def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of keeping them: the DiT's transformer blocks
    (diffusers' ``enable_gradient_checkpointing``) and, for ParaUni, the LIM connector's layers.

    The frozen VLM stays in eval mode, where Hugging Face models do not checkpoint; its activations are kept
    only when the queries train (their gradient flows back through it).
    """
    dit = getattr(model, "dit", None)
    if dit is None or not getattr(dit, "_supports_gradient_checkpointing", False):
        raise ConfigError(
            f"activation checkpointing needs a diffusers DiT at model.dit; {type(model).__name__} has "
            f"{type(dit).__name__}: set activation_checkpointing=false"
        )
    dit.enable_gradient_checkpointing()
    connector = getattr(getattr(model, "lim", None), "connector", None)
    if connector is not None:
        connector.gradient_checkpointing = True


# ------------------------------------------------------------------------------------------- checkpoints
def _schedule(cfg: TrainConfig) -> dict:
    return {"lr": cfg.lr, "warmup": cfg.warmup, "steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor] | None, named: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, after an optimizer step."""
    if ema is None:
        return
    for name, p in named.items():
        ema[name].lerp_(p.detach(), 1 - decay)


# ------------------------------------------------------------------------------------------- the loop
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
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    acc = accelerator or Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum
    )
    check_backend(acc, "parauni train", model)
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
    num_processes, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (num_processes * cfg.grad_accum):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by {num_processes} process(es) x "
            f"train.grad_accum={cfg.grad_accum}"
        )
    micro = cfg.batch_size // (num_processes * cfg.grad_accum)
    configure_deepspeed(
        acc,
        {
            "train_micro_batch_size_per_gpu": (micro, "train.batch_size / (processes x train.grad_accum)"),
            "gradient_accumulation_steps": (cfg.grad_accum, "train.grad_accum"),
            "gradient_clipping": (cfg.grad_clip, "train.grad_clip"),
        },
    )
    if cfg.stage in (1, 2):
        model.set_trainable(stage_trainable(cfg.stage, model.config.trainable))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    start, data_offset, bad_in_a_row = 0, 0, 0
    fingerprint = run_fingerprint(model, cfg, source)
    ckpt = resume_checkpoint(out_dir, "step", acc) if resume else None
    if ckpt is not None:
        check_resume(ckpt, fingerprint, cfg.steps, out_dir, acc.print)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        state = load_checkpoint(ckpt, trained, rank, "was the stage or config changed?")
        start, bad_in_a_row = state["step"], state.get("bad_in_a_row", 0)
        # the data stream continues where it stopped even if the batch size was changed for the rest
        data_offset = state.get("examples_seen", start * cfg.batch_size) - start * cfg.batch_size
        if state.get("schedule", _schedule(cfg)) != _schedule(cfg):
            acc.print(f"note: the lr schedule changed since {ckpt}: {state['schedule']} -> {_schedule(cfg)}")
        acc.print(f"resuming from {ckpt} at step {start}")
    wrapped, optimizer = prepare(acc, model, optimizer, model)
    if ckpt is not None:
        load_optimizer(acc, wrapped, optimizer, ckpt, state.get("num_processes", num_processes))
    named = {
        n: p for n, p in model.named_parameters() if p.requires_grad
    }  # after prepare: FSDP's are DTensors
    params = list(named.values())
    if not params:
        raise ConfigError("nothing to train: no parameter of the model requires a gradient")
    ema = init_ema(named, ckpt, cfg.ema)
    log_path = out_dir / LOG_FILE
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "train_config.yaml")
        remove_partial_checkpoints(out_dir / CHECKPOINT_DIR)
        if start == 0 and log_path.exists():
            log_path.unlink()
        trim_train_log(out_dir, start)  # a killed run logged steps after its last checkpoint
    acc.wait_for_everyone()
    t0, loss_value, norm = time.time(), float("nan"), float("nan")
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"stage {cfg.stage}",
        disable=not (progress and acc.is_main_process),
    )
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses, finite, skipped = [], True, False
        for m in range(cfg.grad_accum):
            first = data_offset + step * cfg.batch_size + (m * num_processes + rank) * micro
            positions = list(range(first, first + micro))
            inputs, captions = source.examples(positions, seed=cfg.seed)
            with torch.no_grad():
                # without the flow loss the images are not read: they are not encoded either
                x0 = (
                    inputs
                    if source.encoded or cfg.flow_weight == 0
                    else model.encode_images(inputs.to(model.device))
                )
            drop, t, noise = example_draws(cfg, positions, tuple(x0.shape[1:]))
            kept = [None if d else c for c, d in zip(captions, drop, strict=True)]
            distill = None
            if cfg.condition_distill > 0:
                distill, kept = distillation(cfg, teacher, kept, getattr(source, "twin", None), model.device)
            batch = model.encode_prompts(kept)
            with acc.accumulate(wrapped):
                args = (batch, x0.to(model.device), t.to(model.device), noise.to(model.device))
                if distill is not None or cfg.flow_weight != 1:  # (the world's Stage-0 DiT takes only args)
                    args = (*args, distill, cfg.flow_weight)
                loss = wrapped(*args)
                finite = finite and bool(torch.isfinite(loss))
                # backward even for a non-finite loss: every DDP process must join the gradient all-reduce,
                # and the decision below to skip the step is taken by all of them together
                acc.backward(loss)
                losses.append(loss.detach().float())
                if acc.sync_gradients:
                    # DeepSpeed: the engine has already stepped inside backward (or skipped a non-finite
                    # gradient; its norm is then inf) and optimizer.step / zero_grad do nothing
                    norm = grad_norm(acc, params, cfg.grad_clip)
                    finite = all_processes_agree(acc, finite)
                    if finite and acc.scaler is not None:
                        optimizer.step()  # fp16: the loss scaler skips an overflowing step and lowers its scale
                        skipped = acc.optimizer_step_was_skipped
                    elif finite and math.isfinite(norm):
                        optimizer.step()
                    else:
                        skipped = True
                        bad_in_a_row += 1
                        acc.print(f"step {step}: non-finite loss or gradient (norm {norm}), step skipped")
                    if finite and not skipped:
                        bad_in_a_row = 0
                        update_ema(ema, named, cfg.ema)
                    optimizer.zero_grad(set_to_none=True)
        loss_value = float(acc.gather(torch.stack(losses).mean()[None]).mean())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if acc.is_main_process and (skipped or step % cfg.log_every == 0 or step == cfg.steps - 1):
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": norm,
                "skipped": skipped,
                "bad_in_a_row": bad_in_a_row,
                "skipped_samples": len(getattr(source, "skipped", ())),  # corrupt data samples so far
                "seconds": time.time() - t0,
            }
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if bad_in_a_row >= MAX_BAD_STEPS:
            raise TrainingDiverged(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}; see "
                f"{log_path}); lower train.lr, or use train.mixed_precision=no / bf16 instead of fp16"
            )
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            state = {
                "step": step + 1,
                "examples_seen": data_offset + (step + 1) * cfg.batch_size,
                "schedule": _schedule(cfg),
                "lr": lr,
                "bad_in_a_row": bad_in_a_row,
                "num_processes": num_processes,
                "run": fingerprint,
            }
            save_checkpoint(out_dir, "step", acc, wrapped, optimizer, named, state, cfg.keep_last, ema)
    bar.close()
    if ema is not None:  # the last raw weights, beside the EMA ones that the model folder gets
        raw = whole_tensors(acc, named)
        if acc.is_main_process:
            save_safetensors(raw, out_dir / RAW_FILE)
    save_model(acc, model, out_dir, ema)
    if acc.is_main_process:
        record = {"stage": cfg.stage, "steps": cfg.steps, "final_loss": loss_value}
        write_run_record(out_dir, {**record, "command": command_line(), "settings": fingerprint})
    return TrainResult(cfg.steps, loss_value, time.time() - t0, out_dir, log_path)
