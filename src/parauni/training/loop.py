"""The loop core that every training loop of the package runs on: Stages I and II (:func:`.trainer.train`),
Stage III (:func:`parauni.rl.grpo.train_rl`) and, for its optimiser, schedule and checkpoints, the world's
Stage-0 fits (:func:`parauni.world.fit.fit`).

A loop itself reads as data -> loss -> step (nanoGPT's shape); what every loop does the same way is here once,
as small parts composed by :class:`Loop` (the shape of torchtitan's trainer: a checkpoint manager, optimiser and
schedule builders, metrics):

* the accelerator and the backend checks (:func:`start_accelerator`); the trained parts and activation
  checkpointing (:func:`set_trainable`); the optimiser and schedule (:mod:`parauni.utils.optim`);
* what the loop core takes of a run's config, as plain values each loop resolves once (:class:`LoopSettings`);
* resume and checkpoints: the newest intact checkpoint's tensors, optimiser state and EMA, and when a
  checkpoint is due (:meth:`Loop.resume_from`, :meth:`Loop.prepare`, :meth:`Loop.checkpoint_due`,
  :meth:`Loop.save`);
* the EMA of the trained tensors (:func:`update_ema`);
* the step guard: an optimizer step is taken only when the loss and gradient are finite on every process, and
  :data:`MAX_BAD_STEPS` skipped steps in a row stop the run (:meth:`Loop.step`, :meth:`Loop.check_divergence`);
* the run folder, log rows and the final save (:meth:`Loop.open_folder`, :meth:`Loop.write_row`,
  :meth:`Loop.finish`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import save_yaml
from ..errors import ConfigError, TrainingDiverged
from ..utils.files import save_safetensors
from ..utils.run_files import CHECKPOINT_DIR
from .checkpoint import (
    RAW_FILE,
    init_ema,
    load_checkpoint,
    remove_partial_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from .distributed import (
    check_backend,
    configure_deepspeed,
    load_optimizer,
    prepare,
    save_model,
    whole_tensors,
)

MAX_BAD_STEPS = 5  # skipped (non-finite) optimizer steps in a row that stop a run


def trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that require a gradient, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def start_accelerator(model: torch.nn.Module, command: str, accelerator=None, **settings):
    """``accelerator``, or an ``accelerate.Accelerator(**settings)`` (which picks up ``accelerate launch``'s
    processes), checked against ``model`` for the backend ``command`` runs under."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator(**settings)
    check_backend(acc, command, model)
    return acc


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


def set_trainable(model, trainable, activation_checkpointing: bool) -> None:
    """Train the parts ``trainable`` names (a TrainableConfig; None: as the model is) and, if asked, recompute
    activations in the backward pass."""
    if trainable is not None:
        model.set_trainable(trainable)
    if activation_checkpointing:
        enable_activation_checkpointing(model)


@torch.no_grad()
def update_ema(
    ema: dict[str, torch.Tensor] | None, named: dict[str, torch.Tensor], decay: float, form: str = "lerp"
) -> None:
    """ema <- decay * ema + (1 - decay) * weights, after an optimizer step.

    ``form`` is the floating-point arithmetic: "lerp" (``ema.lerp_(w, 1 - decay)``, Stages I/II) or "scale_add"
    (``ema.mul_(decay).add_(w, alpha=1 - decay)``, Flow-GRPO's, Stage III). They can differ in the last bit, so
    each loop keeps the one its runs were made with.
    """
    if ema is None:
        return
    for name, p in named.items():
        if form == "lerp":
            ema[name].lerp_(p.detach(), 1 - decay)
        else:
            ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop core takes of a run's config, as plain values: each loop resolves its config into one."""

    unit: str  # what the run counts and a checkpoint is numbered by: "step" or "epoch"
    total: int  # the run's length in units
    save_every: int  # a checkpoint after every save_every-th unit but the last (0: none)
    keep_last: int  # how many checkpoints are kept
    ema: float  # the EMA's decay (0: none)
    config: Any  # the run's config (a dataclass), written into the run folder as ``config_file``
    config_file: str
    # DeepSpeed config key -> (the loop's value, the option it comes from): ``distributed.configure_deepspeed``
    deepspeed: dict[str, tuple[float, str]] = field(default_factory=dict)


class Loop:
    """What one training run shares with every other: its checkpoints, prepared model and optimiser, EMA, step
    guard, log rows and final save.

    Args:
        acc: the run's ``accelerate.Accelerator`` (see :func:`start_accelerator`); under DeepSpeed its
            micro-batch, accumulation and clipping are set to ``settings.deepspeed`` here, before ``prepare``.
        out: the run folder (the model folder the run writes; ``checkpoints/`` inside it).
        settings: the run's length, checkpoints, EMA and config.
    """

    def __init__(self, acc, out: Path, settings: LoopSettings) -> None:
        self.acc, self.out, self.settings = acc, Path(out), settings
        configure_deepspeed(acc, settings.deepspeed)
        self.ckpt: Path | None = None  # the checkpoint resumed from
        self.resumed: dict | None = None  # its state
        self.bad_in_a_row = 0
        self.wrapped = self.optimizer = None
        self.named: dict[str, torch.Tensor] = {}
        self.params: list[torch.Tensor] = []
        self.ema: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------- checkpoint manager
    def resume_from(self, model, resume: bool, hint: str, check: Callable[[Path], None] | None = None):
        """Load the trained tensors of the newest intact checkpoint into ``model`` when ``resume``; returns its
        state (None: a fresh start). ``check(ckpt)`` runs first (e.g. that the run is the same); ``hint`` is
        said when the tensors do not fit."""
        self.ckpt = resume_checkpoint(self.out, self.settings.unit, self.acc) if resume else None
        if self.ckpt is None:
            return None
        if check is not None:
            check(self.ckpt)
        state = load_checkpoint(self.ckpt, trained_tensors(model), self.acc.process_index, hint)
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.resumed = state
        return state

    def prepare(self, model, calls, optimizer):
        """Prepare ``calls`` (the module whose forward trains) and ``optimizer`` for the processes, restore the
        optimiser state of a resumed run, and start the EMA (``settings.ema`` its decay; 0 = none). Returns the
        wrapped module. The trained tensors are collected again afterwards: under FSDP they are new (DTensor
        shards)."""
        self.wrapped, self.optimizer = prepare(self.acc, calls, optimizer, model)
        if self.ckpt is not None:
            saved = self.resumed.get("num_processes", self.acc.num_processes)
            load_optimizer(self.acc, self.wrapped, self.optimizer, self.ckpt, saved)
        self.named = trained_tensors(model)
        self.params = list(self.named.values())
        if not self.params:
            raise ConfigError("nothing to train: no parameter of the model requires a gradient")
        self.ema = init_ema(self.named, self.ckpt, self.settings.ema)
        return self.wrapped

    def checkpoint_due(self, i: int) -> bool:
        """Whether a checkpoint is written after unit ``i`` (0-based): after every ``save_every``-th, but not
        after the last (the model folder holds it)."""
        every = self.settings.save_every
        return bool(every) and (i + 1) % every == 0 and i + 1 < self.settings.total

    def save(self, state: dict) -> None:
        """Write a checkpoint of the trained tensors, optimiser, EMA, RNGs and ``state`` (``state[unit]``
        numbers it); every process calls it."""
        save_checkpoint(
            self.out,
            self.settings.unit,
            self.acc,
            self.wrapped,
            self.optimizer,
            self.named,
            state,
            self.settings.keep_last,
            self.ema,
        )

    # ---------------------------------------------------------------------------------- the step guard
    def step(self, finite: bool, norm: float, where: str) -> bool:
        """Take the optimizer step when ``finite`` (agreed by every process) and the gradient norm is finite;
        returns whether the step was skipped. Under fp16 the loss scaler takes the step and may skip it itself.
        DeepSpeed: the engine has already stepped inside backward and ``optimizer.step`` does nothing."""
        if finite and self.acc.scaler is not None:
            self.optimizer.step()  # fp16: the loss scaler skips an overflowing step and lowers its scale
            skipped = self.acc.optimizer_step_was_skipped  # (a scaler's skip is not counted as a bad step)
        elif finite and math.isfinite(norm):
            self.optimizer.step()
            skipped = False
        else:
            self.bad_in_a_row += 1
            what = "step" if self.settings.unit == "step" else "update"
            self.acc.print(f"{where} (norm {norm}), {what} skipped")
            return True
        if not skipped:
            self.bad_in_a_row = 0
        return skipped

    def check_divergence(self, events: str, rest: str) -> None:
        """Stop the run after :data:`MAX_BAD_STEPS` skipped steps in a row: "<n> ``events`` in a row had a
        non-finite ``rest``" (what, where last, and the advice)."""
        if self.bad_in_a_row >= MAX_BAD_STEPS:
            raise TrainingDiverged(f"{self.bad_in_a_row} {events} in a row had a non-finite {rest}")

    # ---------------------------------------------------------------------------------- folder and log
    def open_folder(self) -> None:
        """On the main process: create the run folder, write the run's config and remove the partial
        checkpoints a killed run left."""
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_yaml(self.settings.config, self.out / self.settings.config_file)
            remove_partial_checkpoints(self.out / CHECKPOINT_DIR)

    def write_row(self, log: Path, row: dict) -> None:
        """Append ``row`` to the JSON-lines log ``log`` (main process)."""
        if self.acc.is_main_process:
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def finish(self, model, keep_raw: bool) -> None:
        """Save the model folder (with the EMA weights when there is an EMA; ``keep_raw``: the last raw weights
        beside them, in ``RAW_FILE``)."""
        if keep_raw and self.ema is not None:
            raw = whole_tensors(self.acc, self.named)
            if self.acc.is_main_process:
                save_safetensors(raw, self.out / RAW_FILE)
        save_model(self.acc, model, self.out, self.ema)
