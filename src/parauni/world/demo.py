"""``parauni demo``: the whole pipeline on the shapes world, trained and measured on this machine.

Stage 0 (cached) -> Stage I -> ShapesEval -> Stage II -> ShapesEval -> Stage III (RL) -> ShapesEval, then a
report folder with ``metrics.json`` (ShapesEval per model under ``shapeseval``, seconds per stage under
``timings``, the RL rewards under ``rl``), loss and reward curves, sample grids per GenEval tag and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.parauni import ParaUni
from ..pipeline import generate
from ..rl.plots import phase_gains, plot_reward_curves, read_log, reward_names, trigger_summary
from ..training.run import RunOptions, run_stage
from ..training.trainer import distillation, stage_trainable
from ..utils.device import default_device
from ..utils.images import tensor_to_uint8
from ..utils.run_files import RL_LOG
from ..utils.run_files import TRAIN_LOG as LOG_FILE
from .captions import make_eval_metadata, write_eval_metadata
from .config import STREAM_OFFSETS, WorldConfig
from .pretrain import WorldSource, world_model_config
from .release import world_stage0
from .report import plot_losses, plot_tag_grids, write_markdown
from .rl import run_world_rl
from .shapeseval import run_shapeseval
from .t2i import TextToImage, t2igen


def world_teacher(stage0: Path):
    """The teacher of the stages' ``condition_distill``: the Stage-0 DiT's own text encoder (captions -> states, mask)."""
    return TextToImage.from_pretrained(stage0 / "t2i").eval().text_states


def paraunigen(model: ParaUni):
    """ShapesEval's generate function for a ParaUni model (sampler settings from its config)."""

    def fn(prompts: list[str], first_seed: int):
        return tensor_to_uint8(
            generate(model, prompts, seed=first_seed, batch_size=len(prompts), progress=False)
        )

    return fn


# Cost ratios measured on the demo's own runs (2-core AMD EPYC, docs/world.md): a Stage-II step against a
# step of queries + LIM under the same loss, an RL epoch against generating its rollouts (prompts x group at rl.steps) with the sampler.
STAGE2_STEP_RATIO = 1.2
RL_EPOCH_RATIO = 3.0


def estimate_seconds(
    model: ParaUni, cfg: WorldConfig, source, teacher, stages: tuple[int, ...] = (1, 2, 3)
) -> dict[str, float]:
    """The demo's remaining stages on this machine, from one timed Stage-I step and one timed generation.

    Returns seconds per stage ("stage1", "stage2", "stage3_rl", "shapeseval" for its four runs, "total").
    Nothing it does changes the model or any random stream of the demo.
    """
    s1, s2, e, r = cfg.parauni.stage1, cfg.parauni.stage2, cfg.eval, cfg.rl
    with torch.random.fork_rng(devices=[]):
        model.set_trainable(stage_trainable(1, model.config.trainable))
        images, captions = source.examples(list(range(s1.batch_size)))
        x0 = model.encode_images(images.to(model.device))
        t, noise = torch.rand(len(x0), device=x0.device), torch.randn_like(x0)

        def timed_step(stage) -> float:
            """Seconds of one training step under ``stage``'s loss (the first call pays one-off costs)."""
            times = []
            for _ in range(2):
                start = time.time()
                distill, texts = distillation(stage, teacher, captions, source.twin, model.device)
                model(model.encode_prompts(texts), x0, t, noise, distill, stage.flow_weight).backward()
                times.append(time.time() - start)
                model.zero_grad(set_to_none=True)
            return times[-1]

        train_step = timed_step(s1)
        flow_step = train_step if s2.flow_weight == s1.flow_weight else timed_step(s2)
        n, times = 16, []
        for _ in range(2):
            start = time.time()
            generate(model, ["a photo of a red circle"] * n, seed=0, batch_size=n, progress=False)
            times.append(time.time() - start)
        per_image_step = times[-1] / (n * e.steps)
    images_per_run = 6 * e.per_tag * e.images_per_prompt
    rl_epochs = r.total_epochs if 3 in stages else 0
    out = {
        "stage1": s1.steps * train_step if 1 in stages else 0.0,
        "stage2": s2.steps * flow_step * STAGE2_STEP_RATIO * s2.batch_size / s1.batch_size
        if 2 in stages
        else 0.0,
        "stage3_rl": rl_epochs
        * RL_EPOCH_RATIO
        * r.prompts_per_epoch
        * r.group_size
        * r.steps
        * per_image_step,
        "shapeseval": (1 + len(stages)) * images_per_run * e.steps * per_image_step,
    }
    return {**out, "total": sum(out.values())}


def run_demo(
    out_dir: str | Path = "parauni-demo",
    cache_dir: str | Path | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    log=print,
    stage0: str | Path = "release",
    stages: tuple[int, ...] = (1, 2, 3),
) -> dict:
    """Run the demo and write its report folder; returns the metrics.

    ``stage0``: the world's Stage-0 models, "release" (shipped with the package), "scratch" (quick ones trained
    here and cached in ``cache_dir``), a release folder or a Hub id (:func:`release.world_stage0`).
    ``stages``: ParaUni's stages to train, each on the model of the one before: (1,), (1, 2) or (1, 2, 3).
    """
    stages = tuple(stages)
    if stages not in ((1,), (1, 2), (1, 2, 3)):
        raise ConfigError(
            f"demo stages {list(stages)}: each stage trains the model of the one before; give 1, 1 2 or 1 2 3"
        )
    if quick:
        log("--quick: a smoke run, every stage for a few steps; its scores say nothing about the method")
    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()

    t = time.time()
    cfg, stage0 = world_stage0(stage0, overrides, quick, cache_dir, progress, log)
    stage0_info = json.loads((stage0 / "stage0.json").read_text())
    timings["stage0"] = time.time() - t
    timings.update({f"{k} (when trained)": v for k, v in stage0_info["timings"].items()})

    device = default_device()  # a GPU when there is one: every model of the demo runs on it
    t2i = TextToImage.from_pretrained(stage0 / "t2i").eval().to(device)
    teacher = t2i.text_states  # the Stage-I distillation's teacher (see world_teacher)
    model = ParaUni.from_config(world_model_config(cfg, stage0)).to(device)
    guess = estimate_seconds(
        model, cfg, WorldSource(cfg.seed + STREAM_OFFSETS["stage1"], cfg.image_size), teacher, stages
    )
    log(
        f"estimate for this machine: about {guess['total'] / 60:.0f} min more (Stage I {guess['stage1']:.0f} s, "
        f"Stage II {guess['stage2']:.0f} s, Stage III {guess['stage3_rl']:.0f} s, ShapesEval {guess['shapeseval']:.0f} s; "
        "from a timed training step and a timed generation)"
    )

    rows = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)
    write_eval_metadata(out / "eval_metadata.jsonl", rows)
    e = cfg.eval
    n_images = len(rows) * e.images_per_prompt
    log(
        f"ShapesEval: {len(rows)} prompts x {e.images_per_prompt} images, {e.sampler} {e.steps} steps, CFG {e.cfg}"
    )

    def evaluate(name: str, fn) -> dict:
        t = time.time()
        result = run_shapeseval(
            fn,
            rows,
            e.images_per_prompt,
            e.batch_size,
            seed=cfg.seed,
            progress=progress,
            desc=f"ShapesEval {name}",
        )
        timings[f"shapeseval_{name}"] = time.time() - t
        log(
            f"ShapesEval {name}: overall {result['overall']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in result["tags"].items())
            + f" ({n_images} images)"
        )
        return result

    scores, samples = {}, {}
    result = evaluate("stage0_t2i", t2igen(t2i, cfg))
    scores["stage0_t2i"], samples["Stage 0 DiT + own text encoder"] = result, result["samples"]
    for stage in (n for n in stages if n < 3):
        t = time.time()
        source = WorldSource(cfg.seed + STREAM_OFFSETS[f"stage{stage}"], cfg.image_size)
        run_stage(
            model,
            source,
            cfg.parauni.stage(stage),
            out / f"stage{stage}",
            RunOptions(progress=progress),
            teacher,
        )
        timings[f"stage{stage}"] = time.time() - t
        result = evaluate(f"stage{stage}", paraunigen(model))
        scores[f"stage{stage}"] = result
        samples[f"ParaUni Stage {'I' * stage} (all layers)"] = result["samples"]

    rl_metrics = None
    if 3 in stages:
        t = time.time()
        result = run_world_rl(model, cfg.rl, stage0, out / "stage3", progress=progress, log=log)
        timings["stage3_rl"] = time.time() - t
        history = result.history
        rl_metrics = {
            "phases": {
                name: {"rewards": dict(p.rewards), "start": a, "end": b}
                for (name, (a, b)), p in zip(phase_gains(history).items(), result.config.phases, strict=True)
            },
            "rewards_first_last": {
                n: [history[0][f"reward_{n}"], history[-1][f"reward_{n}"]] for n in reward_names(history)
            },
            "ldam_triggers": sum(bool(r.get("ldam_triggered")) for r in history),
            "ldam_trigger_summary": trigger_summary(history),
            "epochs": len(history),
        }
        log(
            "Stage III: "
            + "; ".join(
                f"{k} reward {v['start']:.3f} -> {v['end']:.3f}" for k, v in rl_metrics["phases"].items()
            )
            + f" (first 2 vs last 2 epochs of each phase); LDAM triggers {rl_metrics['ldam_trigger_summary']}"
        )
        result = evaluate("stage3", paraunigen(model))
        scores["stage3"] = result
        samples["ParaUni Stage III (RL)"] = result["samples"]

    timings["total"] = time.time() - start
    metrics = {
        "shapeseval": {
            k: {"overall": v["overall"], "tags": v["tags"], "counts": v["counts"]} for k, v in scores.items()
        },
        "timings": timings,
        "estimate": guess,
        "vlm": stage0_info["metrics"]["vlm"],
        "stage0": {
            "folder": str(stage0),
            "metrics": stage0_info["metrics"],
            "evaluation": stage0_info.get("evaluation"),
        },
        "world": dataclasses.asdict(cfg),
        "quick": quick,
    }
    if rl_metrics is not None:
        metrics["rl"] = rl_metrics
    figures = {"losses": "losses.png"}
    plot_losses(
        {
            "Stage 0 VLM": stage0 / "vlm_log.jsonl",
            "Stage 0 text-to-image": stage0 / "t2i" / LOG_FILE,
            "Stage I": out / "stage1" / LOG_FILE,
            "Stage II": out / "stage2" / LOG_FILE,
        },
        out / "losses.png",
    )
    if rl_metrics is not None:
        plot_reward_curves({"Stage III": read_log(out / "stage3" / RL_LOG)}, out / "rl_curves.png")
        figures["rewards"] = "rl_curves.png"
    for tag, path in plot_tag_grids(samples, out).items():
        figures[tag] = path.name
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown(out, metrics, figures)
    log(f"report: {out / 'report.md'} (total {timings['total']:.0f} s)")
    return metrics
