"""The demo's report: loss curves, sample grids per GenEval tag, and a Markdown summary that shows them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..rl.plots import ema, rise_verdict
from ..scoring.geneval_rules import GENEVAL_TAGS
from ..utils.images import make_grid
from ..utils.plotting import pyplot


def read_log(path: str | Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """(steps, values) of a JSONL training log."""
    steps, values = [], []
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.append(row["step"])
            values.append(row[key])
    return steps, values


def plot_losses(curves: dict[str, Path], out: str | Path) -> Path:
    """One panel per training log (name -> JSONL path); raw values and an EMA (smoothing 0.1)."""
    plt = pyplot()
    curves = {k: v for k, v in curves.items() if Path(v).is_file()}
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(4 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (name, path) in zip(axes[0], curves.items(), strict=False):
        steps, values = read_log(path)
        ax.plot(steps, values, alpha=0.35, label="loss")
        ax.plot(steps, ema(values, 0.1), label="EMA 0.1")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _upscale(image: np.ndarray, factor: int) -> np.ndarray:
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def plot_tag_grids(samples: dict[str, dict], out_dir: str | Path, upscale: int = 3) -> dict[str, Path]:
    """One PNG per tag: for each model (columns) the images of the same prompts and seeds (rows).

    samples: {model_name: {tag: [(prompt, [uint8 images])]}} as returned by ``run_shapeseval``.
    """
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(samples)
    paths = {}
    for tag in GENEVAL_TAGS:
        rows = [samples[m].get(tag, []) for m in models]
        if not rows[0]:
            continue
        prompts = [p for p, _ in rows[0]]
        fig, axes = plt.subplots(
            1, len(models), figsize=(2.4 * len(models) + 2.6, 0.62 * len(prompts) + 0.8), squeeze=False
        )
        for ax, name, model_rows in zip(axes[0], models, rows, strict=True):
            tiles = [_upscale(img, upscale) for _, imgs in model_rows for img in imgs]
            cols = len(model_rows[0][1])
            grid = make_grid(tiles, cols=cols, pad=2)
            ax.imshow(grid, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            tile = tiles[0].shape[0] + 2
            ax.set_yticks([2 + tile * (i + 0.5) for i in range(len(prompts))])
            ax.set_yticklabels(prompts if ax is axes[0][0] else [], fontsize=7)
        fig.suptitle(f"ShapesEval samples: {tag}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"samples_{tag}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[tag] = path
    return paths


def _stage0_lines(stage0: dict | None) -> list[str]:
    """The Stage-0 models' own measurements (a release's stage0.json), under the ShapesEval table."""
    if not stage0 or not stage0.get("evaluation"):
        return []
    m, ev = stage0["metrics"], stage0["evaluation"]
    spread = " ".join(f"{s:.3f}" for s in ev["prompt_use"]["query_states"])
    lines = [
        "",
        f"## Stage 0 ({stage0['folder']})",
        "",
        f"* VLM: held-out caption token accuracy {m['vlm']['heldout_caption_accuracy']:.3f}; query states' relative "
        f"spread across prompts per layer (fresh queries) {spread}",
        f"* world CLIP: hard-negative accuracy {m['rewards']['heldout_hard_negative_accuracy']:.3f}, retrieval "
        f"top-1 {m['rewards']['heldout_retrieval_top1']:.3f}; aesthetic ranking accuracy "
        f"{m['rewards']['aesthetic']['heldout_ranking_accuracy']:.3f}",
    ]
    if m.get("ae"):
        lines.append(f"* autoencoder: held-out PSNR {m['ae']['heldout_psnr']:.1f} dB")
    for name, s in ev["shapeseval"].items():
        lines.append(
            f"* DiT with its own text encoder ({name} weights) at release time: ShapesEval {s['overall']:.3f}"
        )
    return lines


def write_markdown(out_dir: str | Path, metrics: dict, figures: dict[str, str]) -> Path:
    """``report.md``: the ShapesEval table, the timings, the loss curves and the sample grids."""
    out_dir = Path(out_dir)
    scores = metrics["shapeseval"]
    lines = ["# ParaUni on the shapes world", ""]
    if metrics.get("quick"):
        lines += [
            "> **A smoke run (`--quick`)**: every stage ran for a few steps on shrunken settings, so the images are "
            "noise and the scores near 0 by design. Run `parauni demo` without `--quick` for the real figures.",
            "",
        ]
    lines += [
        "Stage 0 (the world's VLM, its text-to-image DiT with its own text encoder and its reward models) comes "
        "from the shipped release (or, with `--stage0 scratch`, quick models trained here); `parauni demo` then "
        "trained ParaUni's Stage I (queries + LIM, DiT frozen), Stage II (+ DiT) and Stage III (Flow-GRPO with "
        "LDAM on the world's rewards) on this machine. "
        "ShapesEval applies GenEval's rules with a detector that knows the world.",
        "",
        "## ShapesEval",
        "",
        "| model | overall | " + " | ".join(GENEVAL_TAGS) + " |",
        "|---|---|" + "---|" * len(GENEVAL_TAGS),
    ]
    for name, s in scores.items():
        cells = " | ".join(f"{s['tags'].get(t, float('nan')):.3f}" for t in GENEVAL_TAGS)
        lines.append(f"| {name} | **{s['overall']:.3f}** | {cells} |")
    lines += _stage0_lines(metrics.get("stage0"))
    lines += ["", "## Time (seconds, wall clock)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in metrics["timings"].items()]
    if "notes" in metrics:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in metrics["notes"]]
    lines += ["", "## Training curves", "", f"![losses]({figures['losses']})", ""]
    if "rl" in metrics:
        rl = metrics["rl"]
        lines += [
            "## Stage III (RL)",
            "",
            "Each phase's optimised reward (weighted sum), mean of its first 2 and last 2 epochs (of its first "
            "and last for a phase of 2 or 3 epochs):",
            "",
            "| phase | rewards (weights) | start | end |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['rewards']} | {v['start']:.4f} | {v['end']:.4f} |" for k, v in rl["phases"].items()
        ]
        rises = [(k, name, r) for k, v in rl["phases"].items() for name, r in v.get("rises", {}).items()]
        if rises:
            lines += [
                "",
                "Each optimised reward on its own, compared on "
                + rl["rise_basis"]
                + ": a rise is beyond its noise when it exceeds 2 standard errors of the difference (the rewards "
                "plot's squares are the held-out evaluations, its curves the epochs' own prompts):",
                "",
                "| phase | reward | start | end | +-1 SE | verdict |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {k} | {name} | {r['start']:.4f} | {r['end']:.4f} | {r['se']:.4f} | {rise_verdict(r)} |"
                for k, name, r in rises
            ]
        lines += ["", f"LDAM triggers: {rl['ldam_triggers']}", "", f"![rewards]({figures['rewards']})", ""]
    lines += [
        "## The paper's loss and the paper's claims on this Stage 0",
        "",
        "Measured by their own commands, not by this run (docs/world.md has the figures they printed on the "
        "shipped release):",
        "",
        "* Stage I with the paper's flow loss alone beside the distilled one: "
        "`python benchmarks/bench_demo.py --flow-only`, or this demo with "
        "`--world.parauni.stage1.condition_distill=0 --world.parauni.stage2.condition_distill=0`.",
        "* The ablation rows (last layer, all layers, without each zone, LIM without LayerNorm; 3 seeds), the "
        "reconstruction comparison and the layer analyses: `parauni reproduce` (resumable).",
        "",
        "## Samples",
        "",
    ]
    for key, path in figures.items():
        if key not in ("losses", "rewards"):
            lines += [f"### {key}", "", f"![{key}]({path})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
