"""``parauni train`` and ``extract-latents``: Stages I / II on the user's own data, and its VAE latents."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.files import check_output_dir
from .common import (
    DATA_HELP,
    OVERRIDE_HELP,
    add_data_args,
    add_quiet,
    add_run_args,
    check_run_folder,
    route,
)


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..training.run import DataStage, RunOptions, run_stage_on_data
    from ..training.sources import DataOptions

    options = DataOptions(args.image_column, args.caption_column, args.shards_per_group)
    request = DataStage(args.stage, args.data, args.model, args.out, args.image_size, options, args.cache_dir)
    request.train_overrides, request.model_overrides = route(overrides, "train")
    run = RunOptions(resume=args.resume, progress=not args.quiet, self_contained=args.self_contained)
    report = run_stage_on_data(request, run, lambda: check_run_folder(args.out, args.resume, args.overwrite))
    result, start, more = report.result, report.start, report.skipped_while_training
    if report.copied is not None:
        print(f"copied {', '.join(report.copied) or 'nothing'} into {args.out}: the folder stands alone")
    done = f"{result.steps} steps" if start == 0 else f"steps {start}-{result.steps} of {result.steps}"
    print(
        f"stage {args.stage}: {done} in {result.seconds:.1f} s, final loss {result.final_loss:.4f}; "
        f"model written to {result.model_dir}"
        + (f"; skipped {more} more corrupt sample(s) while streaming" if more else "")
    )
    return 0


def cmd_extract_latents(args: argparse.Namespace, overrides: list[str]) -> int:
    from accelerate import Accelerator

    from ..models.parauni import ParaUni
    from ..training.latents import extract_latents, finish_extraction, vae_encoder
    from ..training.sources import DataOptions, pixel_source

    check_output_dir(args.out, resumable=True)  # a rerun with the same options resumes
    config = ParaUni.load_config(args.model, overrides)
    root = Path(args.model) if Path(args.model).is_dir() else None
    size = args.image_size or config.sampling.height
    acc = Accelerator()  # the processes of accelerate launch / torchrun (on CPUs: ACCELERATE_USE_CPU=true)
    source = pixel_source(args.data, size, DataOptions(args.image_column, args.caption_column))
    encode, key = vae_encoder(config, root, acc.device)
    result = extract_latents(
        source,
        encode,
        args.out,
        image_size=size,
        encoder_key=key,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        rank=acc.process_index,
        num_processes=acc.num_processes,
        progress=not args.quiet,
    )
    print(
        f"process {acc.process_index + 1} of {acc.num_processes}: wrote {result.written} shard(s), "
        f"{result.reused} already done, skipped {result.skipped} corrupt sample(s)"
    )
    acc.wait_for_everyone()
    if acc.is_main_process:
        manifest = finish_extraction(args.out)
        print(
            f"latents of {sum(manifest['sizes'])} samples ({len(manifest['skipped'])} corrupt skipped) at "
            f"{size} px, shape {manifest['latent_shape']}, in {manifest['num_shards']} shard(s) in {args.out}; "
            f"train with parauni train --data {args.out}"
        )
    return 0


def train_epilog() -> str:
    """``parauni train --help``'s list of the --train.* keys with their per-stage defaults and meaning."""
    import dataclasses

    from ..training.config import STAGE_DEFAULTS, TrainConfig

    lines = [
        "training settings as --train.key=value (e.g. --train.steps=2000 --train.batch_size=64 --train.lr=1e-4):"
    ]
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        staged = {stage: d[f.name] for stage, d in STAGE_DEFAULTS.items() if f.name in d}
        shown = ", ".join(f"{v} at stage {k}" for k, v in staged.items()) if staged else default
        lines.append(f"  --train.{f.name:<24} {f.metadata.get('help', '')} (default: {shown})")
    lines.append(
        "model settings as --section.key=value (e.g. --lim.layers=last); all keys: docs/configuration.md"
    )
    return "\n".join(lines)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    p = sub.add_parser("train", help="Stage I / II on your own image-caption folder", epilog=train_epilog())
    p.add_argument("--stage", type=int, required=True, choices=[1, 2], help="1: queries + LIM; 2: + DiT")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--model",
        required=True,
        help="preset, YAML or model folder to start from (Stage II: Stage I's output)",
    )
    p.add_argument(
        "--out", required=True, help="run folder: the trained model, checkpoints/ and train_log.jsonl"
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="square training size, kept as the model's sampling size (default: train.image_size if given, "
        "else the model's sampling size; latents: theirs)",
    )
    add_data_args(p)
    p.add_argument(
        "--shards-per-group",
        type=int,
        default=4,
        help="sharded data: shards whose samples are shuffled together (default: 4)",
    )
    p.add_argument(
        "--cache-dir",
        help="a folder of images: where their prepared inputs (VAE latents) are cached "
        "(default: .parauni_cache in the data folder)",
    )
    p.add_argument(
        "--self-contained",
        action="store_true",
        help="copy the frozen parts the model refers to outside --out (e.g. Stage I's vlm/ and vae/) into it, "
        "so that the folder stands alone (default: referred to by relative path, pinned by sha256)",
    )
    add_run_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "extract-latents",
        help="VAE latents of a data set in safetensors shards (run under accelerate launch to split the work)",
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--data", required=True, help="the images + captions, in any --data form of parauni train but latents"
    )
    p.add_argument("--model", required=True, help="preset, YAML or model folder whose VAE encodes the images")
    p.add_argument("--out", required=True, help="latents folder (rerun with the same options to resume)")
    p.add_argument("--image-size", type=int, help="square image size (default: the model's sampling size)")
    add_data_args(p)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per latent shard (default: 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default: 32)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="stored latent dtype"
    )
    add_quiet(p)
    p.set_defaults(fn=cmd_extract_latents)
