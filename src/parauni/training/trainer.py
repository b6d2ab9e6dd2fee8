"""Stages I and II: flow-matching training of the queries + LIM (+ the DiT), under ``accelerate``.

The loop reads top to bottom (nanoGPT style) and runs unchanged on one CPU or under ``accelerate launch``:

    for each step: lr = warm-up then cosine;  for each micro-batch: the step's example indices ->
    inputs + captions (10% dropped to the unconditional template) -> t, noise -> flow loss -> backward;
    clip the gradient norm; AdamW step; log; checkpoint every N steps.

Every random draw of a step (data order, dropout, t, noise) is derived from ``(seed, step, micro, rank)``,
and a checkpoint holds the trained tensors, the optimizer state and the step, so ``resume`` continues
exactly where an interrupted run stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import TrainableConfig, save_yaml
from ..diffusion.flow import sample_timesteps
from ..models.parauni import CheckpointError, ParaUni
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
MAX_BAD_STEPS = 5


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


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


# ------------------------------------------------------------------------------------------- checkpoints
def trainable_tensors(model: ParaUni) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by name (what a step checkpoint must keep besides the optimizer)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: Path, model: ParaUni, optimizer: torch.optim.Optimizer, step: int, keep_last: int
) -> Path:
    """Write ``checkpoints/step_N`` atomically (a temporary folder renamed when complete); prune old ones."""
    root = folder / CHECKPOINT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_tensors(model), str(tmp / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete step checkpoint of a run folder, or None."""
    done = [p for p in sorted((folder / CHECKPOINT_DIR).glob("step_*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, model: ParaUni, optimizer: torch.optim.Optimizer) -> int:
    """Restore trained tensors (strict over what trains) and the optimizer; returns the step to resume at."""
    state = load_file(str(path / "trainable.safetensors"))
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match what trains now (was the stage or config changed?): missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(state[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


# ------------------------------------------------------------------------------------------- the loop
def train(
    model: ParaUni,
    source,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    accelerator=None,
) -> TrainResult:
    """Train one stage and save the result to ``out_dir`` (a model folder ``parauni generate`` reads).

    Args:
        model: a ParaUni model (its trainable parts are set from ``cfg.stage``), or any model with the same
            training interface (``encode_prompts``, ``forward``, ``param_groups``, ``encode_images``,
            ``save_pretrained``), such as the shapes world's Stage-0 text-to-image model (stage 0).
        source: an object with ``examples(indices, seed) -> (inputs, captions)`` and ``encoded`` (bool:
            inputs are already in the DiT's space; otherwise they are pixels and go through the model's VAE).
        resume: continue from the newest checkpoint in ``out_dir/checkpoints`` if there is one.
    """
    from accelerate import Accelerator

    out_dir = Path(out_dir)
    acc = accelerator or Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum
    )
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"train.batch_size={cfg.batch_size} is not divisible by {world} process(es) x "
            f"train.grad_accum={cfg.grad_accum}"
        )
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if cfg.stage in (1, 2):
        model.set_trainable(stage_trainable(cfg.stage, model.config.trainable))
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
    start = 0
    if resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        start = load_checkpoint(ckpt, model, optimizer)
        acc.print(f"resuming from {ckpt} at step {start}")
    wrapped, optimizer = acc.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter of the model requires a gradient")
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out_dir / "train_config.yaml")
    log_path = out_dir / LOG_FILE
    if acc.is_main_process and start == 0 and log_path.exists():
        log_path.unlink()
    t0, bad_in_a_row, loss_value, grad_norm = time.time(), 0, float("nan"), float("nan")
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
        losses = []
        for m in range(cfg.grad_accum):
            first = step * cfg.batch_size + (m * world + rank) * micro
            inputs, captions = source.examples(list(range(first, first + micro)), seed=cfg.seed)
            gen = _step_generator(cfg.seed, step, m, rank)
            drop = (torch.rand(micro, generator=gen) < cfg.caption_dropout).tolist()
            captions = [None if d else c for c, d in zip(captions, drop, strict=True)]
            t = sample_timesteps(micro, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, generator=gen)
            with torch.no_grad():
                x0 = inputs if source.encoded else model.encode_images(inputs.to(model.device))
            noise = torch.randn(x0.shape, generator=gen)
            batch = model.encode_prompts(captions)
            with acc.accumulate(wrapped):
                loss = wrapped(batch, x0.to(model.device), t.to(model.device), noise.to(model.device))
                finite = bool(torch.isfinite(loss))
                if finite:
                    acc.backward(loss)
                losses.append(loss.detach().float())
                if acc.sync_gradients:
                    grad_norm = _clip(acc, params, cfg.grad_clip) if finite else float("nan")
                    if finite and math.isfinite(grad_norm):
                        optimizer.step()
                        bad_in_a_row = 0
                    else:
                        bad_in_a_row += 1
                        acc.print(f"step {step}: non-finite loss or gradient, step skipped")
                    optimizer.zero_grad(set_to_none=True)
        if bad_in_a_row >= MAX_BAD_STEPS:
            raise RuntimeError(
                f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                "lower train.lr or use train.mixed_precision=no / bf16 instead of fp16"
            )
        loss_value = float(acc.gather(torch.stack(losses).mean()[None]).mean())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            with log_path.open("a") as f:
                row = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "seconds": time.time() - t0,
                }
                f.write(json.dumps(row) + "\n")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_checkpoint(out_dir, acc.unwrap_model(wrapped), optimizer, step + 1, cfg.keep_last)
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(wrapped).save_pretrained(out_dir)
    return TrainResult(cfg.steps, loss_value, time.time() - t0, out_dir, log_path)


def _clip(acc, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip (when max_norm > 0) and return the total gradient norm."""
    if max_norm > 0:
        return float(acc.clip_grad_norm_(params, max_norm))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0
