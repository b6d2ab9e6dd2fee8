"""Stage III's held-out evaluation: fixed prompts and noise, scored at the run's start, each phase's end, and every
``rl.eval_every`` epochs (``rl.eval_prompts`` > 0).

An epoch's rollouts draw new prompts, so two epochs' mean rewards differ by their prompts as much as by the
training between them (on the world, a one-update phase moves its reward by less than that). The held-out set is
the same P prompts x k images from the same initial noise every time, sampled deterministically, so the
difference of two evaluations is the training's alone, and its noise is that of the P per-prompt differences::

    items (P) -> rollout with ODE steps from the noise of EVAL_DRAW (P k images) -> every phase's rewards
              -> per prompt the mean of its k images (P,) -> a row: mean, SE over prompts, the P means

Flow-GRPO evaluates its test set the same way (fixed seeds, no SDE noise); :func:`parauni.rl.plots.paired_rise`
compares two rows prompt by prompt.
"""

from __future__ import annotations

import itertools
import time

import torch

from ..training.distributed import outside_training
from .config import RLConfig
from .objective import prompt_standard_error
from .prompts import PromptItem, Prompts
from .rollout import ConditionCache, rollout

__all__ = ["EVAL_DRAW", "eval_due", "eval_epochs", "evaluate", "held_out"]

EVAL_DRAW = 2**31 - 1  # the epoch index of the held-out set's prompt draw and noise: no run reaches it


def eval_epochs(config: RLConfig) -> list[int]:
    """After how many epochs the held-out set is evaluated: before the first (0), at the end of each phase, and
    every ``rl.eval_every`` epochs; none with ``rl.eval_prompts=0``."""
    if not config.eval_prompts:
        return []
    due = {0, *itertools.accumulate(p.epochs for p in config.phases)}
    if config.eval_every:
        due |= set(range(0, config.total_epochs + 1, config.eval_every))
    return sorted(due)


def eval_due(config: RLConfig, epochs_done: int) -> bool:
    """Whether the held-out set is evaluated after ``epochs_done`` epochs (:func:`eval_epochs`)."""
    return epochs_done in eval_epochs(config)


def held_out(prompts: Prompts, config: RLConfig) -> list[PromptItem]:
    """The run's ``rl.eval_prompts`` held-out prompts: the source's draw for an epoch index no run reaches
    (from every tag, whatever the phases' ``tags``)."""
    return prompts.epoch(config.seed, EVAL_DRAW, config.eval_prompts)


def evaluate(
    model, items: list[PromptItem], rewards, names: list[str], config: RLConfig, acc, wrapped
) -> dict:
    """One evaluation of the held-out ``items`` (P prompts) with this process's share of their P k images.

    Returns the log row (the same on every process): per reward name ``reward_<name>`` (the mean of the P k
    scores), ``se_reward_<name>`` (the std of the P prompt means / sqrt(P)) and ``prompt_means_<name>`` (the P
    prompt means, for :func:`parauni.rl.plots.paired_rise`), with ``prompts``, ``images`` and ``seconds``.
    """
    t0 = time.time()
    k, n = config.eval_images, len(items) * config.eval_images
    n_local, rank = n // acc.num_processes, acc.process_index
    indices = list(range(rank * n_local, (rank + 1) * n_local))
    groups = [i // k for i in indices]
    local = [items[g] for g in groups]
    with torch.no_grad(), acc.autocast():
        cache = None
        if ConditionCache.usable(model, config):
            cache = outside_training(
                acc, wrapped, ConditionCache, model, [p for p, _ in local], config.rollout_batch
            )
        ro = outside_training(
            acc, wrapped, rollout, model, local, groups, indices, config, EVAL_DRAW, None, False, cache, True
        )
    scores = rewards(ro.images, ro.prompts, ro.metadata)
    row: dict = {"prompts": len(items), "images": k}
    for name in names:
        mine = torch.tensor(scores[name], dtype=torch.float32, device=acc.device)
        every = acc.gather(mine).cpu()  # (P k,) prompt-major: each process holds a contiguous slice
        row[f"reward_{name}"] = float(every.mean())
        row[f"se_reward_{name}"] = prompt_standard_error(every, k)
        row[f"prompt_means_{name}"] = [round(float(m), 6) for m in every.reshape(-1, k).mean(1)]
    row["seconds"] = time.time() - t0
    return row
