"""``parauni rl``: Stage III (Flow-GRPO + LDAM) with a reward curriculum."""

from __future__ import annotations

import argparse

from .common import (
    add_run_args,
    add_world_stage0_args,
    check_run_folder,
    route,
)


def cmd_rl(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..training.run import RunOptions
    from ..world.rl import RLRequest, run_rl_request

    rl_items, rest = route(overrides, "rl")
    reward_items, rest = route(rest, "rewards")
    world_items, model_overrides = route(rest, "world")
    request = RLRequest(
        args.out, args.model, args.config, args.prompts, args.world, args.stage0, args.cache,
        rl_items, reward_items, model_overrides, world_items,
    )  # fmt: skip
    run = RunOptions(resume=args.resume, progress=not args.quiet, self_contained=args.self_contained)
    result = run_rl_request(request, run, lambda: check_run_folder(args.out, args.resume, args.overwrite))
    if result.copied is not None:
        print(f"copied {', '.join(result.copied) or 'nothing'} into {args.out}: the folder stands alone")
    first, last = result.history[0], result.history[-1]
    for key in sorted(k for k in last if k.startswith("reward_") and not k.endswith("_std")):
        print(f"{key[len('reward_') :]}: first epoch {first[key]:.4f} -> last epoch {last[key]:.4f}")
    if len(result.evals) > 1:  # rl.eval_prompts: the same held-out prompts and noise before and after
        from ..rl.plots import paired_rise, rise_verdict

        a, b = result.evals[0], result.evals[-1]
        for key in sorted(k for k in a if k.startswith("prompt_means_")):
            r = paired_rise(a, b, key[len("prompt_means_") :])
            print(
                f"{key[len('prompt_means_') :]}: held-out {a['prompts']} prompts x {a['images']} images "
                f"{r['start']:.4f} -> {r['end']:.4f} +- {r['se']:.4f} ({rise_verdict(r)})"
            )
    print(
        f"LDAM triggers: {sum(bool(r.get('ldam_triggered')) for r in result.history)}; log {result.log_path}"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
    p = sub.add_parser(
        "rl",
        help="Stage III: Flow-GRPO with LDAM and a reward curriculum",
        epilog="overrides: --rl.key=value (e.g. --rl.group_size=8 --rl.ldam.enabled=false), "
        "--rewards.key=value (e.g. --rewards.clip=openai/clip-vit-large-patch14), with --world the world's "
        "--world.key=value (e.g. --world.rl_recipe=paper: the paper's Flow-GRPO on a LoRA), and model overrides",
    )
    p.add_argument("--model", help="the Stage-II model folder (with --world: default parauni-demo/stage2)")
    p.add_argument("--out", required=True, help="run folder: the RL policy, checkpoints/ and rl_log.jsonl")
    p.add_argument("--config", help="a YAML file with 'rl' (RLConfig) and 'rewards' (RewardsConfig) sections")
    p.add_argument("--prompts", help="RL prompts: .txt (one a line) or .jsonl with 'prompt' (GenEval rows)")
    p.add_argument("--world", action="store_true", help="the shapes world: its prompts, rewards and defaults")
    p.add_argument(
        "--self-contained",
        action="store_true",
        help="copy the frozen parts the policy refers to outside --out into it, so that the folder stands alone "
        "(default: referred to by relative path, pinned by sha256)",
    )
    add_world_stage0_args(p)
    add_run_args(p)
    p.set_defaults(fn=cmd_rl)
