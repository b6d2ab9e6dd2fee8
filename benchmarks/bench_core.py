"""Training-step time of the core model, all layers vs last layer, next to the ratio FLOP counts predict.

    python benchmarks/bench_core.py [--presets tiny medium paper_small] [--batch 2] [--steps 3] [--threads 2]

Per preset: the median time of a Stage-I step (queries + LIM train through the frozen VLM and DiT; AdamW;
cached latents, so no VAE) with all layers and with the last layer only (the OpenUni baseline), and the
FLOPs of one such step counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward matrix
products, convolutions and attention; element-wise work is not counted). The last-layer model still runs
the whole VLM (the queries are read after its last layer) and back-propagates through it; all layers add
the connector's work on L x Q tokens instead of Q. Target: measured ratio <= 1.1 x the FLOP ratio.
``paper_small`` is the paper's model at 1/16 of its widths (28 layers, Q = 256, the 6-layer connector).
The steps of the two models alternate, so a change in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from parauni.config import TrainableConfig, load_model_config
from parauni.diffusion.flow import sample_timesteps
from parauni.models.parauni import ParaUni

CAPTIONS = [
    "a photo of a red circle left of a blue square",
    "three green crosses",
    "a purple triangle above a yellow square, on a grey background",
    None,  # the unconditional template (caption dropout)
]
TARGET = 1.1


class StepBench:
    """One model with a fixed random batch and its optimizer: ``step()`` is one Stage-I training step."""

    def __init__(self, model: ParaUni, batch: int) -> None:
        model.set_trainable(TrainableConfig(queries=True, lim=True, dit=False))
        model.train()
        self.model = model
        self.opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
        self.gen = torch.Generator().manual_seed(0)
        size = model.config.sampling.height
        self.x0 = torch.randn(batch, *model.latent_shape(size, size), generator=self.gen)  # (B, C, h, w)
        self.prompts = model.encode_prompts([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])

    def step(self) -> None:
        t = sample_timesteps(len(self.x0), generator=self.gen)
        loss = self.model(self.prompts, self.x0, t, torch.randn(self.x0.shape, generator=self.gen))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def flops(self) -> int:
        """FLOPs of one step (forward + backward)."""
        with FlopCounterMode(display=False) as counter:
            self.step()
        return counter.get_total_flops()


def build(preset: str, layers: str, batch: int) -> StepBench:
    return StepBench(ParaUni.from_config(load_model_config(preset, [f"lim.layers={layers}"])), batch)


def median_step_times(benches: dict[str, StepBench], steps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per step of each bench, their steps interleaved (the first ``warmup`` not timed)."""
    times: dict[str, list[float]] = {name: [] for name in benches}
    for i in range(warmup + steps):
        for name, bench in benches.items():
            t0 = time.perf_counter()
            bench.step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium", "paper_small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of {args.steps} "
        f"steps; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'preset':<12}{'L':>3}{'Q':>5}{'step all (s)':>14}{'step last (s)':>15}{'ratio':>7}"
        f"{'GFLOP all':>11}{'GFLOP last':>12}{'FLOP ratio':>12}{'ratio / FLOP ratio':>20}"
    )
    for preset in args.presets:
        benches = {mode: build(preset, mode, args.batch) for mode in ("all", "last")}
        flops = {mode: bench.flops() for mode, bench in benches.items()}
        seconds = median_step_times(benches, args.steps)
        measured, predicted = seconds["all"] / seconds["last"], flops["all"] / flops["last"]
        model = benches["all"].model
        verdict = "ok" if measured <= TARGET * predicted else f"above the {TARGET}x target"
        print(
            f"{preset:<12}{model.vlm.num_layers:>3}{model.config.lim.num_queries:>5}{seconds['all']:>14.4f}"
            f"{seconds['last']:>15.4f}{measured:>7.2f}{flops['all'] / 1e9:>11.2f}{flops['last'] / 1e9:>12.2f}"
            f"{predicted:>12.2f}{measured / predicted:>20.2f}  {verdict}"
        )
        del benches


if __name__ == "__main__":
    main()
