"""Webdataset-style tar shards, read with Python's ``tarfile`` (no webdataset dependency).

A shard ``shard-000000.tar`` holds samples as members sharing a key: ``KEY.jpg|jpeg|png|webp|bmp`` (the
image) and ``KEY.txt`` or ``KEY.json`` (the caption; a JSON object with a caption key). As in webdataset,
the key is the member path up to the first dot of its file name. Shards are uncompressed tars, so a sample
is read by seeking to its member; a shard's member table is built from its headers when the shard is
first read (a few shards are kept). Only the number of samples per shard is known for all shards; it is
counted once and cached beside the shards.

Shards are given as a folder of ``*.tar`` files, one ``.tar`` path, or a pattern: shell globs
(``data/*.tar``) and braces (``data/shard-{000000..000099}.tar``, ``{a,b}``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .streaming import SHARDS_PER_GROUP, CorruptSample, ShardedSource, check_caption, decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "json")
OPEN_SHARDS = 8  # member tables kept in memory (two groups of the default size)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{01..03}b`` -> a01b a02b a03b (zero padding kept), ``{x,y}`` -> x y; several braces expand left
    to right, as in the shell (braces inside braces are not supported)."""
    found = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())
    head, tail = pattern[: m.start()], pattern[m.end() :]
    if m.re is _CHOICE:
        return [p for choice in m.group(1).split(",") for p in expand_braces(head + choice + tail)]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise DataError(f"brace range {m.group(0)} in {pattern!r} runs backwards; write {{{hi}..{lo}}}")
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    return [p for n in range(int(lo), int(hi) + 1) for p in expand_braces(f"{head}{n:0{width}d}{tail}")]


def is_shard_pattern(spec: str) -> bool:
    """Whether ``--data`` names tar shards by pattern or path (rather than a folder)."""
    return any(c in spec for c in "*?[{") or spec.endswith(".tar")


def resolve_shards(spec: str) -> list[Path]:
    """The shard files of a folder (its ``*.tar``), a ``.tar`` path, or a glob / brace pattern, in order."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise DataError(f"--data {spec} holds no .tar shards")
        return shards
    shards: list[Path] = []
    missing: list[str] = []
    items = expand_braces(spec)
    for item in items:
        if any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise DataError(f"--data pattern {item!r} matches no file")
            shards.extend(Path(f) for f in found)
        elif Path(item).is_file():
            shards.append(Path(item))
        else:
            missing.append(item)
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(items)} tar shards of --data {spec!r} do not exist: {missing[:3]}"
        )
    bad = [s for s in shards if not s.name.endswith(".tar")]
    if bad:
        raise DataError(
            f"{bad[0]} is not an uncompressed .tar shard; tar shards must be plain .tar files (seekable), "
            "so repack compressed ones with `tar -xzf` + `tar -cf`"
        )
    return shards


@dataclass
class Member:
    """Where one member's bytes lie in the shard file."""

    name: str
    offset: int
    size: int


@dataclass
class TarSample:
    """The members of one key: its image and caption (either may be missing)."""

    key: str
    image: Member | None = None
    caption: Member | None = None


def split_key(member_name: str) -> tuple[str, str]:
    """webdataset's (key, extension): ``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``)."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: Path) -> list[TarSample]:
    """The samples of one shard in member order, from its headers only (no image is read).

    A truncated shard keeps the samples before the damage (with a warning).
    """
    samples: dict[str, TarSample] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if ext not in IMAGE_EXTS + CAPTION_EXTS:
                    continue  # other members of a sample (labels, metadata) are not needed
                sample = samples.setdefault(key, TarSample(key))
                member = Member(info.name, info.offset_data, info.size)
                if ext in IMAGE_EXTS and sample.image is None:
                    sample.image = member
                elif ext in CAPTION_EXTS and (sample.caption is None or ext == "txt"):
                    sample.caption = member
    except tarfile.ReadError as err:
        if not samples:
            raise DataError(f"tar shard {path} cannot be read (not a tar file or compressed): {err}") from err
        warnings.warn(
            f"tar shard {path} is truncated or damaged after {len(samples)} samples: {err}", stacklevel=2
        )
    return list(samples.values())


def shard_sizes(shards: list[Path], cache_dir: Path | None) -> list[int]:
    """Samples per shard, counted from the headers once and cached (keyed by path, size and mtime)."""
    stats = [s.stat() for s in shards]
    key = hashlib.sha256(
        "|".join(
            f"{s.resolve()}:{st.st_size}:{st.st_mtime_ns}" for s, st in zip(shards, stats, strict=True)
        ).encode()
    ).hexdigest()[:16]
    cache = None if cache_dir is None else cache_dir / f"shards-{key}.json"
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())["sizes"]
    sizes = [len(scan_shard(s)) for s in shards]
    if cache is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"shards": [str(s) for s in shards], "sizes": sizes}))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only data folder: the counts are recomputed next time
    return sizes


class TarShardSource(ShardedSource):
    """Image-caption samples of webdataset tar shards, streamed shard by shard (pixels: the trainer's VAE
    encodes them each step).

    Args:
        spec: a folder of ``*.tar``, a ``.tar`` path or a glob / brace pattern.
        image_size: side of the square training images (resize + centre crop).
        caption_key: the caption's key in ``KEY.json`` members.
        cache_dir: where the per-shard sample counts are cached (default: ``.parauni_cache`` beside the
            first shard).
        shards_per_group: shards shuffled together (see :class:`~parauni.training.streaming.ShardOrder`).
    """

    def __init__(
        self,
        spec: str | Path,
        image_size: int,
        caption_key: str = "caption",
        cache_dir: str | Path | None = None,
        shards_per_group: int = SHARDS_PER_GROUP,
    ) -> None:
        self.shards = resolve_shards(str(spec))
        cache = Path(cache_dir) if cache_dir else self.shards[0].parent / ".parauni_cache"
        super().__init__(
            shard_sizes(self.shards, cache), str(spec), encoded=False, shards_per_group=shards_per_group
        )
        self.image_size = image_size
        self.caption_key = caption_key
        self._tables: OrderedDict[int, list[TarSample]] = OrderedDict()

    def _table(self, shard: int) -> list[TarSample]:
        if shard not in self._tables:
            table = scan_shard(self.shards[shard])
            if len(table) != self.sizes[shard]:
                raise DataError(
                    f"tar shard {self.shards[shard]} now holds {len(table)} samples, not the "
                    f"{self.sizes[shard]} counted when the run started; shards must not change during a run"
                )
            self._tables[shard] = table
            while len(self._tables) > OPEN_SHARDS:
                self._tables.popitem(last=False)
        return self._tables[shard]

    def _caption(self, raw: bytes, member: Member, name: str) -> str:
        text = raw.decode("utf-8", errors="replace")
        if member.name.lower().endswith(".json"):
            try:
                text = json.loads(text)[self.caption_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CorruptSample(
                    name, f"{member.name} is not a JSON object with a {self.caption_key!r} key"
                ) from err
        return check_caption(text, name)

    def read(self, shard: int, positions: list[int]) -> list[tuple[torch.Tensor, str] | CorruptSample]:
        table = self._table(shard)
        out: list[tuple[torch.Tensor, str] | CorruptSample] = []
        with open(self.shards[shard], "rb") as f:
            for p in positions:
                sample = table[p]
                name = f"{self.shards[shard].name}:{sample.key}"
                if sample.image is None:
                    out.append(CorruptSample(name, f"no image member (.{'/.'.join(IMAGE_EXTS)})"))
                    continue
                if sample.caption is None:
                    out.append(CorruptSample(name, "missing caption (no .txt or .json member)"))
                    continue
                try:
                    f.seek(sample.caption.offset)
                    caption = self._caption(f.read(sample.caption.size), sample.caption, name)
                    f.seek(sample.image.offset)
                    image = decode_image(f.read(sample.image.size), name, self.image_size)
                except CorruptSample as err:
                    out.append(err)
                    continue
                out.append((image, caption))
        return out
