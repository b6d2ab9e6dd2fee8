"""The paper-scale check on a GPU: the real classes at the real sizes run every path of the library (issue 20).

    python benchmarks/gpu_check.py --device cuda --preset paper [--json gpu_check.json]
    python benchmarks/gpu_check.py --device cpu --preset tiny          # the quick form the test suite runs
    python benchmarks/gpu_check.py --demo [--demo-quick]               # the world demo, timed

With random weights of the preset's classes and sizes (InternVL3-2B + SANA-1.5 1.6B + DC-AE f32c32 for
``paper``; every ``path`` is set to null so each component is built from its ``arch`` dict: nothing is
downloaded), it runs, one check after another:

* ``stage1`` / ``stage2``: training steps of Stage I (queries + LIM) and Stage II (+ the DiT) with the
  library's loop (``parauni.training.trainer.train``) on random latents with distinct captions. On CUDA the
  micro-batch is the largest power of two that fits: a probe step (the loop's forward, backward and AdamW
  step) is run at 1, 2, 4, ... until ``torch.cuda.OutOfMemoryError`` (or ``--max-batch``, or a probe step
  slower than ``--max-probe-seconds``); on the CPU the batch is fixed (``--batch``).
* ``all_vs_last``: the Stage-I step of the all-layer model against the last-layer-only model (the OpenUni
  baseline), interleaved probe steps at the same batch: the time ratio beside the FLOP ratio (the paper's P2
  claim: the all-layer readout costs little more than its FLOPs say; bench_core.py's target ratio <= 1.1 x
  the FLOP ratio is printed, not enforced).
* ``sampling``: ``parauni.pipeline.generate``, 20 DPM-Solver++ steps with CFG 4.5 at the preset's resolution
  (1024 x 1024 for ``paper`` and ``paper_small``).
* ``reconstruction``: the image-to-image path (``generate(images=...)``: the input image through the VLM's
  vision encoder, "Keep the image as it is.", 20 steps with CFG), and the DC-AE encoder on the same image.
* ``rl``: one Stage-III epoch (``parauni.rl.grpo.train_rl``: SDE rollouts with CFG, a stand-in reward, the
  advantages and the policy update of the rank-32 LoRA, LDAM on) at the preset's resolution.
* ``fsdp2``: 2-step runs of Stage I, then Stage II (fresh models) under ``accelerate launch --config_file
  configs/accelerate/fsdp.yaml --num_processes 1`` (a subprocess); it checks that the parameters were sharded
  (DTensors) and the loss finite.

For each it prints the time per step, the peak memory (CUDA: ``torch.cuda.max_memory_allocated`` since the
check began; CPU: the process's peak resident set, reset per check on Linux), and the achieved TFLOP/s against
the FLOPs of the same work counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products,
convolutions and attention, forward and backward; element-wise work is not counted). It ends with one line
per check, ``ok`` or ``failed: <why>``, and exits 1 if any failed.

Every measured run follows a run that is not timed (the warm-up; for sampling, reconstruction and Stage III
it is the FLOP-counted run). ``--checks stage2 rl`` reruns a subset; ``--json OUT`` saves every figure.

Why one file of about 900 lines: it is a script a GPU user copies onto a lent machine and runs once, so
every check, its timing and its FLOP count stand together; each check is its own function of about 50 lines
calling the library, and the CPU form of the same file is what ``tests/test_gpu_check.py`` runs.

Precision (``--dtype auto``): on CUDA, bf16 as the paper preset runs (VLM, DiT and VAE weights in bf16, the
queries and LIM in fp32, training and RL under accelerate's bf16 autocast); on the CPU, fp32 throughout.

``--demo`` instead runs ``parauni demo`` (the shapes world, ``--demo-quick`` for its smoke run) in a
subprocess and prints its wall time and, on CUDA, how much GPU memory the demo process took (0 means it ran
on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: every component is built from its arch

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from bench_demo import cpu_name  # noqa: E402
from bench_throughput import peak_mib, reset_peak  # noqa: E402

from parauni.config import ModelConfig, load_model_config  # noqa: E402
from parauni.eval.reconstruct import psnr  # noqa: E402
from parauni.models.parauni import ParaUni  # noqa: E402
from parauni.pipeline import GenerationOptions, generate  # noqa: E402
from parauni.rl.config import PhaseConfig, RLConfig  # noqa: E402
from parauni.rl.grpo import train_rl  # noqa: E402
from parauni.rl.prompts import PromptSource  # noqa: E402
from parauni.training.config import stage_config  # noqa: E402
from parauni.training.trainer import stage_trainable, train  # noqa: E402
from parauni.utils.run_files import TRAIN_LOG  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
CHECKS = ("stage1", "all_vs_last", "stage2", "sampling", "reconstruction", "rl", "fsdp2")
P2_TARGET = 1.1  # bench_core.py: measured all/last time ratio <= 1.1 x the FLOP ratio
SAMPLE_STEPS, SAMPLE_CFG = 20, 4.5
# what replaces each component's weights: a name, so that a saved model folder refers to it instead of
# copying gigabytes of random weights (the check's folders are thrown away)
RANDOM_WEIGHTS = "random-weights-of-gpu-check"


# ------------------------------------------------------------------------------------------- the setting
@dataclass
class Setting:
    """Where and how the checks run."""

    device: torch.device
    preset: str
    bf16: bool
    batch: int  # CPU: the fixed training batch
    max_batch: int
    max_probe_seconds: float
    steps: int  # trainer steps per timed run (the first is not timed)
    sample_batch: int
    rl_prompts: int
    rl_group: int
    rl_steps: int
    workdir: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "no"


def model_config(s: Setting, layers: str = "all") -> ModelConfig:
    """The preset with every component built from its arch dict (random weights) and ``lim.layers``."""
    overrides = [f"{part}.path=null" for part in ("vlm", "dit", "vae")] + [f"lim.layers={layers}"]
    dtype = "bfloat16" if s.bf16 else "float32"
    overrides += [f"{part}.dtype={dtype}" for part in ("vlm", "dit", "vae")]
    return load_model_config(s.preset, overrides)


def build_model(s: Setting, layers: str = "all", placeholder: bool = True) -> ParaUni:
    """A ParaUni model of random weights on the device (built there directly on CUDA: no CPU initialisation).

    ``placeholder``: the config names the components ``RANDOM_WEIGHTS`` afterwards, so that the loops' final
    model folders refer to them instead of copying them. Not under FSDP: its final save rebuilds the model
    from the config (``distributed.save_model``), which must then build the random components again.
    """
    config = model_config(s, layers)
    if s.cuda:
        try:
            with torch.device(s.device):
                model = ParaUni.from_config(config)
        except Exception as err:  # noqa: BLE001 - reported, then the slower path is tried
            print(
                f"  building on {s.device} directly failed ({type(err).__name__}: {err}); building on the CPU"
            )
            model = ParaUni.from_config(config).to(s.device)
    else:
        model = ParaUni.from_config(config)
    if placeholder:
        for part in (model.config.vlm, model.config.dit, model.config.vae):
            part.path = RANDOM_WEIGHTS
    return model


def captions(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct captions (the VLM runs once per distinct prompt, so repeats would flatter it)."""
    colours = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes = ("circle", "square", "triangle", "cross")
    return [
        f"a photo of {i + offset + 1} {colours[i % 6]} {shapes[(i // 6) % 4]}s left of a {colours[(i + 3) % 6]} "
        f"{shapes[(i + 1) % 4]}, on a grey background"
        for i in range(n)
    ]


class RandomLatents:
    """Training data for the loop: seeded random latents (DiT input space) with distinct captions."""

    encoded = True

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __len__(self) -> int:
        return 1_000_000

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        """(len(indices), C, h, w) latents and their captions."""
        x = torch.stack(
            [torch.randn(self.shape, generator=torch.Generator().manual_seed(i)) for i in indices]
        )
        return x, [captions(1, i)[0] for i in indices]


# ------------------------------------------------------------------------------------------- measuring
def free_memory(s: Setting) -> None:
    gc.collect()
    if s.cuda:
        torch.cuda.synchronize(s.device)
        torch.cuda.empty_cache()


class Memory:
    """The peak memory of one check: CUDA's allocator peak, or the process's peak resident set on the CPU."""

    def __init__(self, s: Setting) -> None:
        self.s = s
        free_memory(s)
        if s.cuda:
            torch.cuda.reset_peak_memory_stats(s.device)
            self.reset = True
        else:
            self.reset = reset_peak()

    def peak(self) -> dict:
        if self.s.cuda:
            gib = torch.cuda.max_memory_allocated(self.s.device) / 2**30
            return {"peak_gib": gib, "peak_text": f"peak {gib:.2f} GiB allocated"}
        mib, scope = peak_mib(self.reset)
        return {"peak_rss_mib": mib, "peak_text": f"peak RSS {mib:.0f} MiB ({scope}; CUDA memory n/a)"}


def sync(s: Setting) -> None:
    if s.cuda:
        torch.cuda.synchronize(s.device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` counted by FlopCounterMode (matrix products, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def tflops_text(flops: float, seconds: float) -> str:
    return f"{flops / 1e12:.4g} TFLOP -> {flops / seconds / 1e12:.4g} TFLOP/s"


def autocast(s: Setting):
    return torch.autocast(s.device.type, dtype=torch.bfloat16) if s.bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------- training
class Probe:
    """One training micro-step of a stage as the loop takes it (its forward, backward and AdamW step) on
    fresh random inputs of a given batch size: to search the batch that fits, count FLOPs and time."""

    def __init__(self, s: Setting, model: ParaUni, stage: int) -> None:
        model.set_trainable(stage_trainable(stage, model.config.trainable))
        model.train()
        self.s, self.model = s, model
        cfg = stage_config(stage)
        self.opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas))
        size = model.config.sampling.height
        self.shape = model.latent_shape(size, size)

    def step(self, batch: int) -> float:
        """One step at ``batch``; returns its seconds."""
        s, model = self.s, self.model
        sync(s)
        start = time.perf_counter()
        prompts = model.encode_prompts(captions(batch))
        x0 = torch.randn(batch, *self.shape, device=s.device)
        noise = torch.randn_like(x0)
        t = torch.rand(batch, device=s.device)
        with autocast(s):
            loss = model(prompts, x0, t, noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(s)
        return time.perf_counter() - start

    def close(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        del self.opt


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the GPU ran out of memory (cuBLAS / cuDNN report it as a plain RuntimeError)."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)
    )


def largest_batch(s: Setting, probe: Probe) -> tuple[int, str]:
    """The largest power-of-two batch a probe step fits at (CUDA), or the fixed batch (CPU)."""
    if not s.cuda:
        probe.step(s.batch)
        return s.batch, "fixed on the CPU"
    batch, best, why = 1, 0, f"--max-batch {s.max_batch}"
    while batch <= s.max_batch:
        oom = False
        try:
            seconds = probe.step(batch)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if not is_oom(err):
                raise
            oom = True
        probe.opt.zero_grad(set_to_none=True)
        free_memory(s)
        if oom:
            why = f"out of memory at {batch}"
            break
        best = batch
        print(f"    batch {batch:>4} fits ({seconds:.2f} s)", flush=True)
        if seconds > s.max_probe_seconds:
            why = f"a step took {seconds:.1f} s > --max-probe-seconds {s.max_probe_seconds:g}"
            break
        batch *= 2
    if best == 0:
        raise RuntimeError("not even a batch of 1 fits in GPU memory")
    return best, f"largest power of two that fits; stopped: {why}"


def check_train_config(s: Setting, stage: int, steps: int, batch: int, size: int):
    """The loop's config of a timed check: ``steps`` steps of ``batch`` images of side ``size``, no saves."""
    return stage_config(
        stage,
        {
            "steps": steps,
            "batch_size": batch,
            "warmup": 1,
            "save_every": 0,
            "log_every": 1,
            "mixed_precision": s.mixed_precision,
            "image_size": size,
        },
    )


def trainer_seconds(s: Setting, model: ParaUni, stage: int, batch: int, out: Path) -> list[float]:
    """Seconds of each step after the first of a ``train()`` run of ``s.steps`` steps (from its log); a
    RuntimeError if a step's loss was not finite."""
    size = model.config.sampling.height
    cfg = check_train_config(s, stage, s.steps, batch, size)
    train(model, RandomLatents(model.latent_shape(size, size)), cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]
    if not all(math.isfinite(r["loss"]) for r in rows):
        raise RuntimeError(f"a training step's loss was not finite: {[r['loss'] for r in rows]}")
    ends = [r["seconds"] for r in rows]
    return [b - a for a, b in zip(ends, ends[1:], strict=False)] or ends


def check_stage(s: Setting, model: ParaUni, stage: int, state: dict) -> dict:
    """A Stage I or II step with the library's loop at the largest batch that fits."""
    probe = Probe(s, model, stage)
    batch, how = largest_batch(s, probe)
    flops = count_flops(functools.partial(probe.step, batch))
    probe.close()
    del probe
    while True:
        memory = Memory(s)
        oom = False
        try:
            seconds = trainer_seconds(s, model, stage, batch, s.workdir / f"stage{stage}_b{batch}")
        except RuntimeError as err:
            if not (s.cuda and is_oom(err)) or batch == 1:
                raise
            oom = True
        if not oom:
            break
        model.zero_grad(set_to_none=True)
        free_memory(s)
        print(f"    the loop ran out of memory at batch {batch}; trying {batch // 2}", flush=True)
        batch //= 2
        how += f"; the loop itself fits {batch}"
        flops = flops // 2  # FLOPs scale with the batch (the counted step was at twice this batch)
    step = statistics.median(seconds)
    state[f"stage{stage}_batch"] = batch
    state[f"stage{stage}_seconds"] = step
    return {
        "batch": batch,
        "batch_how": how,
        "step_seconds": step,
        "images_per_second": batch / step,
        "flops_per_step": flops,
        "tflop_per_s": flops / step / 1e12,
        **memory.peak(),
        "text": f"batch {batch} ({how}); {step:.4g} s/step ({batch / step:.3g} images/s); "
        f"{tflops_text(flops, step)}",
    }


def check_all_vs_last(s: Setting, model: ParaUni, state: dict) -> dict:
    """Stage-I step time of the all-layer model over the last-layer-only model, interleaved probe steps."""
    batch = min(state.get("stage1_batch", s.batch), 32 if s.cuda else s.batch)
    last = build_model(s, "last")
    memory = Memory(s)
    probes = {"all": Probe(s, model, 1), "last": Probe(s, last, 1)}
    flops = {name: count_flops(lambda p=p: p.step(batch)) for name, p in probes.items()}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in probes}
    for _ in range(max(2, s.steps)):
        for name, p in probes.items():
            times[name].append(p.step(batch))
    for p in probes.values():
        p.close()
    del probes, last
    t = {name: statistics.median(ts) for name, ts in times.items()}
    ratio, flop_ratio = t["all"] / t["last"], flops["all"] / flops["last"]
    verdict = "met" if ratio <= P2_TARGET * flop_ratio else "missed"
    return {
        "batch": batch,
        "all_seconds": t["all"],
        "last_seconds": t["last"],
        "time_ratio": ratio,
        "flop_ratio": flop_ratio,
        "tflop_per_s": flops["all"] / t["all"] / 1e12,
        **memory.peak(),
        "text": f"batch {batch}; all layers {t['all']:.4g} s/step, last layer {t['last']:.4g} s/step: time ratio "
        f"{ratio:.3f}, FLOP ratio {flop_ratio:.3f} (ratio / FLOP ratio {ratio / flop_ratio:.3f}; P2 target "
        f"<= {P2_TARGET}: {verdict}); all layers {tflops_text(flops['all'], t['all'])}",
    }


# ------------------------------------------------------------------------------------------- generation
def input_image(n: int, size: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: smooth colour gradients with a bright disc, a stand-in photo."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.2).float()
    image = torch.stack([x, y, 0.8 * disc - 0.4])
    return torch.stack([(image * (0.5 + 0.5 * i / max(1, n))).clamp(-1, 1) for i in range(n)])


def timed_generation(s: Setting, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, int, dict]:
    """Run ``fn`` twice: counted (FLOPs, and the warm-up), then timed. Returns (output, seconds, FLOPs, peak)."""
    memory = Memory(s)
    flops = count_flops(fn)
    sync(s)
    start = time.perf_counter()
    out = fn()
    sync(s)
    return out, time.perf_counter() - start, flops, memory.peak()


def check_sampling(s: Setting, model: ParaUni) -> dict:
    """20-step DPM-Solver++ sampling with CFG at the preset's resolution (``parauni.pipeline.generate``)."""
    sm = model.config.sampling
    n = s.sample_batch
    options = sample_options(model, n)
    images, seconds, flops, peak = timed_generation(
        s, lambda: generate(model, captions(n), **options.kwargs(), progress=False)
    )
    if not torch.isfinite(images).all():
        raise RuntimeError("the generated images hold NaN or inf")
    per_step = seconds / SAMPLE_STEPS
    return {
        "batch": n,
        "height": sm.height,
        "width": sm.width,
        "seconds": seconds,
        "step_seconds": per_step,
        "seconds_per_image": seconds / n,
        "tflop_per_s": flops / seconds / 1e12,
        **peak,
        "text": f"{n} images {sm.height}x{sm.width}, {SAMPLE_STEPS} {sm.sampler} steps, CFG {SAMPLE_CFG}: "
        f"{seconds:.4g} s ({per_step:.4g} s/step for the batch, condition and decode included; "
        f"{seconds / n:.4g} s/image); {tflops_text(flops, seconds)}",
    }


def sample_options(model: ParaUni, n: int) -> GenerationOptions:
    """The sampling and reconstruction checks' settings: 20 steps, CFG 4.5, the model's size, batches of ``n``."""
    sm = model.config.sampling
    return GenerationOptions(
        batch_size=n, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, height=sm.height, width=sm.width
    )


def check_reconstruction(s: Setting, model: ParaUni) -> dict:
    """Image-to-image (the input through the VLM's vision encoder, 20 steps with CFG) and the DC-AE encoder."""
    sm = model.config.sampling
    n = s.sample_batch
    pixels = input_image(n, sm.height)
    options = sample_options(model, n)
    recon, seconds, flops, peak = timed_generation(
        s, lambda: generate(model, images=pixels, **options.kwargs(), progress=False)
    )
    with torch.no_grad():
        encode = lambda: model.encode_images(pixels.to(s.device))  # noqa: E731
        latents, enc_seconds, enc_flops, _ = timed_generation(s, encode)
    if not (torch.isfinite(recon).all() and torch.isfinite(latents).all()):
        raise RuntimeError("the reconstruction or the latents hold NaN or inf")
    db = psnr(recon, pixels).mean().item()
    return {
        "batch": n,
        "seconds": seconds,
        "step_seconds": seconds / SAMPLE_STEPS,
        "encode_seconds": enc_seconds,
        "tflop_per_s": flops / seconds / 1e12,
        "psnr_db_random_weights": db,
        **peak,
        "text": f"{n} input images {sm.height}x{sm.width} -> {SAMPLE_STEPS} steps, CFG {SAMPLE_CFG}: {seconds:.4g} s "
        f"({seconds / SAMPLE_STEPS:.4g} s/step for the batch); {tflops_text(flops, seconds)}; DC-AE encode "
        f"{enc_seconds:.4g} s ({tflops_text(enc_flops, enc_seconds)}); PSNR {db:.1f} dB (random weights: "
        "a number, not a quality)",
    }


# ------------------------------------------------------------------------------------------- Stage III
def brightness(images: torch.Tensor, prompts: list[str], metadata: list) -> dict[str, list[float]]:
    """A stand-in reward (the reward models need weights): mean brightness of each (3, H, W) image."""
    return {"brightness": images.mean(dim=(1, 2, 3)).tolist()}


def check_rl(s: Setting, model: ParaUni) -> dict:
    """One Flow-GRPO epoch (rollout + LoRA update, LDAM on) with the library's loop, counted then timed."""
    sm = model.config.sampling
    cfg = RLConfig(
        phases=[PhaseConfig("check", {"brightness": 1.0}, 1, "deep", 0.01)],
        prompts_per_epoch=s.rl_prompts,
        group_size=s.rl_group,
        steps=s.rl_steps,
        height=sm.height,
        width=sm.width,
        micro_batch=s.rl_prompts * s.rl_group,
        rollout_batch=s.rl_prompts * s.rl_group,
        mixed_precision=s.mixed_precision,
        save_every=0,
    )
    prompts = PromptSource([(c, None) for c in captions(s.rl_prompts)])
    quiet = lambda *a, **k: None  # noqa: E731

    def epoch(out: str):
        return train_rl(
            model, brightness, ["brightness"], prompts, cfg, s.workdir / out, progress=False, log=quiet
        )

    memory = Memory(s)
    flops = count_flops(lambda: epoch("rl_counted"))  # also the warm-up (and the LoRA is attached here)
    result = epoch("rl_timed")
    row = result.history[0]
    seconds = row["seconds"]
    if not all(isinstance(v, float) and v == v for k, v in row.items() if k.startswith("reward_")):
        raise RuntimeError(f"the epoch's rewards are not finite: {row}")
    lora = sum(p.numel() for n, p in model.dit.named_parameters() if "lora_" in n)
    n = cfg.samples_per_epoch
    return {
        "samples": n,
        "steps": cfg.steps,
        "epoch_seconds": seconds,
        "lora_parameters": lora,
        "tflop_per_s": flops / seconds / 1e12,
        **memory.peak(),
        "text": f"{cfg.prompts_per_epoch} prompts x {cfg.group_size} = {n} samples {sm.height}x{sm.width}, "
        f"{cfg.steps} SDE steps with CFG {cfg.cfg}, update on {cfg.train_steps} steps of a rank-"
        f"{cfg.trainable.dit_lora_rank} LoRA ({lora / 1e6:.3g}M parameters): {seconds:.4g} s/epoch "
        f"(rollout + rewards + update; grad norm {row['grad_norm']:.3g}); {tflops_text(flops, seconds)}",
    }


# ------------------------------------------------------------------------------------------- FSDP2
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_fsdp_accelerator():
    """On a CPU, accelerate ignores an FSDP config (it picks FSDP only with an accelerator): switch its
    multi-CPU (gloo) state to FSDP with the launcher's plugin, as tests/distributed_run.py does. On CUDA the
    loop builds its own Accelerator from the launcher's environment."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def fsdp_worker(s: Setting, batch: int, out: Path) -> None:
    """Inside ``accelerate launch``: 2-step runs of Stage I, then Stage II (each on a fresh model), with the
    loop; each stage's figures, or its error, go to ``out/fsdp_result.json`` as soon as it ends."""
    from accelerate.state import AcceleratorState
    from torch.distributed.tensor import DTensor

    results: dict = {}
    for stage in (1, 2):
        try:
            model = build_model(s, placeholder=False)
            size = model.config.sampling.height
            cfg = check_train_config(s, stage, 2, batch, size)
            acc = None if s.cuda else cpu_fsdp_accelerator()
            memory = Memory(s)
            source = RandomLatents(model.latent_shape(size, size))
            train(model, source, cfg, out / f"stage{stage}", progress=False, accelerator=acc)
            rows = [json.loads(line) for line in (out / f"stage{stage}" / TRAIN_LOG).read_text().splitlines()]
            results[f"stage{stage}"] = {
                "distributed_type": str(AcceleratorState().distributed_type),
                "fsdp_version": getattr(AcceleratorState().fsdp_plugin, "fsdp_version", None),
                "sharded": isinstance(model.queries, DTensor),
                "step_seconds": rows[-1]["seconds"] - rows[0]["seconds"],
                "loss": rows[-1]["loss"],
                **memory.peak(),
            }
        except Exception as err:
            results[f"stage{stage}"] = {"error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
            traceback.print_exc(limit=8)
        finally:
            (out / "fsdp_result.json").write_text(json.dumps(results))
            model = None
            free_memory(s)


def check_fsdp(s: Setting, state: dict, args: argparse.Namespace) -> dict:
    """Stage I and Stage II runs under ``accelerate launch`` with the shipped FSDP2 config on one process."""
    batch = min(state.get("stage1_batch", s.batch), 8 if s.cuda else s.batch)
    out = s.workdir / "fsdp2"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP_CONFIG),
        "--num_processes=1",
        f"--main_process_port={_free_port()}",
        str(Path(__file__).resolve()),
        "--fsdp-worker",
        str(out),
        "--fsdp-batch",
        str(batch),
        "--device",
        str(s.device),
        "--preset",
        s.preset,
        "--dtype",
        args.dtype,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    start = time.perf_counter()
    done = subprocess.run(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=args.fsdp_timeout,
    )
    wall = time.perf_counter() - start
    result = out / "fsdp_result.json"
    r = json.loads(result.read_text()) if result.is_file() else {}
    problems = []
    for stage in ("stage1", "stage2"):
        row = r.get(stage)
        if row is None:
            problems.append(f"{stage} did not run")
        elif "error" in row:
            problems.append(f"{stage}: {row['error']}")
        elif "FSDP" not in row["distributed_type"] or not row["sharded"] or row["fsdp_version"] != 2:
            problems.append(f"{stage} was not sharded by FSDP2: {row}")
        elif not math.isfinite(row["loss"]):
            problems.append(f"{stage}: the loss was not finite ({row['loss']})")
    if done.returncode != 0 or problems:
        tail = done.stdout.strip().splitlines()[-30:]
        print("    " + "\n    ".join(tail), flush=True)
        why = "; ".join(problems) or (tail[-1] if tail else "")
        raise RuntimeError(f"accelerate launch exited with {done.returncode}: {why}")
    parts = [
        f"Stage {'I' * int(k[-1])} second step {v['step_seconds']:.4g} s, loss {v['loss']:.4f}, {v['peak_text']}"
        for k, v in r.items()
    ]
    return {
        **r,
        "batch": batch,
        "wall_seconds": wall,
        "text": f"{FSDP_CONFIG.relative_to(ROOT)}, 1 process, batch {batch}, 2 steps per stage: "
        f"{r['stage1']['distributed_type']}, fsdp_version 2, parameters sharded as DTensors; "
        + "; ".join(parts),
        "peak_text": f"peaks in the launched process (above); subprocess {wall:.1f} s in all (start-up, model "
        "builds and the final saves, which rebuild the model on the CPU, included)",
    }


# ------------------------------------------------------------------------------------------- the demo
def run_demo_mode(args: argparse.Namespace) -> int:
    """``parauni demo`` in a subprocess, timed; on CUDA also the GPU memory it took (polled)."""
    out = Path(args.demo_out or tempfile.mkdtemp(prefix="parauni-demo-"))
    command = [sys.executable, "-m", "parauni.cli", "demo", "--out", str(out), "--overwrite"]
    if args.demo_quick:
        command.append("--quick")
    cuda = torch.cuda.is_available()
    print(f"running: {' '.join(command)}", flush=True)
    print(f"  GPU visible: {torch.cuda.get_device_name(0) if cuda else 'none'}", flush=True)
    used = {"peak": 0}
    stop = threading.Event()
    if cuda:
        free0, total = torch.cuda.mem_get_info()

        def poll() -> None:
            while not stop.wait(0.5):
                free, _ = torch.cuda.mem_get_info()
                used["peak"] = max(used["peak"], free0 - free)

        threading.Thread(target=poll, daemon=True).start()
    start = time.perf_counter()
    code = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    stop.set()
    print(
        f"\nparauni demo{' --quick' if args.demo_quick else ''}: exit code {code}, wall time {wall:.1f} s "
        f"({wall / 60:.1f} min)"
    )
    if cuda:
        gib = used["peak"] / 2**30
        where = "it used the GPU" if gib > 0.05 else "it did not use the GPU: the demo ran on the CPU"
        print(f"  GPU memory taken by the demo process (polled every 0.5 s): {gib:.2f} GiB; {where}")
    metrics = out / "metrics.json"
    if metrics.is_file():
        timings = json.loads(metrics.read_text()).get("timings", {})
        here = {k: v for k, v in timings.items() if "when trained" not in k}  # not the release's Stage 0
        print("  the demo's own timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in here.items()))
    print(f"demo {'ok' if code == 0 else f'failed: exit code {code}'}")
    return 0 if code == 0 else 1


# ------------------------------------------------------------------------------------------- main
@dataclass
class Outcome:
    name: str
    ok: bool
    why: str = ""
    figures: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu"
    )
    p.add_argument("--preset", default="paper", choices=["paper", "paper_small", "tiny"])
    p.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="which checks (default: all)"
    )
    p.add_argument("--batch", type=int, default=2, help="CPU: the training batch (CUDA searches the largest)")
    p.add_argument("--max-batch", type=int, default=256, help="CUDA: the batch search stops here")
    p.add_argument(
        "--max-probe-seconds",
        type=float,
        default=8.0,
        help="CUDA: the search stops after a probe step this slow",
    )
    p.add_argument("--steps", type=int, default=3, help="training steps per timed run (the first not timed)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (CUDA 4, CPU 2)")
    p.add_argument("--rl-prompts", type=int, default=2, help="Stage III: prompts per epoch")
    p.add_argument("--rl-group", type=int, default=None, help="Stage III: images per prompt (CUDA 4, CPU 2)")
    p.add_argument(
        "--rl-steps", type=int, default=None, help="Stage III: SDE steps per rollout (CUDA 10, CPU 4)"
    )
    p.add_argument(
        "--fsdp-timeout", type=float, default=900.0, help="seconds before the FSDP2 run is stopped"
    )
    p.add_argument("--workdir", help="folder for the runs' outputs (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--demo", action="store_true", help="run `parauni demo` instead, timed")
    p.add_argument("--demo-quick", action="store_true", help="with --demo: the demo's --quick smoke run")
    p.add_argument("--demo-out", help="with --demo: its report folder (default: a temporary folder)")
    p.add_argument("--fsdp-worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-batch", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_setting(args: argparse.Namespace, workdir: Path) -> Setting:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to torch (torch.cuda.is_available() is False)")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    cuda = device.type == "cuda"
    return Setting(
        device=device,
        preset=args.preset,
        bf16=bf16,
        batch=args.batch,
        max_batch=args.max_batch,
        max_probe_seconds=args.max_probe_seconds,
        steps=max(2, args.steps),
        sample_batch=args.sample_batch or (4 if cuda else 2),
        rl_prompts=args.rl_prompts,
        rl_group=args.rl_group or (4 if cuda else 2),
        rl_steps=args.rl_steps or (10 if cuda else 4),
        workdir=workdir,
    )


def run_checks(s: Setting, args: argparse.Namespace) -> list[Outcome]:
    """Every selected check in order; a failure is recorded and the next check runs."""
    outcomes: list[Outcome] = []
    state: dict = {}
    model: ParaUni | None = None
    titles = {
        "stage1": "Stage I step (queries + LIM; the loop of parauni.training.trainer)",
        "all_vs_last": "all-layer vs last-layer Stage-I step (P2)",
        "stage2": "Stage II step (+ the whole DiT; the loop of parauni.training.trainer)",
        "sampling": f"{SAMPLE_STEPS}-step sampling with CFG (parauni.pipeline.generate)",
        "reconstruction": "reconstruction: image-to-image + DC-AE encode",
        "rl": "Stage III epoch: rollout + LoRA update (parauni.rl.grpo.train_rl)",
        "fsdp2": "accelerate launch with configs/accelerate/fsdp.yaml, 1 process (Stage I, then Stage II)",
    }
    for name in CHECKS:
        if name not in args.checks:
            continue
        print(f"\n[{name}] {titles[name]}", flush=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            if name == "fsdp2":
                model = None  # the launched process needs the memory
                free_memory(s)
                figures = check_fsdp(s, state, args)
            else:
                if model is None:
                    t0 = time.perf_counter()
                    model = build_model(s)
                    print(f"    model built in {time.perf_counter() - t0:.1f} s", flush=True)
                if name in ("stage1", "stage2"):
                    figures = check_stage(s, model, int(name[-1]), state)
                elif name == "all_vs_last":
                    figures = check_all_vs_last(s, model, state)
                elif name == "sampling":
                    figures = check_sampling(s, model)
                elif name == "reconstruction":
                    figures = check_reconstruction(s, model)
                else:
                    figures = check_rl(s, model)
            figures["check_seconds"] = time.perf_counter() - start
            figures["check_cpu_seconds"] = time.process_time() - cpu_start
            print(f"    {figures['text']}", flush=True)
            print(
                f"    {figures['peak_text']}; the check took {figures['check_seconds']:.1f} s "
                f"({figures['check_cpu_seconds']:.1f} s of CPU time in this process)",
                flush=True,
            )
            outcomes.append(Outcome(name, True, figures=figures))
        except Exception as err:  # noqa: BLE001 - every check reports, the next one runs
            first_line = (str(err).strip().splitlines() or [""])[0]
            why = f"{type(err).__name__}: {first_line}"[:300]
            traceback.print_exc(limit=6)
            print(f"    failed: {why}", flush=True)
            outcomes.append(Outcome(name, False, why))
            if model is not None:
                model.zero_grad(set_to_none=True)
        free_memory(s)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo:
        return run_demo_mode(args)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        s = make_setting(args, workdir)
        if args.fsdp_worker:
            fsdp_worker(s, args.fsdp_batch, Path(args.fsdp_worker))
            return 0
        where = (
            f"{torch.cuda.get_device_name(s.device)} ({torch.cuda.get_device_properties(s.device).total_memory / 2**30:.0f} GiB)"
            if s.cuda
            else f"CPU {cpu_name()}, {torch.get_num_threads()} thread(s)"
        )
        precision = (
            "bf16 (VLM, DiT, VAE weights bf16; queries + LIM fp32; bf16 autocast in training and RL)"
            if s.bf16
            else "fp32 throughout"
        )
        print(
            f"gpu_check: preset {s.preset} (random weights of its classes and sizes), device {s.device}: {where}"
        )
        print(f"  precision: {precision}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}")
        print(
            "  FLOPs: counted by torch.utils.flop_counter.FlopCounterMode on the same work (matrix products, "
            "convolutions, attention; forward and backward)"
        )
        t0 = time.perf_counter()
        outcomes = run_checks(s, args)
        total = time.perf_counter() - t0
    print(f"\nsummary ({s.preset} on {s.device}, {total:.0f} s):")
    for o in outcomes:
        print(f"  {o.name:<15} {'ok' if o.ok else 'failed: ' + o.why}")
    if args.json:
        data = {
            "preset": s.preset,
            "device": str(s.device),
            "device_name": where,
            "precision": precision,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "seconds": total,
            "checks": {o.name: {"ok": o.ok, "why": o.why, **o.figures} for o in outcomes},
        }
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
