"""Image reconstruction evaluation (the paper's supplementary section 4; README.md, "Evaluate",
"Image-to-image").

Each input image goes through the VLM's vision encoder into the prompt "Keep the image as it is."
(`parauni.pipeline.generate` with ``images=``); the DiT generates from the queries read out of the layers the
LIM uses. The paper compares last-layer with all-layer interaction by PSNR, SSIM and CLIP similarity
(last layer 13.52 / 0.364 / 0.987; all layers 13.69 / 0.372 / 0.990).

* `psnr`, `ssim`, `clip_similarity`: per-image metrics on (N, 3, H, W) images in [-1, 1].
* `reconstruct_folder`: reconstruct an image folder with one model, write the PNGs and ``metrics.json``.
* `side_by_side`: a figure with the inputs and each model's reconstructions in columns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.parauni import ParaUni
from ..pipeline import GenerationOptions, generate
from ..scoring.clip import CLIPEmbedder
from ..training.data import IMAGE_SUFFIXES
from ..utils.images import (
    ImageReadError,
    pil_to_tensor,
    read_image,
    resize_center_crop,
    tensor_to_pil,
    tensor_to_uint8,
)
from ..utils.plotting import pyplot

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
METRICS_FILE = "metrics.json"


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ValueError(
            f"expected two image batches of the same shape (N, 3, H, W), got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``10 log10(data_range^2 / MSE)``.

    a, b: (N, 3, H, W) in [-1, 1] (hence ``data_range`` 2). The MSE is over channels and pixels of each image.
    Identical images (MSE 0) give ``inf``. Returns (N,) float64.
    """
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)  # (N,)
    return 10 * torch.log10(data_range**2 / mse)  # mse 0 -> log10(inf) = inf


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian taps centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image -> (N,) float64.

    Definition: local statistics under an 11 x 11 Gaussian window (sigma 1.5, taps normalised to sum 1),
    computed per channel at every position where the window lies fully inside the image (the valid region,
    no padding)::

        mu_x = w * x,  sigma_x^2 = w * x^2 - mu_x^2,  sigma_xy = w * (x y) - mu_x mu_y   (population moments)
        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
        C1 = (0.01 L)^2,  C2 = (0.03 L)^2,  L = data_range (2 for images in [-1, 1])

    and the SSIM map is averaged over channels and positions. These are the conventions of skimage's
    ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=2, channel_axis=...)``, whose mean is also taken over the region the window covers fully
    (not checked against skimage here: it is not installed). Images smaller than 11 px on a side use a
    window of the largest odd size that fits (same sigma).
    """
    _check_pair(a, b)
    n, c, h, w = a.shape
    size = min(SSIM_WINDOW, h, w)
    size -= 1 - size % 2  # the largest odd size <= min(11, H, W)
    g = _gaussian_window(size, SSIM_SIGMA)
    gy, gx = g.view(1, 1, size, 1), g.view(1, 1, 1, size)

    def blur(x: torch.Tensor) -> torch.Tensor:  # (N*C, 1, H, W) -> (N*C, 1, H-size+1, W-size+1)
        return F.conv2d(F.conv2d(x, gy), gx)

    x = a.double().reshape(n * c, 1, h, w)
    y = b.double().reshape(n * c, 1, h, w)
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx**2
    vy = blur(y * y) - my**2
    cxy = blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return smap.reshape(n, -1).mean(1)  # mean over channels and valid positions


@torch.no_grad()
def clip_similarity(
    embedder: CLIPEmbedder, a: torch.Tensor, b: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """Cosine similarity of the L2-normalised CLIP image embeddings of a[i] and b[i] -> (N,) float32.

    a, b: (N, 3, H, W) in [-1, 1]; `embedder` is e.g. ``CLIPEmbedder.from_pretrained(path, text=False)``.
    """
    _check_pair(a, b)
    out = []
    for start in range(0, len(a), batch_size):
        ea = embedder.embed_images(a[start : start + batch_size])  # (B, D), unit norm
        eb = embedder.embed_images(b[start : start + batch_size])
        out.append((ea * eb).sum(-1).cpu())
    return torch.cat(out)


@dataclass
class Reconstruction:
    """What `reconstruct_folder` produced: inputs and outputs (N, 3, H, W) in [-1, 1] and the metrics."""

    files: list[str]
    inputs: torch.Tensor
    outputs: torch.Tensor
    metrics: dict
    skipped: list[dict] = field(default_factory=list)


def _json_number(x: float) -> float | None:
    """JSON has no infinity: a non-finite value (identical images: PSNR inf) is written as null."""
    return float(x) if math.isfinite(x) else None


def _output_names(files: list[Path]) -> list[str]:
    """``<stem>.png`` per input, or ``<stem>_<suffix>.png`` for all when two inputs share a stem."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    return [f"{f.stem}_{f.suffix.lstrip('.').lower()}.png" for f in files]


def read_image_folder(
    images_dir: str | Path, height: int, width: int
) -> tuple[list[Path], torch.Tensor, list[dict]]:
    """The images of a folder (sorted by name, suffixes of `IMAGE_SUFFIXES`) resized and centre-cropped to
    height x width -> (files, (N, 3, H, W) in [-1, 1], skipped [{file, error}]).

    Unreadable files are skipped and reported; a missing folder or one without a readable image raises
    :class:`ImageReadError`.
    """
    folder = Path(images_dir)
    if not folder.is_dir():
        raise ImageReadError(f"image folder {folder} does not exist")
    candidates = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    files, tensors, skipped = [], [], []
    for path in candidates:
        try:
            tensors.append(pil_to_tensor(resize_center_crop(read_image(path), height, width)))
        except ImageReadError as err:
            skipped.append({"file": path.name, "error": str(err)})
            continue
        files.append(path)
    if not files:
        raise ImageReadError(
            f"image folder {folder} holds no readable image ({', '.join(IMAGE_SUFFIXES)}); "
            f"{len(skipped)} unreadable file(s) skipped"
        )
    return files, torch.stack(tensors), skipped


def reconstruct_folder(
    model: ParaUni,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    options: GenerationOptions | None = None,
    clip: CLIPEmbedder | None = None,
    progress: bool = True,
) -> Reconstruction:
    """Reconstruct every image of `images_dir` with `model` and score the reconstructions.

    `options`: seed, batch size, steps, CFG and image size (default: ``GenerationOptions()``; a size left
    None is the model's sampling size).

    Steps: (1) read the folder at that height x width, skipping unreadable files; (2) `generate` with
    ``images=`` (the "Keep the image as it is." prompt), image i with noise seed ``options.seed + i``;
    (3) write ``out_dir/<stem>.png``; (4) PSNR, SSIM and, with `clip`, CLIP similarity of each
    reconstruction (as written: rounded to uint8) against its resized input; (5) ``out_dir/metrics.json``
    with the per-image values, their means and the skipped files.
    """
    s = model.config.sampling
    options = (options or GenerationOptions()).sized(s)
    height, width = options.height, options.width
    model.check_size(height, width)
    files, inputs, skipped = read_image_folder(images_dir, height, width)
    outputs = generate(model, images=inputs, **options.kwargs(), progress=progress)
    # Score what is written: the uint8 rounding of the reconstruction (the inputs are uint8 already).
    outputs = torch.stack([pil_to_tensor(img) for img in tensor_to_uint8(outputs)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = _output_names(files)
    for x, name in zip(outputs, names, strict=True):
        tensor_to_pil(x).save(out_dir / name)

    scores = {"psnr": psnr(inputs, outputs), "ssim": ssim(inputs, outputs)}
    if clip is not None:
        scores["clip_similarity"] = clip_similarity(clip, inputs, outputs)
    per_image = [
        {"file": f.name, "output": name, **{k: _json_number(v[i].item()) for k, v in scores.items()}}
        for i, (f, name) in enumerate(zip(files, names, strict=True))
    ]
    metrics = {
        "images_dir": str(images_dir),
        "num_images": len(files),
        "height": height,
        "width": width,
        "steps": s.steps if options.steps is None else options.steps,
        "cfg": s.cfg if options.cfg is None else options.cfg,
        "seed": options.seed,
        "mean": {k: _json_number(v.double().mean().item()) for k, v in scores.items()},
        "per_image": per_image,
        "skipped": skipped,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False))
    return Reconstruction([f.name for f in files], inputs, outputs, metrics, skipped)


def side_by_side(rows: dict[str, torch.Tensor], out_png: str | Path, max_images: int = 8) -> Path:
    """A grid figure: one row per image (the first `max_images`), one column per entry of `rows`.

    rows: column title -> (N, 3, H, W) in [-1, 1], e.g. ``{"input": x, "last layer": y, "all layers": z}``;
    every entry holds the same N images (sizes may differ between columns).
    """
    plt = pyplot()
    if not rows:
        raise ValueError("side_by_side needs at least one column")
    counts = {name: len(x) for name, x in rows.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"every column must hold the same number of images, got {counts}")
    n = min(next(iter(counts.values())), max_images)
    cols = len(rows)
    fig, axes = plt.subplots(n, cols, figsize=(2.0 * cols, 2.0 * n + 0.3), squeeze=False)
    for c, (name, images) in enumerate(rows.items()):
        tiles = tensor_to_uint8(images[:n])  # (n, H, W, 3)
        for r in range(n):
            ax = axes[r][c]
            ax.imshow(tiles[r], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
