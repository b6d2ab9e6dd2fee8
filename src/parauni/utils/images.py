"""Image helpers on PIL and torch only (no torchvision): read, resize/crop, tensors <-> PIL, grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, raising :class:`ImageReadError` with the path for anything unreadable.

    Images of more than twice PIL's ``Image.MAX_IMAGE_PIXELS`` (a decompression bomb: a few KB of PNG that
    would take gigabytes) are refused before they are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageReadError(
            f"image {path} is too large to read safely ({err}); resize it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS if it is a real image"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"image {path} cannot be read (not an image or corrupt): {err}") from err


def resize_center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize so the image covers (width, height), then crop the centre."""
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def pil_to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """PIL image or uint8 HxWx3 array -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) or (B, H, W, 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL image."""
    return Image.fromarray(tensor_to_uint8(x))


def make_grid(images: list[np.ndarray] | np.ndarray, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 (H, W, 3) images into a grid with ``pad`` pixels between them."""
    images = list(images)
    if not images:
        raise ValueError("make_grid needs at least one image")
    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = img
    return grid
