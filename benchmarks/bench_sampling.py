"""Generation latency: our sampling loop against ``diffusers.SanaPipeline`` driving the same DiT.

    python benchmarks/bench_sampling.py [--presets tiny medium paper_small] [--batch 2] [--repeats 3]
                                        [--threads 2]

Per preset, from the same precomputed conditions (the LIM's output for the prompts and for the
unconditional template) and the same initial noise: the median time of our loop
(:func:`parauni.diffusion.sampling.sample`: DPM-Solver++ with flow sigmas, shift 3, CFG in one batched DiT
call) and of ``SanaPipeline(prompt_embeds=..., negative_prompt_embeds=..., output_type="latent")`` with the
same scheduler, steps and guidance; their ratio (target: ours within 5%), and the largest difference of
the two results (the same solver, so close to float round-off). Reported apart: the condition (VLM + LIM,
for the prompts and the unconditional template) and the VAE decode. Runs alternate between the two loops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers import SanaPipeline

from parauni.config import load_model_config
from parauni.diffusion.sampling import dpm_solver_scheduler, sample
from parauni.models.parauni import ParaUni
from parauni.pipeline import initial_noise

PROMPTS = ["a photo of a red circle left of a blue square", "three green crosses", "a purple triangle"]
TARGET = 1.05


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def bench(preset: str, batch: int, repeats: int) -> dict[str, float]:
    model = ParaUni.from_config(load_model_config(preset)).eval()
    s = model.config.sampling
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def conditions() -> tuple[torch.Tensor, torch.Tensor]:
        cond = model.condition(model.encode_prompts(prompts))  # (B, Q, C)
        return cond, model.condition(model.encode_prompts([None])).expand_as(cond)

    cond_s, (cond, uncond) = timed(conditions)
    noise = initial_noise(model.latent_shape(s.height, s.width), list(range(batch)))  # (B, C, h, w)
    mask = torch.ones(cond.shape[:2], dtype=torch.long)
    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=model.vae,
        transformer=model.dit,
        scheduler=dpm_solver_scheduler(s.shift),
    )
    pipe.set_progress_bar_config(disable=True)

    def ours() -> torch.Tensor:
        return sample(
            model.velocity, cond, uncond, noise, sampler="dpm", steps=s.steps, shift=s.shift, cfg=s.cfg
        )

    def theirs() -> torch.Tensor:
        return pipe(
            prompt_embeds=cond,
            prompt_attention_mask=mask,
            negative_prompt_embeds=uncond,
            negative_prompt_attention_mask=mask,
            negative_prompt=None,
            latents=noise.clone(),
            num_inference_steps=s.steps,
            guidance_scale=s.cfg,
            height=s.height,
            width=s.width,
            use_resolution_binning=False,
            complex_human_instruction=None,
            output_type="latent",
            return_dict=False,
        )[0]

    ours(), theirs()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "sana": []}
    latents: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("sana", theirs)):
            seconds, latents[name] = timed(fn)
            times[name].append(seconds)
    decode_s, _ = timed(lambda: model.decode_latents(latents["ours"]))
    return {
        "steps": s.steps,
        "size": s.height,
        "cond": cond_s,
        "ours": statistics.median(times["ours"]),
        "sana": statistics.median(times["sana"]),
        "diff": float((latents["ours"] - latents["sana"]).abs().max()),
        "decode": decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium", "paper_small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'preset':<12}{'px':>5}{'steps':>6}{'ours (s)':>10}{'SanaPipeline (s)':>18}{'ours/Sana':>11}"
        f"{'max |diff|':>12}{'VLM+LIM (s)':>13}{'VAE decode (s)':>16}"
    )
    for preset in args.presets:
        r = bench(preset, args.batch, args.repeats)
        ratio = r["ours"] / r["sana"]
        verdict = "ok" if ratio <= TARGET else f"slower than the {TARGET:.2f}x target"
        print(
            f"{preset:<12}{r['size']:>5}{r['steps']:>6}{r['ours']:>10.3f}{r['sana']:>18.3f}{ratio:>11.3f}"
            f"{r['diff']:>12.2e}{r['cond']:>13.3f}{r['decode']:>16.3f}  {verdict}"
        )


if __name__ == "__main__":
    main()
