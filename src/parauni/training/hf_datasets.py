"""Local Hugging Face datasets as training sources (optional dependency: ``pip install datasets``).

Accepted folders: one written by ``Dataset.save_to_disk`` (``load_from_disk``; a ``DatasetDict`` uses its
``train`` split, or its only split), or a folder of ``*.parquet`` / ``*.arrow`` files. Arrow tables are
memory-mapped, so rows are read on demand and the whole dataset is one shard shuffled per epoch
(:class:`~parauni.training.streaming.ShardOrder`). The image column may hold ``datasets.Image`` values,
encoded bytes, or paths (relative to the folder); the caption column text. Images are decoded here (not by
``datasets``) so that a corrupt one is skipped and counted like any other corrupt sample.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .streaming import CorruptSample, ShardedSource, check_caption, decode_image

DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
FILE_SUFFIXES = (".parquet", ".arrow")


def is_hf_folder(path: Path) -> bool:
    """A ``save_to_disk`` folder, or a folder of parquet / arrow files."""
    if not path.is_dir():
        return False
    return any((path / m).is_file() for m in DISK_MARKERS) or any(
        p.suffix in FILE_SUFFIXES for p in path.iterdir()
    )


def _require_datasets():
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "this --data folder is a Hugging Face dataset; reading it needs the optional `datasets` package: "
            "pip install 'parauni[datasets]' (or pip install datasets)"
        ) from err
    return datasets


def load_hf_folder(root: Path, cache_dir: Path | None = None):
    """The ``datasets.Dataset`` of a local folder (see the module docstring)."""
    datasets = _require_datasets()
    if any((root / m).is_file() for m in DISK_MARKERS):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if "train" in ds:
                return ds["train"]
            if len(splits) != 1:
                raise DataError(
                    f"{root} is a DatasetDict with splits {splits} and no 'train' split; save the split to "
                    "train on with ds[split].save_to_disk(folder)"
                )
            return ds[splits[0]]
        return ds
    parquet, arrow = sorted(root.glob("*.parquet")), sorted(root.glob("*.arrow"))
    if parquet and arrow:
        raise DataError(f"{root} mixes .parquet and .arrow files; keep one format per folder")
    if parquet:
        cache = str(cache_dir or root / ".parauni_cache" / "hf")
        return datasets.load_dataset(
            "parquet", data_files=[str(p) for p in parquet], split="train", cache_dir=cache
        )
    return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in arrow])


class HFDatasetSource(ShardedSource):
    """Image-caption rows of a local Hugging Face dataset (pixels; the VAE runs per step).

    Args:
        root: the dataset folder.
        image_size: side of the square training images (resize + centre crop).
        image_column / caption_column: the columns holding the image and the caption.
    """

    def __init__(
        self, root: str | Path, image_size: int, image_column: str = "image", caption_column: str = "caption"
    ) -> None:
        datasets = _require_datasets()
        self.root = Path(root)
        ds = load_hf_folder(self.root)
        missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
        if missing:
            raise DataError(
                f"{root} has no column(s) {missing}; its columns are {ds.column_names}: pass "
                "--image-column / --caption-column"
            )
        ds = ds.select_columns([image_column, caption_column])
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        super().__init__([len(ds)], str(root), encoded=False, shards_per_group=1)
        self.dataset = ds
        self.image_size = image_size
        self.image_column = image_column
        self.caption_column = caption_column

    def _image_bytes(self, value, name: str) -> bytes:
        """Encoded bytes of one image cell: {'bytes', 'path'} (datasets.Image), bytes, or a path."""
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            return value
        if isinstance(value, str) and value:
            path = Path(value) if Path(value).is_absolute() else self.root / value
            try:
                return path.read_bytes()
            except OSError as err:
                raise CorruptSample(name, f"image file {path} cannot be read ({err})") from err
        raise CorruptSample(name, f"the {self.image_column!r} cell holds no image ({type(value).__name__})")

    def read(self, shard: int, positions: list[int]) -> list[tuple[torch.Tensor, str] | CorruptSample]:
        rows = self.dataset[positions]  # one batched Arrow read: {column: [values]}
        out: list[tuple[torch.Tensor, str] | CorruptSample] = []
        for p, image, caption in zip(
            positions, rows[self.image_column], rows[self.caption_column], strict=True
        ):
            name = f"{self.root.name}[{p}]"
            try:
                text = check_caption(caption, name)
                out.append((decode_image(self._image_bytes(image, name), name, self.image_size), text))
            except CorruptSample as err:
                out.append(err)
        return out
