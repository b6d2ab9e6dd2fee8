"""Stage 0 of the shapes world: the pretrained models the paper took from others, trained here.

* a tokenizer trained on the world's words (byte-level BPE, with the InternVL chat special tokens);
* a small VLM of the InternVL architecture (``InternVLForConditionalGeneration``) pretrained on captioning the
  world's images and on its captions as text, so that its layers carry meaning;
* a small DC-AE, and a small SANA DiT pretrained for text-to-image with its own Gemma-2-architecture text
  encoder;
* the world's reward models (a CLIP and an aesthetic MLP).

:func:`pretrain` trains them into a folder, model by model ("phases"), resumable after a kill at any point;
``parauni world pretrain`` runs it with the long recipe (:data:`RECIPE`) whose result ships with the package
(:mod:`parauni.world.release`); ``parauni demo --stage0 scratch`` runs it with the world config's quick defaults,
cached under a key of the config.

The models, each built beside its training, are in :mod:`parauni.world.stage0_models` (and the reward models
in :mod:`parauni.world.reward_models`); this module is the recipe's phases and the resumable folder that
holds them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from ..config import LIMConfig, ModelConfig, SamplingConfig, from_dict
from ..errors import MissingFileError, ParaUniError
from ..training.checkpoint import RAW_FILE
from ..training.run import RunOptions, run_stage
from ..utils.device import default_device
from ..utils.run_files import CHECKPOINT_DIR, TRAIN_LOG
from .config import STREAM_OFFSETS, WorldConfig, stage0_base, world_config
from .reward_models import save_world_reward_models, train_world_aesthetic, train_world_clip, world_clip
from .stage0_models import (  # noqa: F401 (re-exported: the models of Stage 0 were defined here)
    CAPTION_INSTRUCTION,
    WorldSource,
    _split_rows,
    _vlm_batch,
    caption_accuracy,
    train_text_encoder,
    train_world_autoencoder,
    train_world_vlm,
    vlm_loss,
    world_autoencoder,
    world_t2i,
    world_tokenizer,
    world_vlm,
)

STAGE0_VERSION = 3  # bump when the code that trains Stage 0 changes its results (docs/world.md lists them)
DONE_FILE = "stage0.json"
CONFIG_FILE = "world.json"
METRICS_DIR = "metrics"
WORK_DIR = ".work"
# Phases of Stage 0 in the order they run; t2i needs the autoencoder, rewards nothing but the tokenizer.
PHASES: tuple[str, ...] = ("vlm", "ae", "t2i", "rewards")
# The long recipe of the shipped Stage 0 (`parauni world pretrain`): overrides of the world config's quick
# defaults, chosen by the measurements in docs/world.md.
RECIPE: tuple[str, ...] = (
    "vlm.train.steps=1500",
    "vlm.train.warmup=50",
    "vlm.restate=true",
    "ae.train.steps=800",
    "t2i.text_train.steps=300",
    "t2i.train.steps=6000",
    "t2i.train.warmup=100",
    "t2i.train.ema=0.999",
    "reward.train.steps=1500",
    "reward.train.warmup=50",
    "reward.aesthetic_train.steps=300",
)


class Stage0Error(ParaUniError, ValueError):
    """A Stage-0 folder that cannot be used as asked (another config, a missing model)."""


# ----------------------------------------------------------------------------------------------- Stage 0
def stage0_config(cfg: WorldConfig) -> dict:
    """The part of the world config that determines Stage 0 (what ``world.json`` of a Stage-0 folder holds)."""
    keep = ("image_size", "seed", "vlm", "ae", "t2i", "reward")
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k in keep}
    for bookkeeping in ("save_every", "keep_last", "log_every"):  # they change no weight
        del data["t2i"]["train"][bookkeeping]
    return data


def stage0_key(cfg: WorldConfig) -> str:
    """Cache key of the Stage-0 artefacts: everything that changes them."""
    data = {"version": STAGE0_VERSION, **stage0_config(cfg)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _claim_folder(folder: Path, cfg: WorldConfig) -> None:
    """Write ``world.json`` into a new Stage-0 folder, or check that an existing one was begun with the same
    Stage-0 config (a resumed run must not mix two recipes)."""
    wanted = {"version": STAGE0_VERSION, **stage0_config(cfg)}
    path = folder / CONFIG_FILE
    if path.is_file():
        found = json.loads(
            path.read_text()
        )  # an earlier folder's flat keys are nested, today's fixed values added
        found = {"version": found.get("version"), **stage0_config(world_config(base=stage0_base(found)))}
        if found != wanted:
            diff = [
                k
                for k in sorted(set(_flat(found)) | set(_flat(wanted)))
                if _flat(found).get(k) != _flat(wanted).get(k)
            ]
            raise Stage0Error(
                f"{folder} holds a Stage 0 begun with another world config (differs in {diff[:6]}): give another "
                "--out, or the same --world overrides to resume it"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def phase_metrics(folder: str | Path, phase: str) -> dict | None:
    """The metrics a finished phase wrote (``metrics/<phase>.json``), or None while it has not finished."""
    path = Path(folder) / METRICS_DIR / f"{phase}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish_phase(folder: Path, phase: str, metrics: dict, curves: dict[str, list]) -> dict:
    """Write the phase's loss curves (``<name>_log.jsonl``) and its metrics file, which marks it done."""
    for name, curve in curves.items():
        (folder / f"{name}_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (folder / METRICS_DIR).mkdir(exist_ok=True)
    tmp = folder / METRICS_DIR / f".{phase}.json"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.rename(folder / METRICS_DIR / f"{phase}.json")
    return metrics


def _phase_vlm(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vlm = world_vlm(cfg, tokenizer).to(default_device())
    log(
        f"stage 0: VLM with {sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters, {cfg.vlm.layers} decoder layers"
    )
    m = train_world_vlm(vlm, tokenizer, cfg, progress, folder / WORK_DIR / "vlm")
    vlm.cpu().save_pretrained(folder / "vlm")
    tokenizer.save_pretrained(folder / "vlm")
    log(
        f"stage 0: VLM held-out caption token accuracy {m['heldout_caption_accuracy']:.3f} (mixed rows "
        f"{m['heldout_token_accuracy']:.3f}; {m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "vlm", m, {"vlm": m.pop("curve")})


def _phase_ae(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vae = world_autoencoder(cfg).to(default_device())
    m = train_world_autoencoder(vae, cfg, progress, folder / WORK_DIR / "ae")
    vae.cpu().save_pretrained(folder / "t2i" / "vae")
    log(
        f"stage 0: autoencoder f{vae.spatial_compression_ratio}c{cfg.ae.latent_channels}, held-out PSNR "
        f"{m['heldout_psnr']:.1f} dB ({m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "ae", m, {"ae": m.pop("curve")})


def _phase_t2i(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vae = None
    if cfg.ae.enabled:
        from diffusers import AutoencoderDC

        if phase_metrics(folder, "ae") is None:
            raise Stage0Error(
                f"the text-to-image phase needs the autoencoder of {folder}: train phase 'ae' first"
            )
        vae = AutoencoderDC.from_pretrained(folder / "t2i" / "vae")
    t2i = world_t2i(cfg, tokenizer, vae).to(default_device())
    log(
        f"stage 0: text-to-image DiT {sum(p.numel() for p in t2i.dit.parameters()) / 1e6:.2f}M + text encoder "
        f"{sum(p.numel() for p in t2i.text_encoder.parameters()) / 1e6:.2f}M parameters"
    )
    text = train_text_encoder(t2i, cfg, progress, folder / WORK_DIR / "text_encoder")
    source = WorldSource(cfg.seed + STREAM_OFFSETS["t2i"], cfg.image_size)
    t0 = time.time()
    result = run_stage(
        t2i, source, cfg.t2i.train, folder / "t2i", RunOptions(resume=True, progress=progress)
    ).result
    log_rows = [json.loads(line) for line in (folder / "t2i" / TRAIN_LOG).read_text().splitlines()]
    m = {
        "final_loss": result.final_loss,
        "text_encoder_final_loss": text["final_loss"],
        "seconds": text["seconds"] + (log_rows[-1]["seconds"] if log_rows else time.time() - t0),
    }
    log(f"stage 0: text-to-image final loss {result.final_loss:.4f} ({m['seconds']:.0f} s)")
    return _finish_phase(folder, "t2i", m, {"text_encoder": text["curve"]})


def _phase_rewards(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    clip = world_clip(cfg, tokenizer).to(default_device())
    clip_metrics = train_world_clip(clip, tokenizer, cfg, progress, folder / WORK_DIR / "clip")
    mlp, aesthetic = train_world_aesthetic(clip, cfg, progress, folder / WORK_DIR / "aesthetic")
    save_world_reward_models(folder, clip.cpu(), tokenizer, mlp.cpu(), cfg)
    curve = clip_metrics.pop("curve")
    aesthetic.pop("curve")
    m = {**clip_metrics, "aesthetic": aesthetic, "seconds": clip_metrics["seconds"] + aesthetic["seconds"]}
    log(
        f"stage 0: world CLIP held-out retrieval top-1 {m['heldout_retrieval_top1']:.3f}, hard-negative "
        f"accuracy {m['heldout_hard_negative_accuracy']:.3f}; aesthetic ranking accuracy "
        f"{aesthetic['heldout_ranking_accuracy']:.3f} ({m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "rewards", m, {"clip": curve})


_PHASE_FNS = {"vlm": _phase_vlm, "ae": _phase_ae, "t2i": _phase_t2i, "rewards": _phase_rewards}


def pretrain(
    cfg: WorldConfig,
    folder: str | Path,
    phases: tuple[str, ...] | list[str] = PHASES,
    progress: bool = True,
    log=print,
) -> dict[str, dict]:
    """Train the Stage-0 models of ``phases`` into ``folder``, resuming whatever a killed run left there.

    A phase that finished (``metrics/<phase>.json``) is skipped; one that was interrupted continues from its
    last checkpoint (``.work/`` for the small models, ``t2i/checkpoints`` for the DiT) to the same weights as an
    uninterrupted run. Two processes may train different phases into the same folder at once (the DiT needs
    the autoencoder's phase done first). Returns the metrics of every finished phase.
    """
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise Stage0Error(f"unknown Stage-0 phases {unknown}; choose from {list(PHASES)}")
    folder = Path(folder)
    _claim_folder(folder, cfg)
    tokenizer = world_tokenizer(cfg)
    for phase in PHASES:
        if phase not in phases or (phase == "ae" and not cfg.ae.enabled):
            continue
        if phase_metrics(folder, phase) is not None:
            log(f"stage 0: {phase} already trained in {folder}")
            continue
        _PHASE_FNS[phase](cfg, folder, tokenizer, progress, log)
    return {p: m for p in PHASES if (m := phase_metrics(folder, p)) is not None}


def clean_work(folder: str | Path) -> None:
    """Remove what only resuming needs (checkpoints, the DiT's last raw weights) from a finished folder."""
    folder = Path(folder)
    shutil.rmtree(folder / WORK_DIR, ignore_errors=True)
    shutil.rmtree(folder / "t2i" / CHECKPOINT_DIR, ignore_errors=True)
    (folder / "t2i" / RAW_FILE).unlink(missing_ok=True)


def run_stage0(cfg: WorldConfig, cache_dir: str | Path, progress: bool = True, log=print) -> Path:
    """Train (or reuse from the cache) the world's Stage-0 models with ``cfg`` as it is (the quick from-scratch
    path of ``parauni demo --stage0 scratch``).

    Returns the folder: ``vlm/`` (InternVL + tokenizer), ``t2i/`` (text encoder + DiT + autoencoder),
    ``clip/`` + ``aesthetic.safetensors`` (the world's reward models) and ``stage0.json`` (timings and metrics),
    which is written last and marks the folder complete.
    """
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if (folder / DONE_FILE).is_file():
        log(f"stage 0: reusing the cached world models in {folder}")
        return folder
    metrics = pretrain(cfg, folder, PHASES, progress, log)
    write_stage0_summary(folder, metrics)
    clean_work(folder)
    return folder


def write_stage0_summary(folder: Path, metrics: dict[str, dict], extra: dict | None = None) -> None:
    """``stage0.json``: seconds and metrics per model (the demo reads it); written last, it marks the folder
    complete."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    summary = {
        "timings": {f"stage0_{p}": m.get("seconds", 0.0) for p, m in metrics.items()},
        "metrics": {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in metrics.items()},
        "key": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12],
        "config": config,
        **(extra or {}),
    }
    (folder / DONE_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def stage0_folder(cfg: WorldConfig, cache_dir: str | Path) -> Path:
    """The complete Stage-0 folder of ``cfg`` in ``cache_dir``; a clear error when Stage 0 has not run."""
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if not (folder / DONE_FILE).is_file():
        raise MissingFileError(
            f"no complete Stage-0 world models in {folder}: run `parauni demo` first (same --world overrides "
            "and cache), which trains and caches them"
        )
    return folder


def stage_source(cfg: WorldConfig, stage: int, offset: int = 0) -> WorldSource:
    """The example stream of ParaUni's Stage ``stage`` (1 or 2) on the world, ``offset`` streams along (the seeds
    of ``parauni reproduce``), with the twins of ``world.parauni.twins``."""
    return WorldSource(cfg.seed + STREAM_OFFSETS[f"stage{stage}"] + offset, cfg.image_size, cfg.parauni.twins)


def world_model_config(cfg: WorldConfig, stage0: Path) -> ModelConfig:
    """The ParaUni model of the world: the Stage-0 VLM and DiT, pixel space, fresh queries + LIM."""
    return from_dict(
        ModelConfig,
        {
            "name": "world",
            "seed": cfg.seed,
            "vlm": {
                "kind": "internvl",
                "path": str(Path(stage0, "vlm").resolve()),
                "dtype": "float32",
                "max_length": 96,
            },
            "lim": _fields_of(LIMConfig, cfg.parauni),
            "dit": {
                "path": str(Path(stage0, "t2i", "transformer").resolve()),
                "subfolder": None,
                "dtype": "float32",
            },
            "vae": (
                {"kind": "dcae", "path": str(Path(stage0, "t2i", "vae").resolve()), "dtype": "float32"}
                if cfg.ae.enabled
                else {"kind": "none", "path": None}
            ),
            "sampling": _fields_of(SamplingConfig, cfg.eval),
        },
    )


def _fields_of(cls: type, section) -> dict:
    """The fields of the library config ``cls`` that the world config's ``section`` extends, as a dict."""
    return {f.name: copy.deepcopy(getattr(section, f.name)) for f in dataclasses.fields(cls)}
