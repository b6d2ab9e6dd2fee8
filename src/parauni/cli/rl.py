"""``parauni rl``: Stage III (Flow-GRPO + LDAM) with a reward curriculum."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from .common import (
    add_run_args,
    add_world_stage0_args,
    check_run_folder,
    route,
)

DEMO_STAGE2 = "parauni-demo/stage2"  # where `parauni demo` (default --out) writes its Stage-II model


def cmd_rl(args: argparse.Namespace, overrides: list[str]) -> int:
    import dataclasses

    from ..config import apply_overrides, from_dict, load_yaml
    from ..models.parauni import ParaUni
    from ..models.references import copy_in
    from ..rl.config import RewardsConfig, RLConfig
    from ..rl.grpo import train_rl
    from ..rl.prompts import PromptSource
    from ..rl.rewards import CombinedReward, build_rewards
    from ..training.run_folder import command_line, write_run_record
    from ..world.reward_models import world_rewards

    rl_items, rest = route(overrides, "rl")
    reward_items, model_overrides = route(rest, "rewards")
    check_run_folder(args.out, args.resume, args.overwrite)
    rl_dict, rewards_dict = dataclasses.asdict(RLConfig()), {}
    model_dir = args.model
    if args.world:
        from ..world.release import existing_stage0
        from ..world.rl import WorldPromptSource

        wcfg, stage0 = existing_stage0("scratch" if args.cache else args.stage0, args.cache)
        rl_dict = dataclasses.asdict(wcfg.rl)
        rewards_dict = {"world": str(stage0)}
        if not model_dir:  # parauni demo's Stage-II model, in the working directory
            model_dir = DEMO_STAGE2
            if not Path(model_dir).is_dir():
                raise ConfigError(
                    f"--world without --model trains {model_dir} (parauni demo's Stage-II model, relative to the "
                    f"working directory {Path.cwd()}), which does not exist; run `parauni demo` here first or "
                    "give --model DIR"
                )
            print(
                f"RL on {Path(model_dir).resolve()} (parauni demo's Stage-II model; --model DIR for another)"
            )
    if not model_dir:
        raise ConfigError("parauni rl needs --model DIR (a Stage-II model folder), or --world")
    if args.config:
        data = load_yaml(args.config)
        unknown = sorted(set(data) - {"rl", "rewards"})
        if unknown:
            raise ConfigError(
                f"{args.config}: unknown section(s) {unknown}; an RL config has 'rl' and 'rewards'"
            )
        rl_dict = {**rl_dict, **data.get("rl", {})}
        rewards_dict = {**rewards_dict, **data.get("rewards", {})}
    rl_cfg = from_dict(RLConfig, apply_overrides(rl_dict, rl_items), prefix="rl.")
    rewards_cfg = from_dict(RewardsConfig, apply_overrides(rewards_dict, reward_items), prefix="rewards.")
    if args.prompts:
        prompts = PromptSource.from_file(args.prompts)
    elif args.world:
        prompts = WorldPromptSource()
    else:
        raise ConfigError("parauni rl needs --prompts FILE (.txt or GenEval-style .jsonl), or --world")
    model = ParaUni.load(model_dir, model_overrides)
    shapes = world_rewards(rewards_cfg.world, batch_size=rewards_cfg.batch_size) if rewards_cfg.world else {}
    rewards = build_rewards(rewards_cfg, shapes)
    combined = CombinedReward(rewards, {name: 1.0 for name in rewards})
    print(
        f"RL: {rl_cfg.total_epochs} epochs over phases "
        + ", ".join(f"{p.name} ({p.epochs} epochs, {p.rewards}, zone {p.zone})" for p in rl_cfg.phases)
        + f"; rewards available: {sorted(rewards)}"
    )
    result = train_rl(
        model,
        lambda images, prompts_, metadata: combined(images, prompts_, metadata)[1],
        list(rewards),
        prompts,
        rl_cfg,
        args.out,
        resume=args.resume,
        progress=not args.quiet,
    )
    first, last = result.history[0], result.history[-1]
    if args.self_contained:
        copied = copy_in(Path(args.out))
        print(f"copied {', '.join(copied) or 'nothing'} into {args.out}: the folder stands alone")
    rewards_now = {
        k[len("reward_") :]: v for k, v in last.items() if k.startswith("reward_") and not k.endswith("_std")
    }
    record = {"stage": 3, "unit": "RL epochs", "steps": len(result.history), "final_rewards": rewards_now}
    record["data"] = f"RL prompts from {args.prompts or 'the shapes world'}; rewards {sorted(rewards)}"
    write_run_record(Path(args.out), {**record, "command": command_line(), "settings": {}})
    for key in sorted(k for k in last if k.startswith("reward_") and not k.endswith("_std")):
        print(f"{key[len('reward_') :]}: first epoch {first[key]:.4f} -> last epoch {last[key]:.4f}")
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
        "--rewards.key=value (e.g. --rewards.clip=openai/clip-vit-large-patch14), and model overrides",
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
