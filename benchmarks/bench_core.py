"""Training-step and generation time of the core model, all layers vs last layer.

    python benchmarks/bench_core.py [--presets tiny medium] [--batch 8] [--steps 6] [--threads 2]

Prints, per preset: the Stage-I training step time (queries + LIM train through the frozen VLM and DiT)
with all layers and with the last layer only, their ratio, and the time to generate a batch of images.
Figures depend on the machine and on what else runs on it; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from parauni.config import TrainableConfig, load_model_config
from parauni.diffusion.flow import sample_timesteps
from parauni.models.parauni import ParaUni
from parauni.pipeline import generate

CAPTIONS = ["a photo of a red circle left of a blue square", "three green crosses", "a purple triangle", None]


def step_time(model: ParaUni, batch: int, steps: int, size: int) -> float:
    """Median seconds of one AdamW step on a fixed random batch."""
    model.set_trainable(TrainableConfig(queries=True, lim=True, dit=False))
    model.train()
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
    x0 = model.encode_images(pixels).detach()
    prompts = model.encode_prompts([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        t = sample_timesteps(batch, generator=gen)
        loss = model(prompts, x0, t, torch.randn(x0.shape, generator=gen))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:  # the first steps allocate and warm caches
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_time(model: ParaUni, n: int, size: int) -> float:
    prompts = [c or "a photo of a cat" for c in CAPTIONS][:n]
    t0 = time.perf_counter()
    generate(model, prompts, height=size, width=size, batch_size=n, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    print(
        f"{'preset':<8} {'layers':>7} {'step all (s)':>13} {'step last (s)':>14} {'ratio':>6} {'generate (s)':>13}"
    )
    for preset in args.presets:
        config = load_model_config(preset)
        size = config.sampling.height
        timings, models = {}, {}
        for mode in ("all", "last"):
            models[mode] = ParaUni.from_config(load_model_config(preset, [f"lim.layers={mode}"]))
            timings[mode] = step_time(models[mode], args.batch, args.steps, size)
        model = models["all"]
        gen_s = generation_time(model, 4, size)
        print(
            f"{preset:<8} {model.vlm.num_layers:>7} {timings['all']:>13.4f} {timings['last']:>14.4f} "
            f"{timings['all'] / timings['last']:>6.2f} {gen_s:>13.2f}"
            f"   (4 images {size}px, {config.sampling.sampler} {config.sampling.steps} steps, CFG {config.sampling.cfg})"
        )


if __name__ == "__main__":
    main()
