"""``parauni analyze layers``: the role of each VLM layer (per-layer scores, similarity, zone removal)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..utils.files import check_output_dir, read_lines
from .common import (
    OVERRIDE_HELP,
    add_model_arg,
    add_quiet,
    add_sampling_args,
    add_world_stage0_args,
    first_n,
    sampling_options,
)


def _analysis_prompts(args: argparse.Namespace) -> tuple[list[str], list[dict] | None]:
    """Prompts (and GenEval metadata rows, when known) for ``parauni analyze``."""
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(
                f"--prompts {path} does not exist; give a .txt (one a line) or a GenEval .jsonl"
            )
        if path.suffix == ".jsonl":
            from ..world.captions import read_metadata

            rows = read_metadata(path)
            prompts, metadata = [r["prompt"] for r in rows], rows
        else:
            prompts = [line.strip() for line in read_lines(path, "--prompts") if line.strip()]
            metadata = None
    elif args.world:
        from ..world.captions import make_eval_metadata

        metadata = make_eval_metadata(per_tag=2)
        prompts = [r["prompt"] for r in metadata]
    else:
        raise ConfigError("give --prompts FILE (or --world for the shapes world's evaluation prompts)")
    prompts = first_n(prompts, args.limit)
    metadata = None if metadata is None else first_n(metadata, args.limit)
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts} holds no prompts")
    return prompts, metadata


def cmd_analyze_layers(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..analysis.layers import analyze_layers, format_tables
    from ..models.parauni import ParaUni

    if args.world == bool(args.clip):
        raise ConfigError(
            "give exactly one reward source: --world (the shapes world's rewards) or --clip PATH_OR_ID"
        )
    options = sampling_options(args)
    check_output_dir(args.out, overwrite=args.overwrite)
    if args.cache and not args.world:
        raise ConfigError("--cache is the shapes world's Stage-0 cache; it needs --world")
    prompts, metadata = _analysis_prompts(args)
    if args.world:
        from ..world.release import existing_stage0
        from ..world.reward_models import world_rewards

        rewards = world_rewards(existing_stage0("scratch" if args.cache else args.stage0, args.cache)[1])
        if metadata is None:  # the GenEval-style reward needs metadata rows
            rewards.pop("geneval")
    else:
        from ..rl.rewards import CLIPScore

        rewards = {"clip": CLIPScore.from_pretrained(args.clip)}
    model = ParaUni.load(args.model, overrides)
    for reward in rewards.values():
        reward.to(model.device)
    result = analyze_layers(
        model, prompts, metadata, rewards, args.out, options=options, progress=not args.quiet
    )
    print(format_tables(result))
    print(f"numbers in {Path(args.out) / 'analysis.json'}; figures " + ", ".join(result["figures"].values()))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    p = sub.add_parser("analyze", help="analyses of a model: the role of each VLM layer")
    analyses = p.add_subparsers(dest="analyze_command", required=True)
    p = analyses.add_parser(
        "layers",
        help="per-layer conditioning scores, inter-layer similarity and zone removal (paper figs. 2, 4, 5)",
        epilog=OVERRIDE_HELP,
    )
    add_model_arg(p)
    p.add_argument(
        "--out",
        required=True,
        help="output folder: analysis.json, per_layer_scores.png, layer_similarity.png, zone_removal.png",
    )
    p.add_argument(
        "--prompts",
        help="a .txt (one prompt a line) or a GenEval metadata .jsonl (default with --world: its eval set)",
    )
    p.add_argument(
        "--world", action="store_true", help="the shapes world's rewards (aesthetic, clip, geneval)"
    )
    add_world_stage0_args(p)
    p.add_argument("--clip", help="a CLIP model folder or Hugging Face id: CLIP score as the reward")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    add_sampling_args(p, "image i uses noise seed seed + i (same for every run)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files")
    add_quiet(p)
    p.set_defaults(fn=cmd_analyze_layers)
