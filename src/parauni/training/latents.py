"""Pre-extracted VAE latents: ``parauni extract-latents`` writes them, training reads them (encoded source).

OpenUni precomputes the VAE latents of its large datasets; so does this (docs/real-models.md). Layout of
an extraction folder::

    plan.json                      what is extracted: source, sample count, shard size, image size, encoder
    shard-000000.safetensors       {"latents": (n, C, h, w)} in the chosen dtype; written last (= complete)
    shard-000000.json              {"captions": [n texts], "skipped": {sample: reason}}
    manifest.json                  plan + samples per shard + latent shape (written when all shards exist)

Output shard j holds the source's samples ``j * shard_size .. (j + 1) * shard_size - 1`` in its
unshuffled order, corrupt ones left out, so the result does not depend on the number of processes. Under
``accelerate launch`` process r of n extracts shards r, r + n, ...; a rerun with the same options skips
the shards already written (resume), and a rerun with other options is refused. Every file is written
atomically (``checkpoint.write_json_atomic``, ``utils.files.save_safetensors``, with the umask's permissions),
so a killed run leaves whole files or none.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..errors import DataError
from ..models.components import load_vae
from ..utils.files import read_json, save_safetensors
from .checkpoint import write_json_atomic
from .streaming import SHARDS_PER_GROUP, CorruptSample, ShardedSource

FORMAT = "parauni-latents"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPEN_SHARDS = 8

Encoder = Callable[[torch.Tensor], torch.Tensor]


def vae_encoder(
    config: ModelConfig, root: str | Path | None, device: torch.device | str = "cpu"
) -> tuple[Encoder, str]:
    """``pixels (B, 3, S, S) in [-1, 1] -> latents (B, C, S/f, S/f)`` of a model's VAE, loaded alone, and its
    :func:`encoder_key`.

    The same map as :meth:`ParaUni.encode_images` (``vae.encode(x).latent * scaling_factor``); a VAE built
    from an arch dict gets the seed :meth:`ParaUni.from_config` gives it (``config.seed + 2``).
    """
    vae = load_vae(config.vae, root, seed=config.seed + 2)
    if vae is None:
        raise DataError(
            "this model has no VAE (vae.kind=none): it trains on pixels, so there are no latents to extract; "
            "train on the images directly"
        )
    vae.to(device)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels.to(device, vae.dtype)).latent * vae.config.scaling_factor

    return encode, encoder_key(vae)


def encoder_key(vae: torch.nn.Module | None) -> str:
    """What determines the DiT inputs of an image: ``pixels`` without a VAE, else the VAE's class, its config,
    and a sha256 of its weights (names, dtypes and bytes), so another VAE of the same config never reuses
    latents. Caches of prepared data and extracted latents are keyed by it."""
    if vae is None:
        return "pixels"
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return f"{type(vae).__name__}:{h.hexdigest()[:16]}"


def shard_name(j: int) -> str:
    return f"shard-{j:06d}"


def make_plan(source: ShardedSource, image_size: int, encoder_key: str, shard_size: int, dtype: str) -> dict:
    """What an extraction of ``source`` writes; two runs resume each other only if their plans are equal."""
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size} must be >= 1")
    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype} must be one of {list(DTYPES)}")
    total = len(source)
    return {
        "format": FORMAT,
        "version": 1,
        "source": source.name,
        "source_samples": total,
        "source_shards": hashlib.sha256(json.dumps(source.sizes).encode()).hexdigest()[:16],
        "image_size": image_size,
        "encoder": encoder_key,
        "dtype": dtype,
        "shard_size": shard_size,
        "num_shards": math.ceil(total / shard_size),
    }


def _check_plan(out: Path, plan: dict) -> None:
    """Write the plan, or check that an existing extraction in ``out`` has the same one."""
    path = out / PLAN_FILE
    if path.is_file():
        old = read_json(path, "latents plan")
        diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
        if diff:
            raise DataError(
                f"{out} holds an extraction with other options {diff} (old, new); use another --out, or "
                "delete the folder to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)


@dataclass
class ExtractResult:
    """What one process did: shards written now, shards found already done, corrupt samples skipped."""

    written: int
    reused: int
    skipped: int


@dataclass
class ExtractOptions:
    """How :func:`extract_latents` encodes: what the plan records, and this process's share."""

    image_size: int  # the side the source's pixels are resized to
    encoder_key: (
        str  # identifies the encoder (:func:`encoder_key` of its VAE), checked on resume and by training
    )
    shard_size: int = 1024  # samples per output shard
    batch_size: int = 32  # images per encoder call
    dtype: str = "float32"  # the stored latents' dtype
    rank: int = (
        0  # this process's index among num_processes (it writes shards rank, rank + num_processes, ...)
    )
    num_processes: int = 1
    progress: bool = True  # a progress bar


def extract_latents(
    source: ShardedSource,
    encode: Encoder,
    out: str | Path,
    options: ExtractOptions | None = None,
    **fields,
) -> ExtractResult:
    """Encode this process's output shards (j = rank, rank + num_processes, ...) of ``source`` into ``out``.

    Args:
        source: a pixel source (tar shards, a Hugging Face dataset, image files) read in its unshuffled order.
        encode: pixels (B, 3, S, S) -> latents (B, C, h, w), e.g. :func:`vae_encoder`.
        options: an :class:`ExtractOptions`, or its fields as keywords (``image_size=..., encoder_key=...``).
    Call :func:`finish_extraction` once every process is done.
    """
    if options is not None and fields:
        raise TypeError(
            f"extract_latents takes options or their fields as keywords, not both ({sorted(fields)})"
        )
    o = options or ExtractOptions(**fields)
    rank, num_processes, shard_size, batch_size, dtype = (
        o.rank,
        o.num_processes,
        o.shard_size,
        o.batch_size,
        o.dtype,
    )
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} must be in [0, {num_processes})")
    out = Path(out)
    plan = make_plan(source, o.image_size, o.encoder_key, shard_size, dtype)
    _check_plan(out, plan)
    mine = range(rank, plan["num_shards"], num_processes)
    written = reused = skipped = 0
    for j in tqdm(mine, desc=f"extracting latents (process {rank})", disable=not o.progress):
        final = out / f"{shard_name(j)}.safetensors"
        if final.is_file():
            reused += 1
            continue
        start, stop = j * shard_size, min(len(source), (j + 1) * shard_size)
        latents, captions, bad = [], [], {}
        for lo in range(start, stop, batch_size):
            pixels = []
            for sample in source.canonical(lo, min(stop, lo + batch_size)):
                if isinstance(sample, CorruptSample):
                    source.record_corrupt(sample)
                    bad[sample.sample] = sample.reason
                    continue
                pixels.append(sample[0])
                captions.append(sample[1])
            if pixels:
                latents.append(encode(torch.stack(pixels)).to("cpu", DTYPES[dtype]))
        write_json_atomic(out / f"{shard_name(j)}.json", {"captions": captions, "skipped": bad})
        tensor = torch.cat(latents) if latents else torch.zeros(0, dtype=DTYPES[dtype])
        save_safetensors({"latents": tensor.contiguous()}, final)  # atomic: the shard exists whole or not
        written, skipped = written + 1, skipped + len(bad)
    return ExtractResult(written, reused, skipped)


def finish_extraction(out: str | Path) -> dict:
    """Write ``manifest.json`` once every planned shard exists; returns it. Run on one process, at the end."""
    out = Path(out)
    if not (out / PLAN_FILE).is_file():
        raise DataError(f"{out} has no {PLAN_FILE}; it is not a latents folder of parauni extract-latents")
    plan = read_json(out / PLAN_FILE, "latents plan")
    missing = [j for j in range(plan["num_shards"]) if not (out / f"{shard_name(j)}.safetensors").is_file()]
    if missing:
        raise DataError(
            f"{out}: {len(missing)} of {plan['num_shards']} latent shards are missing (e.g. "
            f"{shard_name(missing[0])}); run parauni extract-latents again with the same options to finish"
        )
    sizes, skipped, shape = [], {}, None
    for j in range(plan["num_shards"]):
        meta = read_json(out / f"{shard_name(j)}.json", "latent shard captions")
        with safe_open(str(out / f"{shard_name(j)}.safetensors"), "pt") as f:
            rows = f.get_slice("latents").get_shape()
        if len(meta["captions"]) != (rows[0] if len(rows) > 1 else 0):
            raise DataError(
                f"{out / shard_name(j)}: captions and latents differ in number; delete both and rerun"
            )
        sizes.append(len(meta["captions"]))
        skipped.update(meta["skipped"])
        shape = shape or (rows[1:] if len(rows) > 1 else None)
    if not sum(sizes):
        raise DataError(
            f"no sample of {plan['source']} could be read: all {plan['source_samples']} are corrupt"
        )
    manifest = {**plan, "sizes": sizes, "latent_shape": list(shape), "skipped": skipped}
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest


def is_latents_folder(path: Path) -> bool:
    return path.is_dir() and (path / PLAN_FILE).is_file()


class LatentShardSource(ShardedSource):
    """Latents written by ``parauni extract-latents``, read shard by shard (encoded: no VAE at training time).

    ``latent_shape`` (C, h, w), ``image_size`` and ``encoder`` come from the manifest, so a training run can
    check they fit its model; ``skipped`` holds the samples the extraction left out as corrupt.
    """

    def __init__(self, root: str | Path, shards_per_group: int = SHARDS_PER_GROUP) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST_FILE).is_file():
            finish_extraction(self.root)  # raises, naming the missing shards, if the extraction is incomplete
        manifest = read_json(self.root / MANIFEST_FILE, "latents manifest")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{self.root / MANIFEST_FILE} is not a {FORMAT} manifest")
        super().__init__(manifest["sizes"], str(root), encoded=True, shards_per_group=shards_per_group)
        self.skipped.update(manifest["skipped"])
        self.image_size = int(manifest["image_size"])
        self.latent_shape = tuple(manifest["latent_shape"])
        self.encoder = manifest["encoder"]
        self._open: OrderedDict[int, tuple[object, list[str]]] = OrderedDict()

    def _shard(self, j: int):
        if j not in self._open:
            handle = safe_open(str(self.root / f"{shard_name(j)}.safetensors"), "pt")
            captions = read_json(self.root / f"{shard_name(j)}.json", "latent shard captions")["captions"]
            self._open[j] = (handle, captions)
            while len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[j]

    def read(self, shard: int, positions: list[int]) -> list[tuple[torch.Tensor, str] | CorruptSample]:
        handle, captions = self._shard(shard)
        rows = handle.get_slice("latents")
        return [(rows[p : p + 1][0].float(), captions[p]) for p in positions]


def check_latents_fit(
    source: LatentShardSource, latent_shape: tuple[int, int, int], image_size: int, encoder_key: str
) -> None:
    """Refuse latents that do not fit the model (shape or image size); warn when another VAE made them."""
    if source.image_size != image_size or tuple(source.latent_shape) != tuple(latent_shape):
        raise DataError(
            f"the latents in {source.root} are {list(source.latent_shape)} from {source.image_size} px "
            f"images, but this model at {image_size} px needs {list(latent_shape)}: train at --image-size "
            f"{source.image_size}, or extract again with this model's VAE"
        )
    if source.encoder != encoder_key:
        warnings.warn(
            f"the latents in {source.root} were extracted with the VAE {source.encoder!r}, this model's is "
            f"{encoder_key!r}; they must be the same VAE",
            stacklevel=2,
        )
