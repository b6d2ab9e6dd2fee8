"""How long the world's stages take on this machine, from one timed training step and one timed generation:
the estimate ``parauni demo`` and ``parauni reproduce`` print before they start."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models.parauni import ParaUni
from ..pipeline import generate
from ..rl.evaluate import eval_epochs
from ..scoring.geneval_rules import GENEVAL_TAGS
from ..training.trainer import distillation, stage_trainable
from .config import WorldConfig

# Cost ratios of the demo's own runs (docs/world.md, "Measurements moved out of the code"): a Stage-II step
# against a step of queries + LIM under the same loss, an RL epoch against generating its rollouts (prompts x
# group at rl.steps) with the sampler, by rl.objective.
STAGE2_STEP_RATIO = 1.2
RL_EPOCH_RATIO = {"grpo": 3.0, "nft": 2.0}


@dataclass(frozen=True)
class Calibration:
    """Seconds on this machine of one Stage-I step, one step under Stage II's loss (queries + LIM trained),
    and one sampler step of one image."""

    stage1_step: float
    stage2_step: float
    image_step: float


def calibrate(model: ParaUni, cfg: WorldConfig, source, teacher) -> Calibration:
    """Time one training step of ``model`` under each stage's loss and one generation (each run twice, the
    first paying one-off costs). Sets the model's Stage-I trainable parts; changes no weight and no random
    stream."""
    s1, s2 = cfg.parauni.stage1, cfg.parauni.stage2
    with torch.random.fork_rng(devices=[]):
        model.set_trainable(stage_trainable(1, model.config.trainable))
        images, captions = source.examples(list(range(s1.batch_size)))
        x0 = model.encode_images(images.to(model.device))
        t, noise = torch.rand(len(x0), device=x0.device), torch.randn_like(x0)

        def timed_step(stage) -> float:
            times = []
            for _ in range(2):
                start = time.time()
                distill, texts = distillation(stage, teacher, captions, source.twin, model.device)
                model(model.encode_prompts(texts), x0, t, noise, distill, stage.flow_weight).backward()
                times.append(time.time() - start)
                model.zero_grad(set_to_none=True)
            return times[-1]

        stage1_step = timed_step(s1)
        stage2_step = stage1_step if s2.flow_weight == s1.flow_weight else timed_step(s2)
        n, times = 16, []
        for _ in range(2):
            start = time.time()
            generate(model, ["a photo of a red circle"] * n, seed=0, batch_size=n, progress=False)
            times.append(time.time() - start)
    return Calibration(stage1_step, stage2_step, times[-1] / (n * cfg.eval.steps))


def stage_seconds(
    cal: Calibration, cfg: WorldConfig, stages: tuple[int, ...], evaluations: int
) -> dict[str, float]:
    """Seconds of ``stages`` (of 1, 2, 3) and of ``evaluations`` ShapesEval runs under ``cfg``: keys "stage1",
    "stage2", "stage3_rl", "shapeseval" and "total"."""
    s1, s2, e, r = cfg.parauni.stage1, cfg.parauni.stage2, cfg.eval, cfg.rl
    images_per_run = len(GENEVAL_TAGS) * e.per_tag * e.images_per_prompt
    rl_epoch = RL_EPOCH_RATIO[r.objective] * r.prompts_per_epoch * r.group_size * r.steps * cal.image_step
    held_out = len(eval_epochs(r)) * r.eval_prompts * r.eval_images  # images of every held-out evaluation
    out = {
        "stage1": s1.steps * cal.stage1_step if 1 in stages else 0.0,
        "stage2": s2.steps * cal.stage2_step * STAGE2_STEP_RATIO * s2.batch_size / s1.batch_size
        if 2 in stages
        else 0.0,
        "stage3_rl": r.total_epochs * rl_epoch + held_out * r.steps * cal.image_step if 3 in stages else 0.0,
        "shapeseval": evaluations * images_per_run * e.steps * cal.image_step,
    }
    return {**out, "total": sum(out.values())}
