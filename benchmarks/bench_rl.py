"""Stage III on the shapes world: do the optimised rewards rise, does ShapesEval hold, and LDAM on vs off.

    python benchmarks/bench_rl.py [--stage2 parauni-demo/stage2] [--seeds 0 1 2] [--out bench-rl]
                                  [--no-eval] [world overrides such as --world.rl.clip_epochs=20]

Needs the world's Stage-0 models (in the cache `parauni demo` fills) and a Stage-II world model (the demo's
`stage2/` folder). For every seed, RL runs twice from the same Stage-II weights, with LDAM on and off; each run
reports per reward its epoch mean at the start and at the end of its phase, and ShapesEval after RL.
Targets (issue 4): the optimised rewards rise over the run; ShapesEval after RL is not below ShapesEval
before it. LDAM on vs off is reported as measured, whichever way it goes. Nothing here fails on a miss.
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

from parauni.models.parauni import ParaUni
from parauni.rl.plots import phase_gains, plot_reward_curves
from parauni.world.captions import make_eval_metadata
from parauni.world.demo import default_cache_dir, paraunigen, world_config
from parauni.world.pretrain import stage0_folder
from parauni.world.rl import run_world_rl
from parauni.world.shapeseval import run_shapeseval


def mean_rows(runs: list[list[dict]]) -> list[dict]:
    """Epoch-wise mean of several runs' logs (same epochs and phases); a trigger in any run is kept."""
    out = []
    for rows in zip(*runs, strict=True):
        keys = [k for k in rows[0] if k.startswith("reward_") and not k.endswith("_std")]
        row = {"epoch": rows[0]["epoch"], "phase": rows[0]["phase"]}
        row.update({k: float(np.mean([r[k] for r in rows])) for k in keys})
        row["ldam_triggered"] = any(r.get("ldam_triggered") for r in rows)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage2", default="parauni-demo/stage2", help="the Stage-II world model folder")
    parser.add_argument("--cache", help="Stage-0 cache (default: as parauni demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="bench-rl")
    parser.add_argument("--no-eval", action="store_true", help="skip ShapesEval (rewards only)")
    args, overrides = parser.parse_known_args()
    cfg = world_config(overrides)
    stage0 = stage0_folder(cfg, args.cache or default_cache_dir())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    rows_eval = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)

    def shapeseval(model) -> dict:
        return run_shapeseval(
            paraunigen(model),
            rows_eval,
            cfg.eval.images_per_prompt,
            cfg.eval.batch_size,
            seed=cfg.seed,
            progress=False,
        )

    results: dict = {"runs": []}
    if not args.no_eval:
        t = time.time()
        before = shapeseval(ParaUni.from_pretrained(args.stage2))
        results["shapeseval_before"] = before["overall"]
        print(f"ShapesEval before RL: overall {before['overall']:.3f} ({time.time() - t:.0f} s)")
    logs: dict[str, list[list[dict]]] = {"LDAM on": [], "LDAM off": []}
    for seed in args.seeds:
        for ldam in (True, False):
            label = "LDAM on" if ldam else "LDAM off"
            w = dataclasses.replace(cfg.rl, seed=seed, ldam=ldam)
            model = ParaUni.from_pretrained(args.stage2)
            t = time.time()
            result = run_world_rl(
                model,
                w,
                cfg.image_size,
                stage0,
                out / f"seed{seed}_{'on' if ldam else 'off'}",
                progress=False,
                log=lambda *a: None,
            )
            seconds = time.time() - t
            rows = result.history
            logs[label].append(rows)
            run = {
                "seed": seed,
                "ldam": ldam,
                "seconds": seconds,
                "phase_gain": phase_gains(rows),
                "final_rewards": {
                    k[len("reward_") :]: float(np.mean([r[k] for r in rows[-3:]]))
                    for k in rows[-1]
                    if k.startswith("reward_") and not k.endswith("_std")
                },
                "mean_rewards": {
                    k[len("reward_") :]: float(np.mean([r[k] for r in rows]))
                    for k in rows[-1]
                    if k.startswith("reward_") and not k.endswith("_std")
                },
                "triggers": sum(bool(r.get("ldam_triggered")) for r in rows),
            }
            if not args.no_eval:
                run["shapeseval_after"] = shapeseval(model)["overall"]
            results["runs"].append(run)
            gains = "  ".join(f"{p}: {a:.4f} -> {b:.4f}" for p, (a, b) in run["phase_gain"].items())
            print(
                f"seed {seed} {label:<8} {seconds:6.0f} s  triggers {run['triggers']}  {gains}"
                + (f"  ShapesEval after {run['shapeseval_after']:.3f}" if "shapeseval_after" in run else "")
            )
    print("\nmean +- std over seeds (reward: mean of the last 3 epochs | mean over the whole run):")
    names = sorted(results["runs"][0]["final_rewards"])
    for ldam in (True, False):
        runs = [r for r in results["runs"] if r["ldam"] == ldam]
        cells = []
        for n in names:
            final = [r["final_rewards"][n] for r in runs]
            whole = [r["mean_rewards"][n] for r in runs]
            cells.append(
                f"{n} {np.mean(final):.4f}+-{np.std(final):.4f} | {np.mean(whole):.4f}+-{np.std(whole):.4f}"
            )
        line = f"  LDAM {'on ' if ldam else 'off'}: " + "; ".join(cells)
        if not args.no_eval:
            se = [r["shapeseval_after"] for r in runs]
            line += f"; ShapesEval after {np.mean(se):.3f}+-{np.std(se):.3f}"
        print(line)
    rising = all(b > a for r in results["runs"] for a, b in r["phase_gain"].values())
    print(
        f"\ntarget: every phase's optimised reward higher at its end than at its start, every run: "
        f"{'met' if rising else 'MISSED'}"
    )
    if not args.no_eval:
        after = [r["shapeseval_after"] for r in results["runs"]]
        ok = min(after) >= results["shapeseval_before"]
        print(
            f"target: ShapesEval after RL ({min(after):.3f} worst run) >= before ({results['shapeseval_before']:.3f}): "
            f"{'met' if ok else 'MISSED'}"
        )
    plot_reward_curves({k: mean_rows(v) for k, v in logs.items()}, out / "ldam_on_off.png")
    (out / "bench_rl.json").write_text(json.dumps(results, indent=2))
    print(f"\nplot: {out / 'ldam_on_off.png'}; figures: {out / 'bench_rl.json'}")


if __name__ == "__main__":
    main()
