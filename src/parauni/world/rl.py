"""Stage III on the shapes world: Flow-GRPO + LDAM with the world's rewards, sized for a CPU.

The curriculum mirrors the paper's: first the world aesthetic score (LDAM on the middle zone, as for
Aesthetic and PickScore), then the world CLIP score together with ShapesEval partial credit (the deep zone, as
for CLIP score), each reward with its own LDAM. :func:`world_geneval_rl` is Stage III with the ShapesEval credit
alone (Flow-GRPO's GenEval task), the recipe ``benchmarks/bench_rl.py --mode geneval`` runs. Prompts are drawn
from the world's GenEval-format prompt generator, so the GenEval reward has its metadata.

LDAM's gates: the paper's constants almost never fire within the world's short phases, so the world uses a
looser setting of the same dual gate per round: the reward fell this round (drop streak >= 1) and the gradient
norm is above the mean of the 3 rounds before it, cooling 3 rounds. Its firing rates, replayed by
``benchmarks/bench_rl.py --gate-rates``, are in docs/world.md ("Measurements moved out of the code").
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..config import TrainableConfig
from ..rl.config import PhaseConfig, RLConfig
from ..rl.grpo import train_rl
from ..rl.prompts import PromptItem
from ..rl.rewards import CombinedReward
from ..scoring.geneval_rules import GENEVAL_TAGS
from .captions import metadata_for
from .reward_models import world_rewards


def world_geneval_rl(base: RLConfig) -> RLConfig:
    """Stage III with ShapesEval's partial credit alone (Flow-GRPO's GenEval task on the world): ``base`` (the
    world's RL config) with one ``geneval`` phase and the cheapest setting per sample of those measured
    (docs/world.md, "Stage III on the world"): the whole DiT (the paper's table) at lr 3e-4, 32 prompts x 4 images
    an epoch in one on-policy update, the first half of the steps trained (the last steps carry most of the
    gradient's norm and little of the layout the credit scores), no KL term, LDAM off, 18 epochs (about 8 min on
    one loaded core). None of the settings measured raised ShapesEval in that time; see the docs for why."""
    return replace(
        base,
        phases=[PhaseConfig("geneval", {"geneval": 1.0}, epochs=18, zone="deep", beta=0.0)],
        trainable=TrainableConfig(queries=False, lim=False, dit=True, dit_lora_rank=0),
        prompts_per_epoch=32,
        micro_batch=32,
        lr=3e-4,
        lr_schedule="constant",
        updates_per_epoch=1,
        timestep_fraction=0.5,
        ema=0.0,
        ldam=replace(base.ldam, enabled=False),
    )


class WorldPromptSource:
    """Endless GenEval-format prompts of the shapes world, drawn uniformly over the six tags (a
    :class:`parauni.rl.prompts.Prompts`)."""

    def epoch(self, seed: int, epoch: int, n: int) -> list[PromptItem]:
        """``n`` (prompt, metadata row) items for ``epoch``, the same for the same seed."""
        rng = np.random.default_rng([seed, epoch, 11])
        rows = [metadata_for(GENEVAL_TAGS[int(rng.integers(len(GENEVAL_TAGS)))], rng) for _ in range(n)]
        return [(r["prompt"], r) for r in rows]


def run_world_rl(
    model,
    cfg: RLConfig,
    stage0: Path,
    out_dir: Path,
    progress: bool = True,
    resume: bool = False,
    log=print,
):
    """Stage III of ``model`` (a world Stage-II ParaUni) with the world's rewards (the world config's ``rl``,
    :func:`parauni.world.config.world_rl_defaults`); returns the RLResult."""
    rewards = world_rewards(stage0)
    combined = CombinedReward(rewards, {name: 1.0 for name in rewards})

    def score(images, prompts, metadata):
        return combined(images, prompts, metadata)[1]

    return train_rl(
        model,
        score,
        list(rewards),
        WorldPromptSource(),
        cfg,
        out_dir,
        resume=resume,
        progress=progress,
        log=log,
    )
