"""``parauni reproduce``: the paper's ablation table (section 4.3) re-run on the shapes world.

Every row is trained and evaluated here, for several seeds, through the same code as ``parauni demo``:

* layer rows (Stage I + Stage II, then ShapesEval): last layer only as OpenUni builds it (connector and
  projector, no LayerNorm), last layer only with the LIM's LayerNorm (this project's earlier baseline), all
  layers, without the shallow / middle / deep zone, interval sampling, LIM without LayerNorm;
* RL rows (Stage III from the all-layer Stage-II model of the same seed, then ShapesEval): Flow-GRPO without
  LDAM, LDAM without the grad-norm gate, LDAM without the reward-drop gate, and the full model (all layers +
  LIM + LDAM with both gates).

ShapesEval (GenEval's rules on the world) is reported per tag and overall as mean +- std over the seeds,
beside the paper's GenEval numbers (each with the table it comes from: the last-layer row's are OpenUni's
row of the paper's main table, the ablation rows' the ablation table's), in ``reproduce.md`` and
``reproduce.json``. The seed-0 last-layer and
all-layer models are also compared on reconstruction ("Keep the image as it is.", supplementary section 4)
and the all-layer model goes through the layer analyses (figures 2, 4, 5).

Each (row, seed) unit writes ``runs/<row>/seed<k>/result.json`` when it is complete, and every stage
checkpoints, so an interrupted run continues where it stopped when started again with the same arguments.
The numbers are findings, whichever way they go: on a world this small, differences between rows can be
smaller than the spread over seeds.

Why one module of about 500 lines: the rows, one unit's training, the duration estimate and the table all
read the same row definitions and unit folders; the training, evaluation and analyses themselves are the
library's (``trainer``, ``shapeseval``, ``analysis.layers``, ``eval.reconstruct``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..analysis.layers import analyze_layers
from ..config import with_overrides
from ..errors import ConfigError
from ..eval.reconstruct import reconstruct_folder, side_by_side
from ..models.parauni import ParaUni
from ..scoring.geneval_rules import GENEVAL_TAGS
from ..training.run import RunOptions, run_stage
from .captions import WorldStream, make_eval_metadata
from .config import STREAM_OFFSETS, WorldConfig
from .demo import paraunigen, world_teacher
from .estimate import calibrate, stage_seconds
from .pretrain import stage_source, world_model_config
from .release import world_stage0
from .reward_models import load_world_clip, world_rewards
from .rl import run_world_rl
from .shapeseval import run_shapeseval

RESULT_FILE = "result.json"
SEED_STRIDE = 7919  # separates the data streams of different seeds (a prime, so streams never align)


@dataclass(frozen=True)
class AblationRow:
    """One row of the table: how its model differs from the full one, and the paper's GenEval numbers."""

    name: str
    label: str
    lim: dict = field(default_factory=dict)  # ModelConfig.lim overrides (layer rows)
    rl: tuple[str, ...] | None = None  # None: the Stage-II model is evaluated; else world.rl overrides
    paper: dict = field(default_factory=dict)  # GenEval: tag -> score and "overall"
    source: str = "ablation table"  # where in the paper ``paper``'s numbers are printed


PAPER_FULL = {
    "single_object": 0.99,
    "two_object": 0.94,
    "counting": 0.78,
    "colors": 0.91,
    "position": 0.83,
    "color_attr": 0.76,
    "overall": 0.87,
}


def _paper(single: float, colors: float, position: float, overall: float) -> dict:
    """The four columns the paper's ablation table reports."""
    return {"single_object": single, "colors": colors, "position": position, "overall": overall}


ROWS: tuple[AblationRow, ...] = (
    AblationRow(
        "last_layer",
        "last layer only, as OpenUni (no LayerNorm)",
        {"layers": "last", "use_layernorm": False},
        paper={"two_object": 0.92, "counting": 0.76, "position": 0.82, "color_attr": 0.77, "overall": 0.86},
        source="OpenUni in the main table",
    ),
    AblationRow(
        "last_layer_ln",
        "last layer only + LIM LayerNorm (not in the paper)",
        {"layers": "last", "use_layernorm": True},
        source="",
    ),
    AblationRow("all_layers", "all layers (Stage II, before RL)", source=""),
    AblationRow(
        "no_shallow",
        "(1) remove shallow zone",
        {"layers": "drop_shallow"},
        None,
        _paper(0.98, 0.88, 0.75, 0.82),
    ),
    AblationRow(
        "no_middle", "(2) remove middle zone", {"layers": "drop_middle"}, None, _paper(0.99, 0.90, 0.81, 0.85)
    ),
    AblationRow(
        "no_deep", "(3) remove deep zone", {"layers": "drop_deep"}, None, _paper(0.99, 0.90, 0.82, 0.84)
    ),
    AblationRow(
        "interval", "(4) interval sampling", {"layers": "interval"}, None, _paper(1.00, 0.90, 0.81, 0.86)
    ),
    AblationRow(
        "no_layernorm",
        "(5) LIM without LayerNorm",
        {"use_layernorm": False},
        None,
        _paper(0.98, 0.61, 0.75, 0.73),
    ),
    AblationRow(
        "layernorm",
        "all layers + the LIM's LayerNorm (the paper's LIM)",
        {"use_layernorm": True},
        source="",
    ),
    AblationRow("rl_no_ldam", "all layers + Flow-GRPO without LDAM", rl=("ldam.enabled=false",), source=""),
    AblationRow(
        "ldam_no_grad_gate",
        "(6) LDAM without grad-norm gate",
        rl=("ldam.grad_gate=false",),
        paper=_paper(0.98, 0.90, 0.82, 0.86),
    ),
    AblationRow(
        "ldam_no_reward_gate",
        "(7) LDAM without reward-drop gate",
        rl=("ldam.reward_gate=false",),
        paper=_paper(0.98, 0.90, 0.81, 0.86),
    ),
    AblationRow(
        "full", "ours: all layers + LIM + LDAM", rl=(), paper=PAPER_FULL, source="main and ablation tables"
    ),
)
ROW_NAMES = tuple(r.name for r in ROWS)


def select_rows(names: list[str] | None) -> list[AblationRow]:
    """The rows to run, in table order; an RL row brings in ``all_layers`` (its starting point)."""
    if not names:
        return list(ROWS)
    unknown = sorted(set(names) - set(ROW_NAMES))
    if unknown:
        raise ConfigError(f"unknown ablation row(s) {unknown}; choose from {list(ROW_NAMES)}")
    wanted = set(names)
    if any(r.rl is not None for r in ROWS if r.name in wanted):
        wanted.add("all_layers")
    return [r for r in ROWS if r.name in wanted]


# ------------------------------------------------------------------------------------------ one unit
LIM_FILE = "lim_base.txt"  # the LIM base of an output folder's units


def _unit_dir(out: Path, row: str, seed: int) -> Path:
    return out / "runs" / row / f"seed{seed}"


# The LIM every row builds on unless the row says otherwise: "paper" is the paper's LIM (with its LayerNorm,
# without whitening) whatever the world's defaults, so that the table compares the paper's own rows; "world"
# is the world's own LIM (world.parauni.use_layernorm off and world.parauni.whiten on for the demo), the one
# whose Stage I is measured to converge within the demo's steps (docs/world.md).
PAPER_LIM = {"use_layernorm": True, "whiten": False}
LIM_BASES = ("paper", "world")
_ROW_LIM_FIELDS = ("layers", "use_layernorm", "whiten")


def row_lim(cfg: WorldConfig, row: AblationRow, lim: str = "paper") -> dict:
    """The LIM fields that rows vary (``layers``, ``use_layernorm``, ``whiten``) of ``row``'s model on the
    ``lim`` base (:data:`LIM_BASES`)."""
    if lim not in LIM_BASES:
        raise ConfigError(f"reproduce --lim {lim!r}: choose one of {list(LIM_BASES)}")
    world = {k: getattr(cfg.parauni, k) for k in _ROW_LIM_FIELDS}
    return {**world, **(PAPER_LIM if lim == "paper" else {}), **row.lim}


def distinct_rows(cfg: WorldConfig, rows: list[AblationRow], lim: str, named: bool) -> list[AblationRow]:
    """``rows`` without the layer rows whose model is an earlier row's on the ``lim`` base (``no_layernorm``
    is ``all_layers`` on the world's LIM, ``layernorm`` is it on the paper's); an error when the caller
    ``named`` such a row."""
    kept, seen = [], {}
    for row in sorted(rows, key=lambda r: r.name != "all_layers"):  # all_layers claims its model first
        key = tuple(sorted(row_lim(cfg, row, lim).items())) if row.rl is None else None
        if key is not None and key in seen:
            if named:
                raise ConfigError(
                    f"row {row.name!r} trains the same model as {seen[key]!r} with --lim {lim}; leave it out"
                )
            continue
        if key is not None:
            seen[key] = row.name
        kept.append(row)
    return [r for r in rows if r in kept]


def _model_config(cfg: WorldConfig, stage0: Path, row: AblationRow, seed: int, lim: str = "paper"):
    base = world_model_config(cfg, stage0)
    return dataclasses.replace(base, seed=seed, lim=dataclasses.replace(base.lim, **row_lim(cfg, row, lim)))


def _train_stages(
    cfg: WorldConfig, stage0: Path, row: AblationRow, seed: int, unit: Path, progress: bool, lim: str
):
    """Stage I then Stage II of a layer row on the ``lim`` base; a finished stage (its model folder) is loaded,
    not retrained."""
    model, teacher = None, world_teacher(stage0)
    for stage in (1, 2):
        folder = unit / f"stage{stage}"
        if (folder / "done.json").is_file():
            model = ParaUni.from_pretrained(folder)
            continue
        if model is None:
            model = ParaUni.from_config(_model_config(cfg, stage0, row, seed, lim))
        tc = dataclasses.replace(cfg.parauni.stage(stage), seed=seed * 1000 + stage)
        source = stage_source(cfg, stage, SEED_STRIDE * seed)
        result = run_stage(
            model, source, tc, folder, RunOptions(resume=True, progress=progress), teacher
        ).result
        (folder / "done.json").write_text(json.dumps({"seconds": result.seconds, "loss": result.final_loss}))
    return model


def _evaluate(model: ParaUni, cfg: WorldConfig, rows: list[dict], progress: bool, desc: str) -> dict:
    e = cfg.eval
    result = run_shapeseval(
        paraunigen(model),
        rows,
        e.images_per_prompt,
        e.batch_size,
        seed=cfg.seed,
        progress=progress,
        desc=desc,
    )
    return {"overall": result["overall"], "tags": result["tags"], "counts": result["counts"]}


def run_unit(
    cfg: WorldConfig,
    stage0: Path,
    row: AblationRow,
    seed: int,
    out: Path,
    eval_rows: list[dict],
    progress: bool = True,
    log: Callable[[str], None] = print,
    lim: str = "paper",
) -> dict:
    """Train and evaluate one (row, seed) on the ``lim`` base; returns (and writes) its result. Skipped if
    already complete."""
    unit = _unit_dir(out, row.name, seed)
    done = unit / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    unit.mkdir(parents=True, exist_ok=True)
    t = time.time()
    if row.rl is None:
        model = _train_stages(cfg, stage0, row, seed, unit, progress, lim)
        extra: dict = {}
    else:
        start = _unit_dir(out, "all_layers", seed) / "stage2"
        if not (start / "done.json").is_file():
            raise RuntimeError(
                f"{row.name} starts from the all_layers Stage-II model of seed {seed}: {start}"
            )
        model = ParaUni.from_pretrained(start)
        rl = with_overrides(cfg.rl, [*row.rl, f"seed={seed}"], prefix="world.rl.")
        result = run_world_rl(
            model,
            rl,
            stage0,
            unit / "stage3",
            progress=progress,
            resume=True,
            log=lambda *_: None,
        )
        history = result.history
        extra = {
            "ldam_triggers": sum(bool(r.get("ldam_triggered")) for r in history),
            "rl_epochs": len(history),
            "rewards_first_last": {
                k[len("reward_") :]: [history[0][k], history[-1][k]]
                for k in history[-1]
                if k.startswith("reward_") and not k.endswith("_std")
            },
        }
    train_seconds = time.time() - t
    t = time.time()
    scores = _evaluate(model, cfg, eval_rows, progress, f"ShapesEval {row.name} seed {seed}")
    result = {
        "row": row.name,
        "seed": seed,
        "shapeseval": scores,
        "train_seconds": train_seconds,
        "eval_seconds": time.time() - t,
        **extra,
    }
    done.write_text(json.dumps(result, indent=2))
    log(
        f"{row.name:<20} seed {seed}: ShapesEval {scores['overall']:.3f} "
        f"({train_seconds:.0f} s training, {result['eval_seconds']:.0f} s evaluation)"
    )
    return result


# ------------------------------------------------------------------------------------ duration estimate
def pending_seconds(
    cfg: WorldConfig, stage0: Path, rows: list[AblationRow], seeds: list[int], out: Path
) -> float:
    """Expected wall-clock seconds of the units still to run (:func:`parauni.world.estimate.calibrate` on a
    throwaway model): Stages I and II, or Stage III for an RL row, then one ShapesEval run."""
    pending = [r for r in rows for s in seeds if not (_unit_dir(out, r.name, s) / RESULT_FILE).is_file()]
    if not pending:
        return 0.0
    model = ParaUni.from_config(world_model_config(cfg, stage0))
    source = stage_source(cfg, 1)
    cal = calibrate(model, cfg, source, world_teacher(stage0))
    sft, rl = (stage_seconds(cal, cfg, stages, evaluations=1)["total"] for stages in ((1, 2), (3,)))
    return sum(sft if row.rl is None else rl for row in pending)


# -------------------------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarise(results: dict[str, list[dict]]) -> dict:
    """{row: {"overall": {mean, std, n}, "tags": {tag: {mean, std, n}}, "paper": ..., "label": ...}}."""
    by_name = {r.name: r for r in ROWS}
    table = {}
    for name, units in results.items():
        if not units:
            continue
        table[name] = {
            "label": by_name[name].label,
            "paper": by_name[name].paper,
            "paper_source": by_name[name].source,
            "seeds": [u["seed"] for u in units],
            "overall": _mean_std([u["shapeseval"]["overall"] for u in units]),
            "tags": {t: _mean_std([u["shapeseval"]["tags"][t] for u in units]) for t in GENEVAL_TAGS},
        }
    return table


def format_table(table: dict) -> str:
    """The Markdown table: ShapesEval mean +- std per tag and overall, and the paper's GenEval overall with
    the table of the paper it is printed in."""
    header = "| row | " + " | ".join(GENEVAL_TAGS) + " | **overall** | paper GenEval overall (where) |"
    lines = [header, "|---|" + "---|" * (len(GENEVAL_TAGS) + 2)]
    for row in table.values():
        cells = [f"{row['tags'][t]['mean']:.3f} ± {row['tags'][t]['std']:.3f}" for t in GENEVAL_TAGS]
        paper = row["paper"].get("overall")
        lines.append(
            f"| {row['label']} | "
            + " | ".join(cells)
            + f" | **{row['overall']['mean']:.3f} ± {row['overall']['std']:.3f}** | "
            + (f"{paper:.2f} ({row.get('paper_source') or 'paper'})" if paper is not None else "–")
            + " |"
        )
    return "\n".join(lines)


def _paper_table(table: dict) -> str:
    lines = [
        "| row | " + " | ".join(GENEVAL_TAGS) + " | overall | from |",
        "|---|" + "---|" * (len(GENEVAL_TAGS) + 2),
    ]
    for row in table.values():
        if row["paper"]:
            cells = [f"{row['paper'][t]:.2f}" if t in row["paper"] else "–" for t in GENEVAL_TAGS]
            lines.append(
                f"| {row['label']} | "
                + " | ".join(cells)
                + f" | {row['paper']['overall']:.2f} | {row.get('paper_source', '')} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------- reconstruction and layer analysis
def world_image_folder(cfg: WorldConfig, folder: Path, n: int = 16) -> Path:
    """Write `n` held-out world renders (the inputs of the reconstruction comparison) as PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size)
    for i in range(n):
        Image.fromarray(stream.example(i)["image"]).save(folder / f"{i:03d}.png")  # uint8 (H, W, 3)
    return folder


def run_reconstruction(cfg: WorldConfig, stage0: Path, out: Path, seed: int, progress: bool) -> dict:
    """Last-layer vs all-layer Stage-II models of `seed`: PSNR, SSIM, world-CLIP similarity, side by side."""
    images = world_image_folder(cfg, out / "reconstruction" / "inputs")
    clip = load_world_clip(stage0)
    columns, summary = {}, {}
    for row in ("last_layer", "all_layers"):
        model = ParaUni.from_pretrained(_unit_dir(out, row, seed) / "stage2")
        rec = reconstruct_folder(model, images, out / "reconstruction" / row, clip=clip, progress=progress)
        columns.setdefault("input", rec.inputs)
        columns[row.replace("_", " ")] = rec.outputs
        summary[row] = rec.metrics["mean"]
    side_by_side(columns, out / "reconstruction" / "side_by_side.png")
    return summary


def run_layer_analysis(cfg: WorldConfig, stage0: Path, out: Path, seed: int, progress: bool) -> dict:
    """Figures 2, 4, 5 for the all-layer Stage-II model of `seed`, with the world's rewards."""
    model = ParaUni.from_pretrained(_unit_dir(out, "all_layers", seed) / "stage2")
    metadata = make_eval_metadata(per_tag=2, seed=cfg.seed)
    result = analyze_layers(
        model,
        [r["prompt"] for r in metadata],
        metadata,
        world_rewards(stage0),
        out / "layers",
        progress=progress,
    )
    return {
        "per_layer": result["per_layer"],
        "suggested_zones": result["similarity"]["suggested_zones"],
        "zone_drop": result["zone_removal"]["drop"],
        "figures": result["figures"],
    }


# ------------------------------------------------------------------------------------------------- all
def run_reproduce(
    out_dir: str | Path = "parauni-reproduce",
    seeds: list[int] | None = None,
    rows: list[str] | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    overrides: list[str] | None = None,
    analyses: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stage0: str | Path = "release",
    lim: str = "paper",
) -> dict:
    """Run (or continue) the ablation on the world and write ``reproduce.json`` and ``reproduce.md``.

    ``stage0``: the world's Stage-0 models, as for the demo (:func:`release.world_stage0`). ``lim``: the LIM the
    rows build on (:data:`LIM_BASES`; "paper" by default); one output folder holds one base."""
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds {seeds} must be distinct non-negative integers (e.g. 0 1 2)")
    if lim not in LIM_BASES:
        raise ConfigError(f"reproduce --lim {lim!r}: choose one of {list(LIM_BASES)}")
    out = Path(out_dir)
    marker = out / LIM_FILE
    if marker.is_file() and marker.read_text().strip() != lim:
        raise ConfigError(
            f"{out} holds a reproduce run on the {marker.read_text().strip()!r} LIM; give --lim "
            f"{marker.read_text().strip()} to continue it, or another --out for --lim {lim}"
        )
    t0 = time.time()
    cfg, stage0 = world_stage0(stage0, overrides, quick, cache_dir, progress, log)
    selected = distinct_rows(cfg, select_rows(rows), lim, named=rows is not None)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(lim + "\n")
    expected = pending_seconds(cfg, stage0, selected, seeds, out)
    pending = sum(not (_unit_dir(out, r.name, s) / RESULT_FILE).is_file() for r in selected for s in seeds)
    log(
        f"reproduce: {len(selected)} rows x {len(seeds)} seeds ({pending} units to run); expected duration "
        f"about {expected / 60:.0f} min on this machine (estimated from a calibration), plus the analyses"
    )
    eval_rows = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)
    results: dict[str, list[dict]] = {r.name: [] for r in selected}
    # all_layers first: the RL rows start from its Stage-II models.
    order = sorted(selected, key=lambda r: (r.rl is not None, r.name != "all_layers"))
    for row in order:
        for seed in seeds:
            results[row.name].append(run_unit(cfg, stage0, row, seed, out, eval_rows, progress, log, lim))
    table = summarise({r.name: results[r.name] for r in selected})
    report: dict = {
        "seeds": seeds,
        "lim": lim,
        "table": table,
        "units": results,
        "eval": {"prompts": len(eval_rows), "images_per_prompt": cfg.eval.images_per_prompt},
        "world": dataclasses.asdict(cfg),
        "quick": quick,
    }
    names = {r.name for r in selected}
    if analyses and {"last_layer", "all_layers"} <= names:
        report["reconstruction"] = run_reconstruction(cfg, stage0, out, seeds[0], progress)
        report["layer_analysis"] = run_layer_analysis(cfg, stage0, out, seeds[0], progress)
    report["seconds"] = time.time() - t0
    (out / "reproduce.json").write_text(json.dumps(report, indent=2))
    write_markdown(out, report)
    log(format_table(table))
    log(
        f"reproduce: {out / 'reproduce.md'} ({report['seconds']:.0f} s this run; estimate was {expected:.0f} s)"
    )
    return report


_LIM_TEXT = {
    "paper": "Rows build on the paper's LIM (with its LayerNorm, without whitening) unless they say otherwise.",
    "world": "Rows build on the world's own LIM (`--lim world`: world.parauni.use_layernorm and "
    "world.parauni.whiten; the demo's LIM has no LayerNorm and whitens the query states) unless they say "
    "otherwise.",
}


def write_markdown(out: Path, report: dict) -> Path:
    """``reproduce.md``: the ablation table, the paper's numbers, reconstruction and layer analysis."""
    e = report["eval"]
    lines = [
        "# The paper's ablation on the shapes world",
        "",
        f"ShapesEval (GenEval's rules on the world, {e['prompts']} prompts x {e['images_per_prompt']} images), "
        f"mean ± std over seeds {report['seeds']}. Layer rows are Stage-II models; RL rows continue the "
        "all-layer Stage-II model of the same seed with Stage III. These are measurements on a small world, "
        "not the paper's GenEval: compare the ordering of rows, not the values.",
        "",
        _LIM_TEXT[report.get("lim", "paper")],
        "",
        format_table(report["table"]),
        "",
        "## The paper's GenEval (for reference)",
        "",
        _paper_table(report["table"]),
        "",
    ]
    if "reconstruction" in report:
        rec = report["reconstruction"]
        lines += [
            "## Reconstruction (supplementary section 4)",
            "",
            "| model | PSNR | SSIM | CLIP similarity (world CLIP) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k.replace('_', ' ')} | {v['psnr']:.3f} | {v['ssim']:.4f} | {v['clip_similarity']:.4f} |"
            for k, v in rec.items()
        ]
        lines += ["", "Paper: last layer 13.52 / 0.364 / 0.987; all layers 13.69 / 0.372 / 0.990.", ""]
        lines += ["![reconstruction](reconstruction/side_by_side.png)", ""]
    if "layer_analysis" in report:
        la = report["layer_analysis"]
        zones = ", ".join(f"{z['first']}-{z['last']}" for z in la["suggested_zones"])
        lines += [
            "## Layer analysis (figures 2, 4, 5) of the all-layer model",
            "",
            f"Zones suggested by the inter-layer similarity: {zones}.",
            "",
            "| zone removed | " + " | ".join(next(iter(la["zone_drop"].values()), {}).keys()) + " |",
            "|---|" + "---|" * len(next(iter(la["zone_drop"].values()), {})),
        ]
        for zone, drops in la["zone_drop"].items():
            lines.append(f"| {zone} | " + " | ".join(f"{v:+.4f}" for v in drops.values()) + " |")
        lines += ["", "(score drop versus all layers; positive = removal hurts)", ""]
        lines += [f"![{k}](layers/{Path(v).name})" for k, v in la["figures"].items()]
    path = out / "reproduce.md"
    path.write_text("\n".join(lines) + "\n")
    return path
