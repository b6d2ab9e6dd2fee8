"""Stage III on the shapes world: Flow-GRPO + LDAM with the world's rewards, sized for a CPU.

The curriculum mirrors the paper's: first the world aesthetic score (LDAM on the middle zone, as for
Aesthetic and PickScore), then the world CLIP score together with ShapesEval partial credit (the deep zone, as
for CLIP score). Prompts are drawn from the world's GenEval-format prompt generator, so the GenEval reward has
its metadata.

LDAM's gates: the paper's constants (5 consecutive drops, a 2-sigma grad-norm spike, window 5) fire about once
per 20,000 rounds on noise and never in a 12-epoch phase, so the world uses a documented looser setting, the
same dual gate per round: the reward fell this round (drop streak >= 1) and the gradient norm is above the mean
of the 3 rounds before it, cooling 3 rounds. Replayed on synthetic 12-round phases (``benchmarks/bench_rl.py
--gate-rates``; 4,000 phases each, rewards = trend x round + N(0, 1), log-normal grad norms) it fires 1.46
times a phase on pure noise, 1.19 with a rising trend of 0.5 noise-std per round and 0.84 with 1.0 (the
previous world setting, 2 drops and 1 std: 0.39, 0.14, 0.04; the paper's: 0.00). With one gate switched off
(the ablation rows (6) and (7)) the other alone fires 1.8-2.6 times a phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainableConfig
from ..rl.config import PhaseConfig, RLConfig
from ..rl.ldam import LDAMConfig


@dataclass
class WorldRLConfig:
    """Stage III on the world (the paper's recipe scaled down; see :class:`parauni.rl.config.RLConfig`)."""

    enabled: bool = field(default=True, metadata={"help": "run Stage III in the demo"})
    aesthetic_epochs: int = field(default=12, metadata={"help": "epochs of phase 1 (world aesthetic)"})
    clip_epochs: int = field(
        default=12, metadata={"help": "epochs of phase 2 (world CLIP + ShapesEval credit)"}
    )
    geneval_weight: float = field(
        default=1.0, metadata={"help": "weight of ShapesEval partial credit in phase 2"}
    )
    prompts_per_epoch: int = 16
    group_size: int = 4
    steps: int = field(default=10, metadata={"help": "SDE sampling steps"})
    cfg: float = field(default=2.0, metadata={"help": "CFG of rollouts (the world's sampling CFG)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak lr of the LoRA"})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "'cosine' (the paper's, to 0 over the run) or 'constant'"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank on the DiT (0: train queries + LIM)"})
    beta: float = field(default=0.02, metadata={"help": "KL weight"})
    updates_per_epoch: int = field(default=1, metadata={"help": "1: every update on-policy"})
    micro_batch: int = 16
    ldam: bool = field(default=True, metadata={"help": "LDAM on (off: plain Flow-GRPO)"})
    ldam_window: int = field(default=3, metadata={"help": "LDAM window W (paper: 5)"})
    ldam_drop_epochs: int = field(
        default=1,
        metadata={
            "help": "reward-drop gate: consecutive drops r_s (paper: 5, which never fires in 12 epochs)"
        },
    )
    ldam_grad_sigmas: float = field(
        default=0.0,
        metadata={"help": "grad-norm gate: above the window's mean + this many stds (paper's reading: 2)"},
    )
    ldam_reward_gate: bool = field(
        default=True, metadata={"help": "require the reward-drop gate (off: paper ablation 7)"}
    )
    ldam_grad_gate: bool = field(
        default=True, metadata={"help": "require the grad-norm gate (off: paper ablation 6)"}
    )
    cache_conditions: bool = field(
        default=True,
        metadata={"help": "run the frozen VLM once per prompt and epoch (see rl.cache_conditions)"},
    )
    seed: int = 0


def world_rl_config(w: WorldRLConfig, image_size: int) -> RLConfig:
    """The :class:`RLConfig` of a world run."""
    phase2 = {"clip": 1.0}
    if w.geneval_weight > 0:
        phase2["geneval"] = w.geneval_weight
    trainable = (
        TrainableConfig(
            queries=False, lim=False, dit=False, dit_lora_rank=w.lora_rank, dit_lora_alpha=w.lora_rank
        )
        if w.lora_rank > 0
        else TrainableConfig(queries=True, lim=True, dit=False)
    )
    return RLConfig(
        phases=[
            PhaseConfig("aesthetic", {"aesthetic": 1.0}, w.aesthetic_epochs, "middle", w.beta),
            PhaseConfig("clip+geneval", phase2, w.clip_epochs, "deep", w.beta),
        ],
        prompts_per_epoch=w.prompts_per_epoch,
        group_size=w.group_size,
        steps=w.steps,
        cfg=w.cfg,
        height=image_size,
        width=image_size,
        lr=w.lr,
        lr_schedule=w.lr_schedule,
        updates_per_epoch=w.updates_per_epoch,
        micro_batch=w.micro_batch,
        rollout_batch=w.prompts_per_epoch * w.group_size,
        trainable=trainable,
        ldam=LDAMConfig(
            enabled=w.ldam,
            window=w.ldam_window,
            drop_epochs=w.ldam_drop_epochs,
            grad_sigmas=w.ldam_grad_sigmas,
            reward_gate=w.ldam_reward_gate,
            grad_gate=w.ldam_grad_gate,
        ),
        cache_conditions=w.cache_conditions,
        save_every=5,
        keep_last=1,
        seed=w.seed,
    )


def run_world_rl(
    model,
    w: WorldRLConfig,
    image_size: int,
    stage0: Path,
    out_dir: Path,
    progress: bool = True,
    resume: bool = False,
    log=print,
):
    """Stage III of ``model`` (a world Stage-II ParaUni) with the world's rewards; returns the RLResult."""
    from ..rl.grpo import WorldPromptSource, train_rl
    from ..rl.rewards import CombinedReward
    from .reward_models import world_rewards

    cfg = world_rl_config(w, image_size)
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
