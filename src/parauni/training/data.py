"""Training data: image-caption sources addressed by example index, so that a run resumes exactly.

A source maps a global example index to ``(image, caption)``; the trainer asks for the indices of its step.
* :class:`FolderSource` - your own data: a JSONL file of ``{"image": path, "caption": text}`` lines, or a
  folder with such JSONL files or ``name.png`` + ``name.txt`` pairs. Images are read once, resized and centre-cropped, unreadable ones are
  skipped and counted, and the prepared tensors (VAE latents when the model has a VAE) are cached on disk.
* the shapes world's endless stream (:mod:`parauni.world`).

Data too big for memory (webdataset tar shards, Hugging Face datasets, extracted latents) is read shard by
shard: :mod:`.streaming`; :mod:`.sources` decides which source a ``--data`` path is.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, ImageReadError
from ..utils.files import read_lines, save_safetensors
from ..utils.images import pil_to_tensor, read_image, resize_center_crop

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One image-caption pair on disk."""

    image: Path
    caption: str


def is_jsonl_file(path: str | Path) -> bool:
    """Whether ``--data`` names one JSONL file of image-caption lines."""
    return Path(path).is_file() and Path(path).suffix.lower() == ".jsonl"


def _lines(path: Path) -> list[str]:
    """The UTF-8 lines of a data file; DataError naming the file and line otherwise."""
    try:
        return read_lines(path, "--data")
    except ConfigError as err:
        raise DataError(str(err)) from err


def scan_folder(root: str | Path) -> list[Record]:
    """Image-caption records of a JSONL file, or of a folder: every ``*.jsonl`` in it, else ``image`` +
    ``image.txt`` pairs. Image paths in a JSONL are relative to the folder that holds it. Images without a
    caption (no ``.txt``, or an empty one) are left out with a warning that counts them."""
    records, uncaptioned = find_records(root)
    warn_uncaptioned(uncaptioned, len(records) + len(uncaptioned))
    return records


def warn_uncaptioned(uncaptioned: list[Path], total: int) -> None:
    """Say how many images of ``total`` were left out for having no caption (nothing when none)."""
    if uncaptioned:
        warnings.warn(
            f"left out {len(uncaptioned)} image(s) of {total} that have no caption (no .txt beside them, or an "
            f"empty one), e.g. {[str(p) for p in uncaptioned[:3]]}",
            stacklevel=3,
        )


def find_records(root: str | Path) -> tuple[list[Record], list[Path]]:
    """:func:`scan_folder`'s records, and the images it leaves out for having no caption (no warning)."""
    root = Path(root)
    jsonl_file = is_jsonl_file(root)
    if not (root.is_dir() or jsonl_file):
        raise DataError(f"--data {root} is neither a folder nor a .jsonl file")
    records: list[Record] = []
    jsonls = [root] if jsonl_file else sorted(root.glob("*.jsonl"))
    base = root.parent if jsonl_file else root
    for path in jsonls:
        for i, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caption = row["image"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{i} must be a JSON object with 'image' and 'caption' keys") from err
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{path}:{i} has an empty or non-text caption")
            image_path = Path(image) if Path(image).is_absolute() else base / image
            records.append(Record(image_path, caption.strip()))
    uncaptioned: list[Path] = []
    if not jsonls:
        for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = image.with_suffix(".txt")
            caption = "\n".join(_lines(txt)).strip() if txt.is_file() else ""
            if caption:
                records.append(Record(image, caption))
            else:
                uncaptioned.append(image)
    if not records:
        raise DataError(
            f"no image-caption pairs in {root}"
            + (f" ({len(uncaptioned)} image(s) without a caption)" if uncaptioned else "")
            + ": add a JSONL of {'image': path, 'caption': text} lines, or image files each with a .txt "
            "caption of the same name"
        )
    return records, uncaptioned


class FolderSource:
    """Your own image-caption data, prepared once (resize + centre crop, VAE latents) and cached.

    Args:
        root: the data folder.
        image_size: side of the square training images.
        encode: maps pixels (B, 3, S, S) in [-1, 1] to the DiT's input space (the model's VAE or identity).
        cache_key: identifies ``encode`` (:func:`.latents.encoder_key` of the model's VAE: its config and
            weights) so a cache is reused only for the same encoder.
        cache_dir: where prepared tensors are cached (default: ``root/.parauni_cache``).

    ``skipped`` lists the unreadable images, ``uncaptioned`` the images left out for having no caption.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int,
        encode=None,
        cache_key: str = "pixels",
        cache_dir: str | Path | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        self.records, self.uncaptioned = find_records(root)
        warn_uncaptioned(self.uncaptioned, len(self.records) + len(self.uncaptioned))
        self.image_size = image_size
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        fingerprint = hashlib.sha256()
        for r in self.records:
            stat = r.image.stat() if r.image.exists() else None
            fingerprint.update(
                f"{r.image}|{r.caption}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode()
            )
        fingerprint.update(f"{image_size}|{cache_key}".encode())
        folder = Path(root).parent if is_jsonl_file(root) else Path(root)
        cache_dir = Path(cache_dir) if cache_dir else folder / ".parauni_cache"
        cache = cache_dir / f"data-{fingerprint.hexdigest()[:16]}.safetensors"
        if cache.is_file():
            stored = load_file(str(cache))
            self.inputs, keep = stored["inputs"], stored["keep"].tolist()
        else:
            self.inputs, keep = self._prepare(encode, batch_size, progress)
            cache_dir.mkdir(parents=True, exist_ok=True)
            # written atomically through a per-process temporary file: under a launcher every process
            # prepares the same cache
            save_safetensors({"inputs": self.inputs.contiguous(), "keep": torch.tensor(keep)}, cache)
        self.skipped = [str(r.image) for r, k in zip(self.records, keep, strict=True) if not k]
        self.captions = [r.caption for r, k in zip(self.records, keep, strict=True) if k]
        if not self.captions:
            raise DataError(f"none of the {len(self.records)} images in {root} could be read")
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) of {len(self.records)}, e.g. {self.skipped[:3]}",
                stacklevel=2,
            )

    def _prepare(self, encode, batch_size: int, progress: bool) -> tuple[torch.Tensor, list[bool]]:
        keep, chunks, pending = [], [], []

        def flush() -> None:
            if pending:
                x = torch.stack(pending)
                with torch.no_grad():
                    chunks.append((encode(x) if encode else x).float().cpu())
                pending.clear()

        for record in tqdm(self.records, desc="preparing images", disable=not progress):
            try:
                img = resize_center_crop(read_image(record.image), self.image_size, self.image_size)
            except ImageReadError:
                keep.append(False)
                continue
            keep.append(True)
            pending.append(pil_to_tensor(img))
            if len(pending) == batch_size:
                flush()
        flush()
        inputs = torch.cat(chunks) if chunks else torch.zeros(0)
        return inputs, keep

    def __len__(self) -> int:
        return len(self.captions)

    encoded = True  # examples() returns inputs already in the DiT's space

    def _order(self, epoch: int, seed: int) -> np.ndarray:
        key = (epoch, seed)
        if key not in self._orders:
            self._orders = {key: np.random.default_rng([seed, epoch]).permutation(len(self))}
        return self._orders[key]

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        """Inputs (n, C, h, w) already in the DiT's space and captions for global example indices.

        Index i reads item ``perm_e[i mod N]`` with a fresh seeded permutation per epoch e = i // N.
        """
        n = len(self)
        items = [int(self._order(i // n, seed)[i % n]) for i in indices]
        return self.inputs[items], [self.captions[j] for j in items]
