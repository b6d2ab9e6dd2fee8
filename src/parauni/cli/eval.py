"""``parauni eval``: GenEval, DPG-Bench and reconstruction, generation and scoring."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..utils.files import check_output_dir, check_output_file, read_lines
from .common import (
    OVERRIDE_HELP,
    add_benchmark_args,
    add_model_arg,
    add_quiet,
    add_sampling_args,
    add_score_args,
    first_n,
    no_overrides,
    sampling_options,
)


def _detector(args: argparse.Namespace):
    """The GenEval detector named by --detector, --detections, --detector-model and --clip."""
    from ..eval.geneval import choose_detector
    from ..world.detector import world_detector_choice

    return choose_detector(
        args.detector, args.detections, args.detector_model, args.clip, world=world_detector_choice
    )


def _score_and_print(args: argparse.Namespace, images: str, out: Path, detector=None) -> None:
    """Score `images` with `detector` (a DetectorChoice), by default the one the arguments name."""
    from ..eval.geneval import format_summary, score_geneval

    d = detector or _detector(args)
    summary = score_geneval(
        images, d.detect, d.classify_colors, out, classes=d.classes, progress=not args.quiet
    )
    print(format_summary(summary))
    print(f"per-image results: {out}; summary: {out.parent / 'summary.json'}")


def cmd_eval_geneval(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..eval.geneval import generate_geneval
    from ..models.parauni import ParaUni
    from ..world.captions import read_metadata

    if args.no_score and (args.detector or args.detections or args.detector_model or args.clip):
        raise ConfigError(
            "--no-score skips scoring; drop --detector / --detections / --detector-model / --clip"
        )
    options = sampling_options(args)
    check_output_dir(args.out, resumable=True)  # a rerun completes the prompts not yet generated
    # Load the detector before spending time on generation (its errors come first).
    detector = None if args.no_score else _detector(args)
    metadata = Path(args.metadata)
    if not metadata.is_file():
        raise ConfigError(f"--metadata {metadata} does not exist; give GenEval's evaluation_metadata.jsonl")
    read_lines(metadata, "--metadata")  # a line that is not UTF-8 is named before the rows are parsed
    rows = first_n(read_metadata(metadata), args.limit)
    model = ParaUni.load(args.model, overrides)
    counts = generate_geneval(
        model,
        rows,
        args.out,
        images_per_prompt=args.images_per_prompt,
        options=options,
        progress=not args.quiet,
    )
    print(
        f"GenEval: {counts['generated']} prompt(s) generated, {counts['skipped']} already complete, "
        f"{args.images_per_prompt} image(s) each, in {args.out}"
    )
    if detector is not None:
        _score_and_print(args, args.out, Path(args.out) / "results.jsonl", detector)
    return 0


def cmd_eval_geneval_score(args: argparse.Namespace, overrides: list[str]) -> int:
    no_overrides(overrides, "eval geneval-score")
    check_output_file(args.out, overwrite=args.overwrite)
    _score_and_print(args, args.images, Path(args.out))
    return 0


def _dpg_questions(args: argparse.Namespace):
    """The parsed --csv and the checked --vqa source (both needed to score)."""
    from ..eval.dpg import check_vqa_source, read_dpg_csv

    if not (args.csv and args.vqa):
        raise ConfigError(
            "scoring needs --csv dpg_bench.csv (ELLA's question file) and --vqa PATH_OR_ID "
            "(a BLIP VQA model folder or id, e.g. Salesforce/blip-vqa-base)"
        )
    return read_dpg_csv(args.csv), check_vqa_source(args.vqa)


def _dpg_score_and_print(
    args: argparse.Namespace, items: dict, vqa_source: str, images: str, out: Path
) -> None:
    from ..eval.dpg import BlipVQA, format_dpg_summary, score_dpg
    from ..utils.device import default_device

    device = args.device or default_device()
    vqa = BlipVQA.from_pretrained(vqa_source, device=device)
    summary = score_dpg(images, items, vqa, out, category_crops=args.category_crops, progress=not args.quiet)
    print(format_dpg_summary(summary))
    if summary["unscored"]:
        print(f"{summary['unscored']} prompt(s) of {args.csv} have no grid in {images} and were not scored")
    print(f"per-prompt results: {out}; summary: {out.parent / 'summary.json'}")


def cmd_eval_dpg(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..eval.dpg import RESULTS_FILE, generate_dpg, read_dpg_prompts
    from ..models.parauni import ParaUni

    options = sampling_options(args)
    check_output_dir(args.out, resumable=True)  # a rerun completes the grids not yet generated
    if args.no_score and (args.csv or args.vqa):
        raise ConfigError("--no-score skips scoring; drop --csv / --vqa")
    # Check the scoring inputs before spending time on generation.
    items, vqa_source = (None, None) if args.no_score else _dpg_questions(args)
    prompts = first_n(read_dpg_prompts(args.prompts), args.limit)
    options = options.sized(ParaUni.load_config(args.model, overrides).sampling)
    model = ParaUni.load(args.model, overrides)
    model.check_size(options.height, options.width)
    counts = generate_dpg(model, prompts, args.out, options=options, progress=not args.quiet)
    del model  # free the generator before the VQA model loads
    print(
        f"DPG-Bench: {counts['generated']} grid(s) generated, {counts['skipped']} already there, in {args.out}"
    )
    if not args.no_score:
        _dpg_score_and_print(args, items, vqa_source, args.out, Path(args.out) / RESULTS_FILE)
    return 0


def cmd_eval_dpg_score(args: argparse.Namespace, overrides: list[str]) -> int:
    no_overrides(overrides, "eval dpg-score")
    check_output_file(args.out, overwrite=args.overwrite)
    items, vqa_source = _dpg_questions(args)
    _dpg_score_and_print(args, items, vqa_source, args.images, Path(args.out))
    return 0


def _model_names(sources: list[str]) -> list[str]:
    """Output folder names: each model's folder (or preset) name, prefixed by its index if names repeat."""
    names = [Path(s).name or s for s in sources]
    if len(set(names)) == len(names):
        return names
    return [f"{i}_{name}" for i, name in enumerate(names)]


def cmd_eval_reconstruct(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..eval.reconstruct import read_image_folder, reconstruct_folder, side_by_side
    from ..models.parauni import ParaUni
    from ..scoring.clip import CLIPEmbedder

    options = sampling_options(args)
    options = replace(options, height=args.image_size, width=args.image_size)  # None: each model's size
    check_output_dir(args.out, overwrite=args.overwrite)
    images = Path(args.images)
    if not images.is_dir():
        raise ConfigError(f"--images {images} is not a folder")
    # Fail on an empty / unreadable folder before loading any model (the size does not matter here).
    read_image_folder(images, 8, 8)
    clip = CLIPEmbedder.from_pretrained(args.clip, text=False) if args.clip else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, columns = [], {}
    for name, source in zip(_model_names(args.model), args.model, strict=True):
        model = ParaUni.load(source, overrides)
        result = reconstruct_folder(
            model, images, out / name, options=options, clip=clip, progress=not args.quiet
        )
        columns.setdefault("input", result.inputs)
        columns[name] = result.outputs
        summary.append(
            {
                "name": name,
                "model": source,
                "lim_layers": model.config.lim.layers,
                "dir": str(out / name),
                "num_images": result.metrics["num_images"],
                "mean": result.metrics["mean"],
            }
        )
        del model  # one model in memory at a time
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} unreadable file(s): "
            + ", ".join(s["file"] for s in result.skipped)
        )
    figure = side_by_side(columns, out / "side_by_side.png")
    (out / "reconstruct.json").write_text(
        json.dumps(
            {"images": str(images), "skipped": result.skipped, "models": summary, "figure": str(figure)},
            indent=2,
        )
    )

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"{'model':<24}{'images':>8}{'PSNR':>10}{'SSIM':>10}{'CLIP sim':>10}")
    for row in summary:
        m = row["mean"]
        print(
            f"{row['name']:<24}{row['num_images']:>8}{cell(m['psnr']):>10}{cell(m['ssim']):>10}"
            f"{cell(m.get('clip_similarity')):>10}"
        )
    print(
        f"reconstructions and metrics.json per model in {out}; figure {figure}; summary {out / 'reconstruct.json'}"
    )
    return 0


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detector",
        choices=["mask2former", "world", "file"],
        help="mask2former: GenEval's detector (Mask2Former + CLIP colours); world: the shapes world's detector; "
        "file: precomputed detections from --detections",
    )
    p.add_argument(
        "--detections",
        help="with --detector file: a JSONL of {filename, detections} (see parauni.eval.geneval)",
    )
    p.add_argument(
        "--detector-model",
        help="with --detector mask2former: a Mask2Former COCO-instance folder or Hugging Face id "
        "(default: facebook/mask2former-swin-small-coco-instance)",
    )
    p.add_argument(
        "--clip",
        help="with --detector mask2former: the colour classifier's CLIP folder or Hugging Face id "
        "(default: openai/clip-vit-large-patch14)",
    )


def _add_dpg_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", help="DPG-Bench's question file dpg_bench.csv (from the ELLA repository)")
    p.add_argument(
        "--vqa",
        help="the question answerer: a BLIP VQA folder or Hugging Face id (e.g. Salesforce/blip-vqa-base)",
    )
    p.add_argument(
        "--category-crops",
        choices=["last", "all"],
        default="last",
        help="category scores pool the raw answers of the last crop (the official scorer) or of all 4",
    )
    p.add_argument("--device", help="device of the VQA model (default: cuda if available, else cpu)")


@dataclass(frozen=True)
class _Benchmark:
    """A benchmark's two commands: NAME generates (resumably) and then scores, NAME-score scores an existing
    folder; both take the scorer's flags. `BENCHMARKS` lists one a row, its fields in this order."""

    name: str
    help: str
    add_inputs: Callable[[argparse.ArgumentParser], None]  # the generation's flags after --model
    run: Callable[[argparse.Namespace, list[str]], int]
    score_help: str
    images_help: str  # --images of NAME-score
    results_help: str  # --out of NAME-score
    add_scorer: Callable[[argparse.ArgumentParser], None]
    score: Callable[[argparse.Namespace, list[str]], int]


def _add_benchmark(evals: argparse._SubParsersAction, bench: _Benchmark) -> None:
    """Register `bench`'s two commands."""
    p = evals.add_parser(bench.name, help=bench.help, epilog=OVERRIDE_HELP)
    add_model_arg(p)
    bench.add_inputs(p)
    add_benchmark_args(p)
    bench.add_scorer(p)
    add_quiet(p)
    p.set_defaults(fn=bench.run)

    p = evals.add_parser(f"{bench.name}-score", help=bench.score_help)
    add_score_args(p, bench.images_help, bench.results_help)
    bench.add_scorer(p)
    p.set_defaults(fn=bench.score)


def _add_geneval_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl (or one like it)")
    p.add_argument(
        "--out", required=True, help="output folder: 00000/metadata.jsonl, 00000/samples/0000.png, ..."
    )
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    add_sampling_args(p, "image j of prompt i uses seed + i * images-per-prompt + j")


def _add_dpg_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, help='DPG-Bench prompts: a JSONL of {"item_id", "prompt"}')
    p.add_argument(
        "--out", required=True, help="output folder: <item_id>.png grids, results.jsonl, summary.json"
    )
    add_sampling_args(p, "image j of prompt i uses seed + i * 4 + j")
    p.add_argument("--height", type=int, help="height of each of the 4 images (default: the model's)")
    p.add_argument("--width", type=int, help="width of each of the 4 images (default: the model's)")


BENCHMARKS = (
    _Benchmark(
        "geneval",
        "GenEval images in the official layout (resumable), then their scores",
        _add_geneval_inputs,
        cmd_eval_geneval,
        "score an existing GenEval image folder",
        "a GenEval output folder (00000/metadata.jsonl, ...)",
        "per-image results JSONL; summary.json is written beside it",
        _add_detector_args,
        cmd_eval_geneval_score,
    ),
    _Benchmark(
        "dpg",
        "DPG-Bench 2x2 grids <item_id>.png (resumable), then their VQA scores",
        _add_dpg_inputs,
        cmd_eval_dpg,
        "score an existing DPG-Bench folder of <item_id>.png grids",
        "a folder of <item_id>.png 2x2 grids",
        "per-prompt results JSONL; summary.json is written beside it",
        _add_dpg_score_args,
        cmd_eval_dpg_score,
    ),
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    p = sub.add_parser(
        "eval", help="benchmarks: GenEval and DPG-Bench generation and scoring, reconstruction"
    )
    evals = p.add_subparsers(dest="eval_command", required=True)
    for bench in BENCHMARKS:
        _add_benchmark(evals, bench)

    p = evals.add_parser(
        "reconstruct",
        help='image reconstruction ("Keep the image as it is."): PSNR, SSIM, CLIP similarity per model',
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model folder or preset (repeat to compare, e.g. a last-layer and an all-layer model)",
    )
    p.add_argument("--images", required=True, help="a folder of input images")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: <model>/*.png + metrics.json, side_by_side.png, reconstruct.json",
    )
    p.add_argument(
        "--clip", help="a CLIP model folder or Hugging Face id for CLIP similarity (default: none)"
    )
    p.add_argument("--image-size", type=int, help="square size (default: each model's sampling size)")
    add_sampling_args(p)
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files")
    add_quiet(p)
    p.set_defaults(fn=cmd_eval_reconstruct)
