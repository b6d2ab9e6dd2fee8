"""``parauni demo``: the whole pipeline on the shapes world, trained and measured on this machine.

Stage 0 (cached) -> Stage I -> ShapesEval -> Stage II -> ShapesEval -> Stage III (RL) -> ShapesEval, then a
report folder with ``metrics.json`` (ShapesEval per model under ``shapeseval``, seconds per stage under
``timings``, the RL rewards under ``rl``), loss and reward curves, sample grids per GenEval tag and
``report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ..config import from_dict
from ..models.parauni import ParaUni
from ..pipeline import generate
from ..training.config import TrainConfig
from ..training.trainer import LOG_FILE, train
from ..utils.images import tensor_to_uint8
from .captions import make_eval_metadata, write_eval_metadata
from .config import WorldConfig
from .pretrain import STREAM_OFFSETS, WorldSource, run_stage0, world_model_config
from .report import plot_losses, plot_tag_grids, write_markdown
from .shapeseval import run_shapeseval
from .t2i import TextToImage


def default_cache_dir() -> Path:
    """Where Stage-0 artefacts are cached: ``$PARAUNI_CACHE`` or ``~/.cache/parauni/world``."""
    return Path(os.environ.get("PARAUNI_CACHE", Path.home() / ".cache" / "parauni" / "world"))


def world_config(overrides: list[str] | None = None, quick: bool = False) -> WorldConfig:
    """The world config with ``section.key=value`` overrides (``world.`` prefix optional)."""
    from ..config import apply_overrides

    items = [o[2:] if o.startswith("--") else o for o in overrides or []]
    items = [o.removeprefix("world.") for o in items]
    cfg = from_dict(WorldConfig, apply_overrides(dataclasses.asdict(WorldConfig()), items), prefix="world.")
    return cfg.quick() if quick else cfg


def stage_train_config(cfg: WorldConfig, stage: int) -> TrainConfig:
    """Stage I / II on the world: the paper's recipe (AdamW 0.9/0.95, wd 0.05, warm-up + cosine, clip 1.0,
    10% caption dropout) at the world's scale."""
    p = cfg.parauni
    steps, lr, warmup, distill = (
        (p.stage1_steps, p.stage1_lr, p.stage1_warmup, p.stage1_distill)
        if stage == 1
        else (p.stage2_steps, p.stage2_lr, p.stage2_warmup, p.stage2_distill)
    )
    return TrainConfig(
        stage=stage,
        steps=steps,
        batch_size=p.batch_size,
        lr=lr,
        warmup=warmup,
        image_size=cfg.image_size,
        timestep_sampling=p.timestep_sampling,
        condition_distill=distill,
        save_every=max(1, steps // 4),
        keep_last=1,
        log_every=5,
        seed=cfg.seed + stage,
    )


def world_teacher(stage0: Path):
    """The teacher of ``parauni.stage{1,2}_distill``: the Stage-0 DiT's own text encoder (captions -> states, mask)."""
    return TextToImage.from_pretrained(stage0 / "t2i").eval().text_states


def paraunigen(model: ParaUni):
    """ShapesEval's generate function for a ParaUni model (sampler settings from its config)."""

    def fn(prompts: list[str], first_seed: int):
        return tensor_to_uint8(
            generate(model, prompts, seed=first_seed, batch_size=len(prompts), progress=False)
        )

    return fn


def t2igen(model: TextToImage, cfg: WorldConfig):
    """ShapesEval's generate function for the Stage-0 text-to-image model."""
    e = cfg.eval

    def fn(prompts: list[str], first_seed: int):
        seeds = list(range(first_seed, first_seed + len(prompts)))
        x = model.generate(prompts, seeds, cfg.image_size, steps=e.steps, cfg=e.cfg, sampler=e.sampler)
        return tensor_to_uint8(x)

    return fn


def run_demo(
    out_dir: str | Path = "parauni-demo",
    cache_dir: str | Path | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Run the demo and write its report folder; returns the metrics."""
    torch.manual_seed(0)
    cfg = world_config(overrides, quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    timings: dict[str, float] = {}
    start = time.time()

    t = time.time()
    stage0 = run_stage0(cfg, cache, progress=progress, log=log)
    stage0_info = json.loads((stage0 / "stage0.json").read_text())
    timings["stage0"] = time.time() - t
    timings.update({f"{k} (when trained)": v for k, v in stage0_info["timings"].items()})

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
    t2i = TextToImage.from_pretrained(stage0 / "t2i").eval()
    result = evaluate("stage0_t2i", t2igen(t2i, cfg))
    scores["stage0_t2i"], samples["Stage 0 DiT + own text encoder"] = result, result["samples"]
    teacher = t2i.text_states  # the Stage-I distillation's teacher (see world_teacher)

    model = ParaUni.from_config(world_model_config(cfg, stage0))
    for stage in (1, 2):
        t = time.time()
        source = WorldSource(cfg.seed + STREAM_OFFSETS[f"stage{stage}"], cfg.image_size)
        train(
            model,
            source,
            stage_train_config(cfg, stage),
            out / f"stage{stage}",
            progress=progress,
            teacher=teacher,
        )
        timings[f"stage{stage}"] = time.time() - t
        result = evaluate(f"stage{stage}", paraunigen(model))
        scores[f"stage{stage}"] = result
        samples[f"ParaUni Stage {'I' * stage} (all layers)"] = result["samples"]

    rl_metrics = None
    if cfg.rl.enabled:
        from .rl import run_world_rl

        t = time.time()
        result = run_world_rl(
            model, cfg.rl, cfg.image_size, stage0, out / "stage3", progress=progress, log=log
        )
        timings["stage3_rl"] = time.time() - t
        from ..rl.plots import phase_gains, reward_names

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
            "epochs": len(history),
        }
        log(
            "Stage III: "
            + "; ".join(
                f"{k} reward {v['start']:.3f} -> {v['end']:.3f}" for k, v in rl_metrics["phases"].items()
            )
            + f" (first 2 vs last 2 epochs of each phase); LDAM triggers {rl_metrics['ldam_triggers']}"
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
        "vlm": stage0_info["metrics"]["vlm"],
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
        from ..rl.plots import plot_reward_curves, read_log

        plot_reward_curves({"Stage III": read_log(out / "stage3" / "rl_log.jsonl")}, out / "rl_rewards.png")
        figures["rewards"] = "rl_rewards.png"
    for tag, path in plot_tag_grids(samples, out).items():
        figures[tag] = path.name
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_markdown(out, metrics, figures)
    log(f"report: {out / 'report.md'} (total {timings['total']:.0f} s)")
    return metrics
