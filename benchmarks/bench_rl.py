"""Stage III on the shapes world: what RL moves, LDAM on vs off, LDAM per reward vs on the phase signal.

    python benchmarks/bench_rl.py --mode geneval --recipe nft --seeds 0 1 2 --stage2 parauni-demo/stage2
    python benchmarks/bench_rl.py --mode geneval --recipe geneval --seeds 0 1 2 --stage2 parauni-demo/stage2
                                  [--shapeseval-before 0.429] [--timing-epochs 0]
    python benchmarks/bench_rl.py --mode ldam --seeds 0 1 2 [--recipe demo|geneval|nft] [--rl phases.0.epochs=20]
    python benchmarks/bench_rl.py --mode monitor --seeds 0 1 2          # LDAM per reward vs the phase signal
    python benchmarks/bench_rl.py --mode sanity --seeds 0 [--rl phases.0.epochs=6]   # can RL learn brightness?
    python benchmarks/bench_rl.py --quick --seeds 0     # the quick world, a fresh Stage-II model (smoke test)
    python benchmarks/bench_rl.py --gate-rates [--gate-rounds 1000 --gate-phases 100]   # synthetic gate rates

Needs the world's Stage-0 models (the shipped release by default; `--quick` trains the quick world's) and a
Stage-II world model (the demo's `stage2/` folder; `--quick` without `--stage2` uses an untrained one). World
overrides (`--world.eval.per_tag=20`) change the world config; `--rl key=value` overrides the chosen recipe;
`--recipe demo` is the world's own Stage III (`world.rl`: the nft curriculum, or with `--world.rl_recipe=paper`
the paper's Flow-GRPO).

1. Epoch time before / after computing each prompt's query states once per epoch (issue 15, item 8; skip with
   `--timing-epochs 0`).
2. For every seed, RL from the same Stage-II weights once per variant of the mode (geneval: one run; ldam: on /
   off; monitor: per reward / phase / off): per run, the triggers (with their zones and epochs), each reward a
   phase optimises over the phase's first and last 2 epochs with the standard error of the difference (over
   prompts) and whether it rose beyond 2 of them, and ShapesEval after RL; then mean +- std over the seeds
   of the RL time, the triggers, each reward's end value (mean of the last 2 epochs), ShapesEval and its gain
   over the Stage-II model. `--mode geneval` then prints whether the issue-26 target is met: a gain of 0.05 or
   more, beyond 2 std of the seeds, in at most 600 s of RL a run.

`--mode sanity` checks that RL can learn at all: the mean brightness of the image as the only reward (the world's
RL defaults otherwise, KL and LDAM off, constant lr), run once at the recipe's lr and once at lr 0 with the
same seed (the same prompts and noise every epoch); it prints the per-epoch difference of the two runs' mean
brightness against the per-sample std. No ShapesEval.

Whether LDAM helps on the world is a finding, whichever way it goes; nothing here fails on a miss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from parauni.config import with_overrides
from parauni.models.parauni import ParaUni
from parauni.rl.ldam import LDAMConfig, replay
from parauni.rl.plots import (
    plot_reward_curves,
    reward_names,
    reward_rises,
    rise_verdict,
    trigger_summary,
)

# the LDAM settings --gate-rates compares: the paper's constants, the world's before and after issue 15
GATE_SETTINGS = {
    "paper (W 5, 5 drops, 2 std)": LDAMConfig(),
    "paper, OR (gate_logic any)": LDAMConfig(gate_logic="any"),
    "world before (W 3, 2 drops, 1 std)": LDAMConfig(window=3, drop_epochs=2, grad_sigmas=1.0),
    "world now (W 3, 1 drop, 0 std)": LDAMConfig(window=3, drop_epochs=1, grad_sigmas=0.0),
    "world now, grad gate off": LDAMConfig(window=3, drop_epochs=1, grad_sigmas=0.0, grad_gate=False),
    "world now, reward gate off": LDAMConfig(window=3, drop_epochs=1, grad_sigmas=0.0, reward_gate=False),
}


# the runs each mode compares: label -> RL overrides
MODES = {
    "ldam": {"LDAM on": ["ldam.enabled=true"], "LDAM off": ["ldam.enabled=false"]},
    "monitor": {
        "per reward": ["ldam.enabled=true", "ldam.monitor=reward"],
        "phase": ["ldam.enabled=true", "ldam.monitor=phase"],
        "LDAM off": ["ldam.enabled=false"],
    },
    "geneval": {"RL": []},
    "sanity": {},
}


def gate_rates(rounds: int = 12, phases: int = 4000, trends: tuple[float, ...] = (0.0, 0.5, 1.0)) -> dict:
    """Mean LDAM triggers per phase of ``rounds`` rounds for each of ``GATE_SETTINGS``.

    Each phase's rewards are ``trend * round + N(0, 1)`` (a trend in units of the epoch mean's noise) and its
    gradient norms ``exp(0.3 N(0, 1))``, i.i.d. Returns {setting: {trend: (mean triggers, P(at least one))}}.
    """
    rng = np.random.default_rng(0)
    out: dict = {}
    for name, cfg in GATE_SETTINGS.items():
        out[name] = {}
        for trend in trends:
            counts = []
            for _ in range(phases):
                rewards = (trend * np.arange(rounds) + rng.normal(size=rounds)).tolist()
                norms = np.exp(0.3 * rng.normal(size=rounds)).tolist()
                counts.append(sum(s["triggered"] for s in replay(cfg, rewards, norms)))
            out[name][trend] = (float(np.mean(counts)), float(np.mean(np.array(counts) > 0)))
    return out


def print_gate_rates(rounds: int = 12, phases: int = 4000) -> dict:
    rates = gate_rates(rounds, phases)
    trends = list(next(iter(rates.values())))
    print(
        f"LDAM triggers per {rounds}-round phase ({phases} synthetic phases; rewards trend x round + N(0, 1)):"
    )
    print(f"  {'setting':<38}" + "".join(f"  trend {t:<4} (P>=1)" for t in trends))
    for name, by_trend in rates.items():
        print(f"  {name:<38}" + "".join(f"  {m:8.2f} ({p:4.2f})  " for m, p in by_trend.values()))
    return rates


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Epoch-wise mean of several runs' logs (same epochs and phases); a trigger in any run is kept."""
    out = []
    for rows in zip(*runs, strict=True):
        keys = [k for k in rows[0] if k.startswith("reward_") and not k.endswith("_std")]
        row = {"epoch": rows[0]["epoch"], "phase": rows[0]["phase"]}
        row.update({k: float(np.mean([r[k] for r in rows])) for k in keys})
        hit = [r for r in rows if r.get("ldam_triggered")]
        row["ldam_triggered"] = bool(hit)
        row["ldam_zone"] = hit[0].get("ldam_zone", "") if hit else ""
        out.append(row)
    return out


def _pm(values: list[float], fmt: str = ".3f") -> str:
    return f"{np.mean(values):{fmt}} +- {np.std(values):{fmt}}"


def _tags(result: dict) -> str:
    """ShapesEval's per-tag scores on one line."""
    return " ".join(f"{tag} {score:.2f}" for tag, score in result["tags"].items())


def _run(args, cfg, stage0: Path, w, out: Path):
    """One RL run from the Stage-II weights; returns (model, its RLResult, seconds)."""
    from parauni.world.rl import run_world_rl

    model = ParaUni.from_pretrained(args.stage2)
    t = time.time()
    result = run_world_rl(model, w, stage0, out, progress=False, log=lambda *a: None)
    return model, result, time.time() - t


def brightness(images, prompts, metadata) -> dict[str, list[float]]:
    """The sanity reward: each image's mean pixel value (images in [-1, 1])."""
    return {"bright": images.float().mean(dim=(1, 2, 3)).tolist()}


def sanity(args, base, out: Path) -> dict:
    """RL on the brightness alone at ``base.lr`` and at lr 0 (same seed); per epoch, the difference of the means."""
    from parauni.rl.config import PhaseConfig
    from parauni.rl.grpo import train_rl
    from parauni.world.rl import WorldPromptSource

    phase = PhaseConfig("bright", {"bright": 1.0}, base.phases[0].epochs, "deep", beta=0.0)
    rows = {}
    for label, lr in (("RL", base.lr), ("lr 0", 0.0)):
        w = dataclasses.replace(
            base,
            phases=[phase],
            lr=lr,
            lr_schedule="constant",
            seed=args.seeds[0],
            ldam=dataclasses.replace(base.ldam, enabled=False),
        )
        t = time.time()
        result = train_rl(
            ParaUni.from_pretrained(args.stage2),
            brightness,
            ["bright"],
            WorldPromptSource(),
            w,
            out / f"sanity_{label.replace(' ', '')}",
            progress=False,
            log=lambda *a: None,
        )
        rows[label] = result.history
        print(f"{label} (lr {lr:g}): {time.time() - t:.0f} s")
    diff = [a["reward_bright"] - b["reward_bright"] for a, b in zip(rows["RL"], rows["lr 0"], strict=True)]
    spread = float(np.mean([r["reward_bright_std"] for r in rows["lr 0"]]))
    print("brightness, RL minus lr 0, per epoch: " + " ".join(f"{d:+.4f}" for d in diff))
    print(
        f"per-sample std of the brightness: {spread:.4f}; last epoch's gain in stds: {diff[-1] / spread:+.2f}"
    )
    return {"difference": diff, "sample_std": spread}


def epoch_timing(args, cfg, stage0: Path, out: Path) -> dict:
    """Seconds per RL epoch with the VLM run at every call (before) and once per prompt and epoch (after)."""
    result = {}
    for label, cached in (("before", False), ("after", True)):
        w = with_overrides(
            cfg.rl,
            [
                "seed=0",
                f"phases.0.epochs={args.timing_epochs}",
                "phases.1.epochs=1",
                f"cache_conditions={cached}",
            ],
        )
        _, done, _ = _run(args, cfg, stage0, w, out / f"timing_{label}")
        rows = done.history
        result[label] = {"seconds": [r["seconds"] for r in rows[: args.timing_epochs]], "rows": rows}
    before, after = result["before"]["rows"], result["after"]["rows"]
    keys = [k for k in before[0] if k.startswith("reward_") and not k.endswith("_std")]
    result["first_epoch_reward_diff"] = max(abs(before[0][k] - after[0][k]) for k in keys)
    for label in ("before", "after"):
        result[label].pop("rows")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage2", help="the Stage-II world model folder (default parauni-demo/stage2)")
    parser.add_argument(
        "--stage0",
        default="release",
        help="the world's Stage-0 models, as `parauni demo --stage0` (default: shipped)",
    )
    parser.add_argument(
        "--cache", help="with --stage0 scratch or --quick: its cache (default: as parauni demo)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench-rl")
    parser.add_argument("--quick", action="store_true", help="the quick world (smoke test)")
    parser.add_argument("--no-eval", action="store_true", help="skip ShapesEval (rewards only)")
    parser.add_argument(
        "--shapeseval-before",
        type=float,
        help="the Stage-II model's ShapesEval overall, already measured with the same world eval settings "
        "(e.g. the demo's metrics.json): not measured again",
    )
    parser.add_argument("--timing-epochs", type=int, default=2, help="epochs of each timed run (0: skip)")
    parser.add_argument(
        "--mode",
        choices=list(MODES),
        default="ldam",
        help="ldam: LDAM on vs off; monitor: LDAM per reward vs on the phase's combined reward vs off; geneval: one "
        "run a seed (with --recipe geneval or nft: the ShapesEval credit alone, the +0.05 target); sanity: the brightness "
        "reward at the recipe's lr against lr 0 (the first seed only)",
    )
    parser.add_argument(
        "--recipe",
        choices=["demo", "geneval", "nft"],
        default="demo",
        help="the RL config (parauni.world.rl.RECIPES): the demo's curriculum (world.rl), the ShapesEval-credit "
        "recipe with Flow-GRPO (geneval) or with DiffusionNFT (nft)",
    )
    parser.add_argument(
        "--rl",
        action="append",
        default=[],
        help="an override of the recipe, e.g. --rl ldam.window=5 (repeatable)",
    )
    parser.add_argument("--gate-rates", action="store_true", help="only the synthetic LDAM gate rates")
    parser.add_argument("--gate-rounds", type=int, default=12, help="--gate-rates: rounds per phase")
    parser.add_argument("--gate-phases", type=int, default=4000, help="--gate-rates: synthetic phases")
    args, overrides = parser.parse_known_args()
    if args.gate_rates:
        print_gate_rates(args.gate_rounds, args.gate_phases)
        return
    from parauni.world.captions import make_eval_metadata
    from parauni.world.config import default_cache_dir, world_config
    from parauni.world.demo import paraunigen
    from parauni.world.pretrain import run_stage0, world_model_config
    from parauni.world.release import world_stage0
    from parauni.world.rl import RECIPES
    from parauni.world.shapeseval import run_shapeseval

    if args.quick:  # the quick world (trained from scratch, cached) with the overrides applied on top of it
        cfg = world_config(overrides, base=dataclasses.asdict(world_config(quick=True)))
        stage0 = run_stage0(cfg, args.cache or default_cache_dir(), progress=False, log=lambda *a: None)
    else:
        cfg, stage0 = world_stage0(
            args.stage0, overrides, cache_dir=args.cache, progress=False, log=lambda *a: None
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage2 is None:
        args.stage2 = "parauni-demo/stage2"
        if args.quick:  # an untrained Stage-II model of the quick world: enough to exercise every path
            args.stage2 = str(out / "quick_stage2")
            ParaUni.from_config(world_model_config(cfg, stage0)).save_pretrained(args.stage2)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); world RL: {' + '.join(str(p.epochs) for p in cfg.rl.phases)} epochs, "
        f"{cfg.rl.prompts_per_epoch} prompts x {cfg.rl.group_size} images"
    )
    results: dict = {"runs": [], "world_rl": dataclasses.asdict(cfg.rl)}
    base = RECIPES[args.recipe](cfg.rl)
    base = with_overrides(base, args.rl)
    if args.mode == "sanity":
        results["sanity"] = sanity(args, base, out)
        (out / "bench_rl.json").write_text(json.dumps(results, indent=2))
        return
    if args.timing_epochs > 0:
        timing = epoch_timing(args, cfg, stage0, out)
        results["epoch_timing"] = timing
        b, a = (timing[k]["seconds"] for k in ("before", "after"))
        print(
            f"RL epoch time, VLM at every call (before item 8): {_pm(b, '.2f')} s; once per prompt and epoch "
            f"(after): {_pm(a, '.2f')} s; {np.mean(b) / np.mean(a):.2f}x faster "
            f"(first epoch's rewards differ by {timing['first_epoch_reward_diff']:.2e})"
        )
    rows_eval = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)

    def shapeseval(model) -> dict:
        e = cfg.eval
        return run_shapeseval(
            paraunigen(model), rows_eval, e.images_per_prompt, e.batch_size, seed=cfg.seed, progress=False
        )

    if args.shapeseval_before is not None:
        results["shapeseval_before"] = args.shapeseval_before
        print(f"ShapesEval before RL: overall {args.shapeseval_before:.3f} (given)")
    elif not args.no_eval:
        t = time.time()
        before = shapeseval(ParaUni.from_pretrained(args.stage2))
        results["shapeseval_before"], results["shapeseval_before_tags"] = before["overall"], before["tags"]
        print(
            f"ShapesEval before RL: overall {before['overall']:.3f} ({time.time() - t:.0f} s); {_tags(before)}"
        )
    variants = MODES[args.mode]
    results["rl"] = dataclasses.asdict(base)
    print(
        f"mode {args.mode}: {args.recipe} recipe, "
        f"{' + '.join(f'{p.epochs} ({p.name})' for p in base.phases)} epochs, {base.prompts_per_epoch} prompts x "
        f"{base.group_size} images, {base.updates_per_epoch} update(s) an epoch; variants {list(variants)}"
    )
    logs: dict[str, list[list[dict]]] = {label: [] for label in variants}
    for seed in args.seeds:
        for label, extra in variants.items():
            w = with_overrides(base, [f"seed={seed}", *extra])
            folder = out / f"seed{seed}_{label.replace(' ', '_')}"
            model, done, seconds = _run(args, cfg, stage0, w, folder)
            rows = done.history
            logs[label].append(rows)
            names = reward_names(rows)
            run = {
                "seed": seed,
                "variant": label,
                "seconds": seconds,
                "seconds_per_epoch": float(np.mean([r["seconds"] for r in rows])),
                "rises": reward_rises(
                    rows, {p.name: [k for k, v in p.rewards.items() if v] for p in w.phases}, evals=done.evals
                ),
                "reward_end": {n: float(np.mean([r[f"reward_{n}"] for r in rows[-2:]])) for n in names},
                "triggers": sum(int(r.get("ldam_triggered", False)) for r in rows),
                "trigger_zones": trigger_summary(rows),
            }
            tags = ""
            if not args.no_eval:
                after = shapeseval(model)
                run["shapeseval_after"], run["shapeseval_after_tags"] = after["overall"], after["tags"]
                tags = f"\n    {_tags(after)}"
            results["runs"].append(run)
            gains = "  ".join(  # each optimised reward over its phase (reward_rises), +-1 SE
                f"{n}: {r['start']:.4f} -> {r['end']:.4f} +- {r['se']:.4f} ({rise_verdict(r)})"
                for rises in run["rises"].values()
                for n, r in rises.items()
            )
            print(
                f"seed {seed} {label:<10} {seconds:6.0f} s  triggers {run['trigger_zones']}  {gains}"
                + (f"  ShapesEval after {run['shapeseval_after']:.3f}" if "shapeseval_after" in run else "")
                + tags,
                flush=True,
            )
    print(f"\nmean +- std over seeds {args.seeds} (rewards: mean of the last 2 epochs):")
    for label in variants:
        runs = [r for r in results["runs"] if r["variant"] == label]
        cells = [
            f"RL {_pm([r['seconds'] for r in runs], '.0f')} s",
            f"triggers {_pm([r['triggers'] for r in runs], '.1f')}",
        ]
        cells += [f"{n} {_pm([r['reward_end'][n] for r in runs], '.4f')}" for n in runs[0]["reward_end"]]
        if not args.no_eval:
            after = [r["shapeseval_after"] for r in runs]
            gain = [a - results["shapeseval_before"] for a in after]
            cells.append(f"ShapesEval {_pm(after)} (gain {_pm(gain)})")
            results.setdefault("summary", {})[label] = {"after": after, "gain": gain}
        print(f"  {label}: " + "; ".join(cells))
    if args.mode == "geneval" and not args.no_eval:
        runs = results["runs"]
        gain = [r["shapeseval_after"] - results["shapeseval_before"] for r in runs]
        slowest = max(r["seconds"] for r in runs)
        met = np.mean(gain) >= 0.05 and np.mean(gain) > 2 * np.std(gain) and slowest <= 600
        print(
            f"target (+0.05 or more over Stage II, beyond 2 std of the seeds, <= 600 s of RL a run): "
            f"gain {_pm(gain)} (2 std {2 * np.std(gain):.3f}), slowest run {slowest:.0f} s: "
            + ("MET" if met else "NOT MET")
        )
    plot_reward_curves({k: mean_rows(v) for k, v in logs.items()}, out / f"{args.mode}.png")
    (out / "bench_rl.json").write_text(json.dumps(results, indent=2))
    print(f"\nplot: {out / f'{args.mode}.png'}; figures: {out / 'bench_rl.json'}")


if __name__ == "__main__":
    main()
