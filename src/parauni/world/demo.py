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
from ..rl.plots import (
    phase_gains,
    plot_reward_curves,
    read_log,
    reward_names,
    reward_rises,
    rise_basis,
    rise_verdict,
    trigger_summary,
)
from ..training.run import RunOptions, run_stage
from ..utils.device import default_device
from ..utils.images import tensor_to_uint8
from ..utils.run_files import RL_LOG
from ..utils.run_files import TRAIN_LOG as LOG_FILE
from .captions import make_eval_metadata, write_eval_metadata
from .config import WorldConfig
from .estimate import calibrate, stage_seconds
from .pretrain import stage_source, world_model_config
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
    # One seed for what draws from torch's global generator (e.g. the initialisation of Stage III's LoRA),
    # restored afterwards so that the caller's stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        run = _DemoRun(out, progress, log)
        cfg, stage0 = run.load(stage0, overrides, quick, cache_dir)
        run.train(cfg, stage0, stages)
        return run.report(cfg, stage0, quick)


class _DemoRun:
    """One demo run: its models, and what its report collects (seconds per part, ShapesEval results and
    sample grids, Stage III's metrics)."""

    def __init__(self, out: Path, progress: bool, log) -> None:
        self.out, self.progress, self.log = out, progress, log
        self.timings: dict[str, float] = {}
        self.scores: dict[str, dict] = {}
        self.samples: dict[str, list] = {}
        self.rl_metrics: dict | None = None
        self.start = time.time()

    def load(self, stage0, overrides, quick: bool, cache_dir) -> tuple[WorldConfig, Path]:
        """The world config and its Stage-0 folder; loads the Stage-0 text-to-image model (the distillation's
        teacher) and builds the fresh ParaUni model, both on the device."""
        t = time.time()
        cfg, stage0 = world_stage0(stage0, overrides, quick, cache_dir, self.progress, self.log)
        self.stage0_info = json.loads((stage0 / "stage0.json").read_text())
        self.timings["stage0"] = time.time() - t
        self.timings.update({f"{k} (when trained)": v for k, v in self.stage0_info["timings"].items()})
        device = default_device()  # a GPU when there is one: every model of the demo runs on it
        self.t2i = TextToImage.from_pretrained(stage0 / "t2i").eval().to(device)
        self.teacher = self.t2i.text_states  # the Stage-I distillation's teacher (see world_teacher)
        self.model = ParaUni.from_config(world_model_config(cfg, stage0)).to(device)
        return cfg, stage0

    def estimate(self, cfg: WorldConfig, stages: tuple[int, ...]) -> None:
        source = stage_source(cfg, 1)
        cal = calibrate(self.model, cfg, source, self.teacher)
        self.guess = guess = stage_seconds(cal, cfg, stages, evaluations=1 + len(stages))
        self.log(
            f"estimate for this machine: about {guess['total'] / 60:.0f} min more (Stage I {guess['stage1']:.0f} s, "
            f"Stage II {guess['stage2']:.0f} s, Stage III {guess['stage3_rl']:.0f} s, ShapesEval {guess['shapeseval']:.0f} s; "
            "from a timed training step and a timed generation)"
        )

    def evaluate(self, cfg: WorldConfig, name: str, fn, label: str) -> None:
        """ShapesEval of ``fn`` (a generate function) as ``name``; its samples shown as ``label``."""
        e, t = cfg.eval, time.time()
        result = run_shapeseval(
            fn,
            self.rows,
            e.images_per_prompt,
            e.batch_size,
            seed=cfg.seed,
            progress=self.progress,
            desc=f"ShapesEval {name}",
        )
        self.timings[f"shapeseval_{name}"] = time.time() - t
        self.log(
            f"ShapesEval {name}: overall {result['overall']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in result["tags"].items())
            + f" ({len(self.rows) * e.images_per_prompt} images)"
        )
        if result["attribution"]:
            self.log(
                "  colour attribution images: "
                + ", ".join(f"{k} {v:.2f}" for k, v in result["attribution"].items())
            )
        self.scores[name], self.samples[label] = result, result["samples"]

    def train(self, cfg: WorldConfig, stage0: Path, stages: tuple[int, ...]) -> None:
        """The time estimate, then ShapesEval of the Stage-0 DiT, and each stage trained and evaluated."""
        self.estimate(cfg, stages)
        self.rows = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)
        write_eval_metadata(self.out / "eval_metadata.jsonl", self.rows)
        e = cfg.eval
        self.log(
            f"ShapesEval: {len(self.rows)} prompts x {e.images_per_prompt} images, {e.sampler} {e.steps} steps, "
            f"CFG {e.cfg}"
        )
        self.evaluate(cfg, "stage0_t2i", t2igen(self.t2i, cfg), "Stage 0 DiT + own text encoder")
        for stage in (n for n in stages if n < 3):
            t = time.time()
            source = stage_source(cfg, stage)
            out = self.out / f"stage{stage}"
            run_stage(
                self.model,
                source,
                cfg.parauni.stage(stage),
                out,
                RunOptions(progress=self.progress),
                self.teacher,
            )
            self.timings[f"stage{stage}"] = time.time() - t
            label = f"ParaUni Stage {'I' * stage} (all layers)"
            self.evaluate(cfg, f"stage{stage}", paraunigen(self.model), label)
        if 3 in stages:
            self.rl(cfg, stage0)

    def rl(self, cfg: WorldConfig, stage0: Path) -> None:
        """Stage III on the Stage-II model, its reward and LDAM metrics, and its ShapesEval."""
        t = time.time()
        result = run_world_rl(
            self.model, cfg.rl, stage0, self.out / "stage3", progress=self.progress, log=self.log
        )
        self.timings["stage3_rl"] = time.time() - t
        history = result.history
        phases = result.config.phases
        optimised = {p.name: [k for k, w in p.rewards.items() if w] for p in phases}
        rises = reward_rises(history, optimised, evals=result.evals)
        m = self.rl_metrics = {
            "phases": {
                name: {"rewards": dict(p.rewards), "start": a, "end": b, "rises": rises.get(name, {})}
                for (name, (a, b)), p in zip(phase_gains(history).items(), phases, strict=True)
            },
            "rewards_first_last": {
                n: [history[0][f"reward_{n}"], history[-1][f"reward_{n}"]] for n in reward_names(history)
            },
            "ldam_triggers": sum(bool(r.get("ldam_triggered")) for r in history),
            "ldam_trigger_summary": trigger_summary(history),
            "epochs": len(history),
            "rise_basis": rise_basis(rises),
            "held_out": result.evals,
        }
        self.log(
            f"Stage III (each optimised reward on {m['rise_basis']}, +- 1 SE of the difference): "
            + "; ".join(
                f"{k}: {name} {r['start']:.3f} -> {r['end']:.3f} +- {r['se']:.3f} ({rise_verdict(r)})"
                for k, v in m["phases"].items()
                for name, r in v["rises"].items()
            )
            + f"; LDAM triggers {m['ldam_trigger_summary']}"
        )
        self.evaluate(cfg, "stage3", paraunigen(self.model), "ParaUni Stage III (RL)")

    def report(self, cfg: WorldConfig, stage0: Path, quick: bool) -> dict:
        """``metrics.json``, the figures and ``report.md``; returns the metrics."""
        out, info = self.out, self.stage0_info
        self.timings["total"] = time.time() - self.start
        metrics = {
            "shapeseval": {
                k: {
                    "overall": v["overall"],
                    "tags": v["tags"],
                    "counts": v["counts"],
                    "attribution": v["attribution"],
                }
                for k, v in self.scores.items()
            },
            "timings": self.timings,
            "estimate": self.guess,
            "vlm": info["metrics"]["vlm"],
            "stage0": {
                "folder": str(stage0),
                "metrics": info["metrics"],
                "evaluation": info.get("evaluation"),
            },
            "world": dataclasses.asdict(cfg),
            "quick": quick,
        }
        if self.rl_metrics is not None:
            metrics["rl"] = self.rl_metrics
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
        if self.rl_metrics is not None:
            plot_reward_curves(
                {"Stage III": read_log(out / "stage3" / RL_LOG)},
                out / "rl_curves.png",
                evals={"Stage III": self.rl_metrics.get("held_out", [])},
            )
            figures["rewards"] = "rl_curves.png"
        for tag, path in plot_tag_grids(self.samples, out).items():
            figures[tag] = path.name
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        write_markdown(out, metrics, figures)
        self.log(f"report: {out / 'report.md'} (total {self.timings['total']:.0f} s)")
        return metrics
