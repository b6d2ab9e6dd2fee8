"""Sharded training sources: data too big to hold in memory, read shard by shard in a seeded order.

A sharded source knows only how many samples each shard holds (``sizes``) and how to read samples of one
shard; nothing per sample is kept in memory beyond the shards being read. :class:`ShardOrder` maps a
global example index (the trainer's ``step * batch + offset``) to a sample, so the data position is a
pure function of the step and ``--resume`` continues exactly:

    epoch e = i // N:  shards permuted by a generator seeded with (seed, e), cut into groups of
                       ``shards_per_group`` consecutive shards;
    inside a group:    its samples permuted by a generator seeded with (seed, e, group).

A corrupt sample (unreadable image, missing caption) is replaced by the next sample of its group's order,
so an index still maps to one sample deterministically; each corrupt sample is counted once in
``skipped`` and warned about. Concrete sources: webdataset tar shards (:mod:`.tar_shards`), Hugging Face
datasets (:mod:`.hf_datasets`), pre-extracted latent shards (:mod:`.latents`), and :class:`RecordsSource`
(the image files of a folder, for ``parauni extract-latents``).
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..utils.images import pil_to_tensor, resize_center_crop
from .data import Record

# Shards a trainer reads at once (their samples are shuffled together). Small groups keep reads sequential.
SHARDS_PER_GROUP = 4
WARN_FIRST = 5  # corrupt samples warned about one by one; after that, one warning per WARN_EVERY
WARN_EVERY = 100
GROUP_CACHE = 4  # shard-group orders kept in memory


class CorruptSample(DataError):
    """A sample that cannot be used (unreadable image, missing caption): ``sample`` names it, ``reason``
    says why."""

    def __init__(self, sample: str, reason: str) -> None:
        super().__init__(f"{sample}: {reason}")
        self.sample = sample
        self.reason = reason


def decode_image(data: bytes, name: str, image_size: int) -> torch.Tensor:
    """Encoded image bytes -> (3, S, S) in [-1, 1], resized and centre-cropped; CorruptSample if
    unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = img.convert("RGB")
    except UnidentifiedImageError as err:
        raise CorruptSample(name, "image cannot be read (not an image format PIL knows)") from err
    except Image.DecompressionBombError as err:  # a few KB that would decode to gigabytes
        raise CorruptSample(name, f"image too large to read safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged data of a known format
        raise CorruptSample(name, f"image cannot be read ({err})") from err
    return pil_to_tensor(resize_center_crop(rgb, image_size, image_size))


def check_caption(caption: object, name: str) -> str:
    """A usable caption (stripped) or CorruptSample naming the sample."""
    if not isinstance(caption, str) or not caption.strip():
        raise CorruptSample(name, "missing or empty caption")
    return caption.strip()


class ShardOrder:
    """The seeded, resumable order of a sharded source (see the module docstring).

    Args:
        sizes: samples per shard (S,).
        seed: the training seed.
        shards_per_group: shards whose samples are shuffled together (1 = shuffle inside each shard only).
    """

    def __init__(self, sizes: Sequence[int], seed: int, shards_per_group: int = SHARDS_PER_GROUP) -> None:
        if shards_per_group < 1:
            raise DataError(f"shards_per_group={shards_per_group} must be >= 1")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        if self.total == 0:
            raise DataError("the data holds no samples")
        self.seed = seed
        self.per_group = shards_per_group
        self._epoch: tuple[int, list[np.ndarray], np.ndarray] | None = None
        self._groups: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch_groups(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Shard ids of each group of ``epoch`` and the first global offset of each group (G + 1,)."""
        if self._epoch is None or self._epoch[0] != epoch:
            shards = np.random.default_rng([self.seed, epoch]).permutation(len(self.sizes))
            groups = [shards[k : k + self.per_group] for k in range(0, len(shards), self.per_group)]
            starts = np.concatenate([[0], np.cumsum([self.sizes[g].sum() for g in groups])])
            self._epoch = (epoch, groups, starts)
        return self._epoch[1], self._epoch[2]

    def group(self, epoch: int, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard ids, first sample of each shard within the group, permutation of the group's samples)."""
        key = (epoch, g)
        if key not in self._groups:
            shards = self._epoch_groups(epoch)[0][g]
            offsets = np.concatenate([[0], np.cumsum(self.sizes[shards])])
            perm = np.random.default_rng([self.seed, epoch, 1, g]).permutation(int(offsets[-1]))
            self._groups[key] = (shards, offsets, perm)
            while len(self._groups) > GROUP_CACHE:
                self._groups.popitem(last=False)
        return self._groups[key]

    def locate(self, index: int) -> tuple[int, int, int]:
        """(epoch, group, position in the group's order) of global example ``index`` (>= 0)."""
        if index < 0:
            raise DataError(f"example index {index} must be >= 0")
        epoch, r = divmod(int(index), self.total)
        starts = self._epoch_groups(epoch)[1]
        g = int(np.searchsorted(starts, r, side="right")) - 1
        return epoch, g, r - int(starts[g])

    def member(self, epoch: int, g: int, p: int) -> tuple[int, int]:
        """(shard, sample within the shard) at position ``p`` of group ``g``'s order in ``epoch``."""
        shards, offsets, perm = self.group(epoch, g)
        j = int(perm[p % len(perm)])
        k = int(np.searchsorted(offsets, j, side="right")) - 1
        return int(shards[k]), j - int(offsets[k])

    def group_size(self, epoch: int, g: int) -> int:
        return len(self.group(epoch, g)[2])


class ShardedSource:
    """Base of the sharded sources: the index -> sample mapping, corrupt-sample skipping and counting.

    Args:
        sizes: samples per shard.
        name: what the source is (for messages), e.g. its path.
        encoded: inputs are already in the DiT's space (latents) rather than pixels.
        shards_per_group: shards whose samples are shuffled together.

    Subclasses implement :meth:`read` for the samples of one shard. ``skipped`` maps each corrupt sample
    found so far to its reason.
    """

    def __init__(
        self, sizes: Sequence[int], name: str, encoded: bool, shards_per_group: int = SHARDS_PER_GROUP
    ) -> None:
        self.sizes = [int(n) for n in sizes]
        self.name = name
        self.encoded = encoded
        self.shards_per_group = shards_per_group
        self.skipped: dict[str, str] = {}
        self._order_cache: ShardOrder | None = None

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, shard: int, positions: list[int]) -> list[tuple[torch.Tensor, str] | CorruptSample]:
        """Samples ``positions`` of ``shard``: (input tensor, caption), or the CorruptSample of a bad one."""
        raise NotImplementedError

    def record_corrupt(self, err: CorruptSample) -> None:
        if err.sample in self.skipped:
            return
        self.skipped[err.sample] = err.reason
        n = len(self.skipped)
        if n <= WARN_FIRST or n % WARN_EVERY == 0:
            warnings.warn(f"skipped corrupt sample {err}; {n} skipped so far in {self.name}", stacklevel=3)

    def _order(self, seed: int) -> ShardOrder:
        if self._order_cache is None or self._order_cache.seed != seed:
            self._order_cache = ShardOrder(self.sizes, seed, self.shards_per_group)
        return self._order_cache

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        """Inputs (n, ...) and captions of global example indices, in the seeded order of :class:`ShardOrder`.

        Inputs are pixels (n, 3, S, S) in [-1, 1], or latents (n, C, h, w) when ``encoded``.
        """
        order = self._order(seed)
        where = [order.locate(i) for i in indices]
        out: list[tuple[torch.Tensor, str] | None] = [None] * len(indices)
        tries = [0] * len(indices)
        while pending := [k for k, o in enumerate(out) if o is None]:
            wanted: dict[int, list[tuple[int, int]]] = {}  # shard -> [(slot, position)]
            for k in pending:
                epoch, g, p = where[k]
                if tries[k] >= order.group_size(epoch, g):
                    examples = dict(list(self.skipped.items())[:3])
                    raise DataError(
                        f"every sample of a group of {order.per_group} shard(s) of {self.name} is corrupt "
                        f"({len(self.skipped)} corrupt so far, e.g. {examples}); check or remove those shards"
                    )
                shard, pos = order.member(epoch, g, p + tries[k])
                wanted.setdefault(shard, []).append((k, pos))
            for shard, slots in wanted.items():
                for (k, _), sample in zip(slots, self.read(shard, [pos for _, pos in slots]), strict=True):
                    if isinstance(sample, CorruptSample):
                        self.record_corrupt(sample)
                        tries[k] += 1
                    else:
                        out[k] = sample
        return torch.stack([o[0] for o in out]), [o[1] for o in out]

    def canonical(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, str] | CorruptSample]:
        """Samples ``start <= c < stop`` of the unshuffled order (shard by shard), corrupt ones included."""
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        for shard in range(len(self.sizes)):
            lo, hi = max(start, int(offsets[shard])), min(stop, int(offsets[shard + 1]))
            if lo < hi:
                yield from self.read(shard, list(range(lo - int(offsets[shard]), hi - int(offsets[shard]))))


class RecordsSource(ShardedSource):
    """Image files with captions (the records of a data folder) as one shard, read from disk on demand."""

    def __init__(self, records: list[Record], image_size: int, name: str = "data") -> None:
        super().__init__([len(records)], name, encoded=False, shards_per_group=1)
        self.records = records
        self.image_size = image_size

    def read(self, shard: int, positions: list[int]) -> list[tuple[torch.Tensor, str] | CorruptSample]:
        out: list[tuple[torch.Tensor, str] | CorruptSample] = []
        for p in positions:
            record = self.records[p]
            try:
                data = Path(record.image).read_bytes()
                out.append((decode_image(data, str(record.image), self.image_size), record.caption))
            except OSError as err:
                out.append(CorruptSample(str(record.image), f"cannot be read ({err})"))
            except CorruptSample as err:
                out.append(err)
        return out
