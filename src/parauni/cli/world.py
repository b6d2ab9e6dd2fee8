"""``parauni demo``, ``reproduce`` and ``world pretrain``: the embedded shapes world."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..utils.files import check_output_dir
from .common import add_quiet, only_world_overrides


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..world.demo import run_demo

    world_overrides = only_world_overrides(overrides, "demo")
    out = Path(args.out)
    earlier_report = (out / "report.md").is_file() or (out / "metrics.json").is_file()
    check_output_dir(out, overwrite=args.overwrite, resumable=earlier_report)
    run_demo(
        args.out,
        args.cache,
        quick=args.quick,
        overrides=world_overrides,
        progress=not args.quiet,
        stage0=args.stage0,
        stages=tuple(args.stages),
    )
    return 0


def cmd_world_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..world.release import run_pretrain

    world_overrides = only_world_overrides(overrides, "world pretrain")
    check_output_dir(args.out, resumable=True)  # a rerun resumes the phases already done
    phases = args.phases.split(",") if args.phases else None
    run_pretrain(args.out, world_overrides, phases, recipe=not args.no_recipe, progress=not args.quiet)
    return 0


def cmd_reproduce(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..world.reproduce import run_reproduce

    world_overrides = only_world_overrides(overrides, "reproduce")
    check_output_dir(args.out, resumable=True)  # a rerun continues the table
    run_reproduce(
        args.out,
        seeds=args.seeds,
        rows=args.rows,
        cache_dir=args.cache,
        quick=args.quick,
        overrides=world_overrides,
        analyses=not args.no_analyses,
        progress=not args.quiet,
        stage0=args.stage0,
        lim=args.lim,
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    _add_demo(sub)
    _add_reproduce(sub)
    _add_world(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and measure the whole pipeline on the embedded shapes world",
        epilog="world overrides as --world.section.key=value, e.g. --world.parauni.stage1.steps=2000",
    )
    p.add_argument(
        "--out",
        default="parauni-demo",
        help="report folder; an earlier demo report there is replaced (default: parauni-demo)",
    )
    p.add_argument(
        "--stage0",
        default="release",
        help="the world's Stage-0 models: 'release' (shipped with the package, default), 'scratch' (train quick "
        "ones here, cached in --cache), a folder written by `parauni world pretrain`, or a Hub id",
    )
    p.add_argument(
        "--cache", help="with --stage0 scratch: its cache (default: $PARAUNI_CACHE or ~/.cache/parauni/world)"
    )
    p.add_argument(
        "--stages",
        type=int,
        nargs="+",
        choices=(1, 2, 3),
        default=[1, 2, 3],
        help="ParaUni's stages to train, each on the model of the one before: 1 2 3 (default), 1 2 (no RL) or 1",
    )
    p.add_argument("--quick", action="store_true", help="every stage for a few steps (smoke test)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into an --out folder that holds other files"
    )
    add_quiet(p)
    p.set_defaults(fn=cmd_demo)


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="the paper's ablation table on the shapes world (rows x seeds, resumable)",
        epilog="world overrides as --world.section.key=value, e.g. --world.eval.per_tag=20",
    )
    p.add_argument("--out", default="parauni-reproduce", help="output folder (rerun to continue)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default 0 1 2)")
    p.add_argument(
        "--rows",
        nargs="+",
        help="only these rows (default: all that differ on the --lim base): last_layer last_layer_ln all_layers "
        "no_shallow no_middle no_deep interval no_layernorm layernorm rl_no_ldam ldam_no_grad_gate "
        "ldam_no_reward_gate full",
    )
    p.add_argument(
        "--lim",
        choices=("paper", "world"),
        default="paper",
        help="the LIM the rows build on: 'paper' (with its LayerNorm, without whitening; default) or 'world' "
        "(the world's own: no LayerNorm, whitened query states, as the demo)",
    )
    p.add_argument(
        "--stage0",
        default="release",
        help="the world's Stage-0 models: 'release' (shipped, default), 'scratch', a release folder or a Hub id",
    )
    p.add_argument("--cache", help="Stage-0 cache (default: as parauni demo)")
    p.add_argument("--quick", action="store_true", help="every stage for a few steps (smoke test)")
    p.add_argument(
        "--no-analyses", action="store_true", help="skip the reconstruction comparison and layer analyses"
    )
    add_quiet(p)
    p.set_defaults(fn=cmd_reproduce)


def _add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="the shapes world's own models")
    worlds = p.add_subparsers(dest="world_command", required=True)
    p = worlds.add_parser(
        "pretrain",
        help="train the world's Stage-0 models by the long recipe (resumable: rerun the same command)",
        epilog="world overrides as --world.section.key=value on top of the recipe, e.g. --world.t2i.train.steps=500",
    )
    p.add_argument("--out", required=True, help="the Stage-0 folder (a killed run resumes from it)")
    p.add_argument(
        "--phases",
        help="comma-separated subset of vlm,ae,t2i,rewards (default: all, then measured and finished as a "
        "release); two processes may train different phases into one --out at once",
    )
    p.add_argument(
        "--no-recipe",
        action="store_true",
        help="the world config's quick defaults instead of the long recipe",
    )
    add_quiet(p)
    p.set_defaults(fn=cmd_world_pretrain)
