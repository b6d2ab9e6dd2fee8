"""Text-to-image and image-to-image generation with a :class:`~parauni.models.parauni.ParaUni` model.

Steps: (1) validate the request, (2) conditions for the prompts (or input images) and the unconditional
template, (3) per-image seeded noise, (4) the one denoising loop with CFG, (5) decode to pixels.
Each image's noise depends only on ``seed + index``, so results do not depend on the batch size.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .diffusion.sampling import sample
from .models.parauni import ParaUni
from .models.vlm import check_prompts


def initial_noise(
    shape: tuple[int, int, int], seeds: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(len(seeds), *shape) standard normal noise, one generator per image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(
        device
    )


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
) -> torch.Tensor:
    """Generate one image per prompt (or per input image).

    Args:
        prompts: N captions (text-to-image), or None when ``images`` is given.
        images: (N, 3, H', W') in [-1, 1] for image-to-image ("Keep the image as it is.").
        steps / cfg / sampler / shift / height / width: default to ``model.config.sampling``.
        seed: image i uses noise seed ``seed + i``.
        scale_fn: optional ``(per_layer_conditions) -> scale`` hook, e.g. per-layer analysis or LDAM.

    Returns:
        (N, 3, H, W) pixels in [-1, 1] on the CPU.
    """
    s = model.config.sampling
    steps = s.steps if steps is None else steps
    cfg = s.cfg if cfg is None else cfg
    sampler = s.sampler if sampler is None else sampler
    shift = s.shift if shift is None else shift
    height = s.height if height is None else height
    width = s.width if width is None else width
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if prompts is not None and images is not None:
        raise ValueError("give prompts (text-to-image) or images (image-to-image), not both")
    if images is None:
        prompts = check_prompts(prompts)
        n = len(prompts)
    else:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    shape = model.latent_shape(height, width)
    model.eval()
    outputs = []
    bar = tqdm(total=n, desc="generating", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if images is None:
            batch = model.encode_prompts(list(prompts[start:stop]))
        else:
            batch = model.encode_prompts([None] * (stop - start), images=images[start:stop])
        if scale_fn is None:
            cond = model.condition(batch)
        else:
            per_layer = model.per_layer_conditions(batch)
            cond = model.lim.aggregate(per_layer, scale_fn(per_layer))
        uncond = model.condition(model.encode_prompts([None])).expand_as(cond)
        x = initial_noise(shape, list(range(seed + start, seed + stop)), model.device)
        x = sample(model.velocity, cond, uncond, x, sampler=sampler, steps=steps, shift=shift, cfg=cfg)
        outputs.append(model.decode_latents(x).cpu())
        bar.update(stop - start)
    bar.close()
    return torch.cat(outputs)
