"""Text-to-image and image-to-image generation with a :class:`~parauni.models.parauni.ParaUni` model.

Steps: (1) validate the request (values, sizes, and the memory one batch needs, before anything is
allocated), (2) conditions for the prompts (or input images) and the unconditional
template, (3) per-image seeded noise, (4) the one denoising loop with CFG, (5) decode to pixels.
Each image's noise depends only on ``seed + index``, so results do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import check_cfg as check_cfg  # re-exported: the guidance rule lives with the others in config
from .config import check_sampling
from .diffusion.sampling import check_dpm_steps, sample
from .errors import ConfigError
from .models.parauni import ParaUni
from .models.vlm import check_prompts


class GenerationCancelled(Exception):
    """The caller's cancel event was set: the generation stopped between two denoising steps."""


def initial_noise(
    shape: tuple[int, int, int], seeds: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, one generator per image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device
    )


def estimate_memory(model: ParaUni, height: int, width: int, batch: int, cfg: float = 1.0) -> int:
    """Bytes of the largest activations one batch of ``batch`` images of height x width holds at once.

    A lower bound from the two largest tensors of a generation: the DiT's MLP hidden states,
    (B', tokens, width x mlp_ratio) with B' = 2B under classifier-free guidance, and the VAE decoder's
    highest-resolution block, input and output of (B, C0, H, W) with C0 its first decoder width (in pixel
    space, the (B, 3, H, W) fp32 output). Weights are not counted; they are already loaded.
    """
    dit = model.dit.config
    f = model.latent_factor
    tokens = (height // f // dit.patch_size) * (width // f // dit.patch_size)
    branches = 1 if cfg == 1.0 else 2
    hidden = dit.num_attention_heads * dit.attention_head_dim * getattr(dit, "mlp_ratio", 4.0)
    dit_bytes = branches * batch * tokens * hidden * next(model.dit.parameters()).element_size()
    if model.vae is None:
        return int(max(dit_bytes, batch * 3 * height * width * 4))
    c0 = model.vae.config.decoder_block_out_channels[0]
    vae_bytes = 2 * batch * c0 * height * width * next(model.vae.parameters()).element_size()
    return int(max(dit_bytes, vae_bytes))


def available_memory(device: torch.device | str) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, else the system's MemAvailable; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(model: ParaUni, height: int, width: int, batch: int, cfg: float = 1.0) -> None:
    """ValueError with the figures when one batch cannot fit in the memory left on the model's device."""
    need = estimate_memory(model, height, width, batch, cfg)
    free = available_memory(model.device)
    if free is None or need <= free:
        return
    fix = "lower --height / --width" + (" or --batch-size" if batch > 1 else "")
    raise ConfigError(
        f"{height}x{width} images in batches of {batch} need at least {need / 1e9:.1f} GB of activations, "
        f"more than the {free / 1e9:.1f} GB free on {model.device}; {fix}"
    )


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


def check_seed(seed: int, n: int = 1, flag: str = "seed") -> int:
    """``seed`` when the seeds ``seed .. seed + n - 1`` of ``n`` images are integers in [0, MAX_SEED]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0 or seed + max(n, 1) - 1 > MAX_SEED:
        raise ConfigError(
            f"{flag} {seed!r} must be an integer from 0 to {MAX_SEED - max(n, 1) + 1} (image i uses seed + i)"
        )
    return seed


def check_finite_samples(x: torch.Tensor, what: str, cfg: float, first: int) -> None:
    """Refuse samples that are not finite (an image of them would be black or noise, silently)."""
    if not bool(torch.isfinite(x).all()):
        bad = sorted({first + int(i) for i in (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()})
        raise ConfigError(
            f"the {what} of image(s) {bad[:8]} are not finite (NaN or inf) at cfg={cfg:g}: nothing was written; "
            "lower the guidance scale (--cfg; 1 to 10 is usual, parauni serve allows at most 20)"
        )


@dataclass(frozen=True)
class GenerationOptions:
    """The sampling options a batch job (a benchmark, an analysis, a reconstruction) passes on to every
    :func:`generate` call it makes; the ``parauni`` commands build them once from their flags. None: the
    model's ``sampling`` config. :func:`generate` checks the values."""

    seed: int = field(default=0, metadata={"help": "noise seed of the job's first image (image i: seed + i)"})
    batch_size: int = field(default=4, metadata={"help": "images per model call"})
    steps: int | None = field(default=None, metadata={"help": "denoising steps (None: the model's)"})
    cfg: float | None = field(
        default=None, metadata={"help": "classifier-free guidance scale (None: the model's)"}
    )
    height: int | None = field(default=None, metadata={"help": "image height in pixels (None: the model's)"})
    width: int | None = field(default=None, metadata={"help": "image width in pixels (None: the model's)"})

    def kwargs(self) -> dict[str, int | float | None]:
        """These options as keyword arguments of :func:`generate`."""
        return dataclasses.asdict(self)

    def sized(self, sampling) -> GenerationOptions:
        """These options with a height / width left None taken from `sampling` (a model's
        :class:`~parauni.config.SamplingConfig`), for a job that needs the size before it generates."""
        height = sampling.height if self.height is None else self.height
        width = sampling.width if self.width is None else self.width
        return dataclasses.replace(self, height=height, width=width)


@dataclass(frozen=True)
class Request:
    """A checked generation request, the model's ``sampling`` defaults filled in.

    ``prompts``: the stripped captions (None for image-to-image); ``n``: how many images; ``shape``: (C, h, w)
    of the DiT's input for one image of height x width.
    """

    prompts: list[str] | None
    n: int
    steps: int
    cfg: float
    sampler: str
    shift: float
    height: int
    width: int
    shape: tuple[int, int, int]


def check_request(
    model: ParaUni,
    prompts: list[str] | None = None,
    images: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: str | None = None,
    shift: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Request:
    """Check what a generation is asked for, before anything is computed: the one validator of
    :func:`generate` (so of ``parauni generate`` and ``parauni serve``) and of ``ParaUniPipeline``.

    None takes the model's ``sampling`` value. Raises ConfigError naming the bad value and the fix.
    """
    s = model.config.sampling
    steps = s.steps if steps is None else steps
    cfg = s.cfg if cfg is None else cfg
    sampler = s.sampler if sampler is None else sampler
    shift = s.shift if shift is None else shift
    height = s.height if height is None else height
    width = s.width if width is None else width
    check_sampling("", sampler, steps, cfg, shift)
    if sampler == "dpm":
        check_dpm_steps(steps, shift)
    if prompts is not None and images is not None:
        raise ConfigError("give prompts (text-to-image) or images (image-to-image), not both")
    if images is None:
        prompts = check_prompts(prompts)
        n = len(prompts)
    else:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"images must be (N, 3, H, W) in [-1, 1], got {shape}")
        n = len(images)
    shape = model.latent_shape(height, width)
    return Request(prompts, n, steps, float(cfg), sampler, float(shift), height, width, shape)


@torch.no_grad()
def generate(
    model: ParaUni,
    prompts: list[str] | None = None,
    images: torch.Tensor | None = None,
    *,
    steps: int | None = None,
    cfg: float | None = None,
    sampler: str | None = None,
    shift: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    scale_fn=None,
    cancel: threading.Event | None = None,
) -> torch.Tensor:
    """Generate one image per prompt (or per input image).

    Args:
        prompts: N captions (text-to-image), or None when ``images`` is given.
        images: (N, 3, H', W') in [-1, 1] for image-to-image ("Keep the image as it is.").
        steps / cfg / sampler / shift / height / width: default to ``model.config.sampling``.
        seed: image i uses noise seed ``seed + i``.
        scale_fn: optional ``(per_layer_conditions) -> scale`` hook, e.g. per-layer analysis or LDAM.
        cancel: when set (by another thread), raise :class:`GenerationCancelled` before the next DiT call.

    Returns:
        (N, 3, H, W) pixels in [-1, 1] on the CPU.
    """
    request = check_request(
        model, prompts, images, steps=steps, cfg=cfg, sampler=sampler, shift=shift, height=height, width=width
    )
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    check_seed(seed, request.n)
    check_memory(model, request.height, request.width, min(batch_size, request.n), request.cfg)
    prompts, n, shape = request.prompts, request.n, request.shape
    steps, cfg, sampler, shift = request.steps, request.cfg, request.sampler, request.shift
    model.eval()
    velocity = model.velocity if cancel is None else _cancellable(model.velocity, cancel)
    outputs = []
    bar = tqdm(total=n, desc="generating", unit="img", disable=not progress)
    try:  # closed before an error is printed, so that the error has its own line
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if images is None:
                batch = model.encode_prompts(list(prompts[start:stop]))
            else:
                batch = model.encode_prompts([None] * (stop - start), images=images[start:stop])
            cond = model.condition(batch, scale_fn)
            uncond = model.condition(model.encode_prompts([None])).expand_as(cond)
            x = initial_noise(shape, list(range(seed + start, seed + stop)), model.device)
            x = sample(velocity, cond, uncond, x, sampler=sampler, steps=steps, shift=shift, cfg=cfg)
            check_finite_samples(x, "sampled latents", cfg, start)
            pixels = model.decode_latents(x).cpu()
            check_finite_samples(pixels, "decoded pixels", cfg, start)
            outputs.append(pixels)
            bar.update(stop - start)
    finally:
        bar.close()
    return torch.cat(outputs)


def _cancellable(velocity, cancel: threading.Event):
    """``velocity`` that raises GenerationCancelled once ``cancel`` is set."""

    def fn(*args, **kwargs):
        if cancel.is_set():
            raise GenerationCancelled("the generation was cancelled")
        return velocity(*args, **kwargs)

    return fn
