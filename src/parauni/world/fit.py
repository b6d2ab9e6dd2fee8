"""One training loop for the world's small Stage-0 models (VLM, autoencoder, text encoder, CLIP, aesthetic MLP).

The loop is the same for all of them; what differs is the loss of a step, which a model's module passes in:

    for each step: lr = warm-up then cosine;  loss, metrics = step_loss(step);  backward;  clip the gradient
    norm;  AdamW step;  after_step();  every ``save_every`` steps and at the end: an atomic checkpoint
    (``work/checkpoints/step_<N>``, written and verified by :mod:`parauni.training.checkpoint`, as every
    training loop of the library is).

The optimiser and schedule are the package's (:mod:`parauni.utils.optim`). The checkpoints are this loop's
own: the whole module (its tied weights once) and the optimiser, from one process, which is what a killed
``parauni world pretrain`` resumes from.

Every random draw of a step comes from generators seeded by ``(seed, step)``
(:func:`parauni.utils.seeds.stream_seed`): ``step_loss`` builds its own, and the loop seeds torch's global
generator the same way, because dropout layers and any draw inside a model read only that one. So a run
killed at any point and resumed from its last checkpoint ends with the same weights as one that was never
interrupted."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from tqdm.auto import tqdm

from ..training.checkpoint import (
    STATE_FILE,
    SingleProcess,
    atomic_checkpoint,
    checkpoint_name,
    intact_checkpoint,
    remove_partial_checkpoints,
)
from ..training.distributed import OPTIMIZER_FILE
from ..utils.files import read_json
from ..utils.optim import adamw as build_adamw
from ..utils.optim import decay_groups, set_lr, warmup_cosine
from ..utils.run_files import CHECKPOINT_DIR, WEIGHTS_FILE
from ..utils.seeds import stream_seed
from .config import FitConfig


def adamw(module: nn.Module, s: FitConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (none on biases, norms and other 1-D tensors)."""
    return build_adamw(decay_groups(module.parameters(), s.weight_decay), s.lr, s.betas)


def _save(work: Path, module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Write ``work/checkpoints/step_<N>`` atomically (:func:`parauni.training.checkpoint.atomic_checkpoint`,
    with its manifest), keeping only the newest."""
    name = checkpoint_name("step", state["step"])
    with atomic_checkpoint(work / CHECKPOINT_DIR, name, SingleProcess(), keep_last=1) as tmp:
        save_model(module, str(tmp / WEIGHTS_FILE))  # handles tied weights
        torch.save(opt.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state))


def _load(
    work: Path, module: nn.Module, opt: torch.optim.Optimizer, say: Callable[[str], None]
) -> dict | None:
    """Restore the newest intact checkpoint in ``work`` (a damaged one is named and passed over); None if there
    is none."""
    remove_partial_checkpoints(work / CHECKPOINT_DIR)
    ckpt = intact_checkpoint(work, "step", say)
    if ckpt is None:
        return None
    load_model(module, str(ckpt / WEIGHTS_FILE))
    opt.load_state_dict(torch.load(ckpt / OPTIMIZER_FILE, weights_only=True))
    return read_json(ckpt / STATE_FILE, "checkpoint state")


def fit(
    name: str,
    module: nn.Module,
    step_loss: Callable[[int], tuple[torch.Tensor, dict]],
    schedule: FitConfig,
    work: str | Path | None,
    seed: int = 0,
    save_every: int = 100,
    after_step: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``module`` for ``schedule.steps`` steps of ``step_loss(step) -> (loss, metrics)``, resuming from
    the checkpoint in ``work`` if there is one (None: a new temporary folder, nothing to resume).

    Returns ``{"curve": [{"step", "loss", **metrics}, ...], "seconds": training seconds over all runs}``; the
    module is left in eval mode with the final weights.
    """
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="parauni-fit-"))
    opt = adamw(module, schedule)
    state = _load(work, module, opt, tqdm.write) or {"step": 0, "curve": [], "seconds": 0.0}
    module.train()
    t0, start = time.time(), state["step"]
    bar = tqdm(total=schedule.steps, initial=start, desc=f"stage 0: {name}", disable=not progress)
    for step in range(start, schedule.steps):
        # the global generator, not one passed in: dropout and any other draw of the model read it
        torch.manual_seed(stream_seed(seed, step))
        set_lr(opt, warmup_cosine(step, schedule.lr, schedule.warmup, schedule.steps))
        loss, metrics = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), schedule.grad_clip)
        opt.step()
        if after_step is not None:
            after_step()
        state["curve"].append(
            {"step": step, "loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1 == schedule.steps
        if done or (save_every and (step + 1) % save_every == 0):
            state.update(step=step + 1, seconds=state["seconds"] + time.time() - t0)
            t0 = time.time()
            _save(work, module, opt, state)
    bar.close()
    module.eval()
    return {"curve": state["curve"], "seconds": state["seconds"]}
