"""Which training source a ``--data`` path is, decided by what the path holds.

a latents folder (plan.json of parauni extract-latents)  -> LatentShardSource  (encoded; no VAE per step)
a save_to_disk / parquet / arrow folder                  -> HFDatasetSource    (needs `datasets`)
a folder of *.tar, a .tar path, a glob / brace pattern   -> TarShardSource     (webdataset shards, streamed)
a .jsonl file, or any other folder (JSONL lists or image + .txt pairs)
                                                         -> FolderSource       (read once, latents cached)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .data import FolderSource, is_jsonl_file, scan_folder
from .hf_datasets import HFDatasetSource, is_hf_folder
from .latents import LatentShardSource, is_latents_folder
from .streaming import SHARDS_PER_GROUP, RecordsSource, ShardedSource
from .tar_shards import TarShardSource, is_shard_pattern


@dataclass
class DataOptions:
    """How ``--data`` is read: column / key names and the shuffling of sharded sources."""

    image_column: str = "image"
    caption_column: str = "caption"
    shards_per_group: int = SHARDS_PER_GROUP


def data_kind(spec: str) -> str:
    """'latents', 'hf', 'tar' or 'folder' for a ``--data`` value; DataError for a path that is none."""
    path = Path(spec)
    if path.is_dir():
        if is_latents_folder(path):
            return "latents"
        if is_hf_folder(path):
            return "hf"
        if any(path.glob("*.tar")):
            return "tar"
        return "folder"
    if is_jsonl_file(path):
        return "folder"
    if is_shard_pattern(spec):
        return "tar"
    if path.is_file():
        raise DataError(
            f"--data {spec} is a file that is neither a .jsonl of {{image, caption}} lines nor a .tar shard; "
            "give one of those, or a folder"
        )
    raise DataError(
        f"--data {spec} does not exist; give a folder (images + captions, tar shards, a Hugging Face dataset "
        "or extracted latents), a .jsonl file of {image, caption} lines, a .tar shard, or a shard pattern "
        "such as 'data/shard-{000000..000099}.tar'"
    )


def pixel_source(spec: str, image_size: int, options: DataOptions | None = None) -> ShardedSource:
    """A sharded source of images + captions (what ``parauni extract-latents`` reads), streamed from disk."""
    options = options or DataOptions()
    kind = data_kind(spec)
    if kind == "latents":
        raise DataError(
            f"--data {spec} already holds extracted latents; train on it with parauni train --data"
        )
    if kind == "hf":
        return HFDatasetSource(spec, image_size, options.image_column, options.caption_column)
    if kind == "tar":
        return TarShardSource(
            spec, image_size, caption_key=options.caption_column, shards_per_group=options.shards_per_group
        )
    return RecordsSource(scan_folder(spec), image_size, name=spec)


def training_source(
    spec: str,
    image_size: int,
    encode=None,
    cache_key: str = "pixels",
    options: DataOptions | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
):
    """The source ``parauni train --data spec`` trains on (see the module docstring).

    ``encode`` / ``cache_key`` are the model's VAE for a plain folder, whose latents are computed once and
    cached in ``cache_dir`` (default: ``.parauni_cache`` in the data folder); sharded pixel sources stream images and the trainer encodes them per step.
    """
    options = options or DataOptions()
    kind = data_kind(spec)
    if kind == "latents":
        return LatentShardSource(spec, shards_per_group=options.shards_per_group)
    if kind == "folder":
        return FolderSource(
            spec, image_size, encode=encode, cache_key=cache_key, cache_dir=cache_dir, progress=progress
        )
    return pixel_source(spec, image_size, options)
