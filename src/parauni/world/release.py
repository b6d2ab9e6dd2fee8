"""The world's Stage 0 as a release: a folder of trained models with a model card and a hash manifest.

``parauni world pretrain --out DIR`` trains one with the long recipe (:data:`pretrain.RECIPE`) and finishes it
here (:func:`finalize_release`): every model measured, a ``README.md`` model card (recipe, command, commit,
steps, wall time, device, metrics, sha256 of every file) and ``manifest.json``. The package ships one in
``parauni/world/pretrained/``, which ``parauni demo`` uses by default; :func:`resolve_stage0` also takes any
local folder or a Hugging Face Hub id, as ``from_pretrained`` does, and checks the hashes before use.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from ..analysis.prompt_use import DEFAULT_PROMPTS, prompt_sensitivity
from ..config import ConfigError
from ..errors import ParaUniError
from ..models.parauni import ParaUni
from ..training.checkpoint import RAW_FILE
from ..utils.device import default_device
from .captions import make_eval_metadata
from .config import WorldConfig, default_cache_dir, stage0_base, world_config
from .pretrain import (
    CONFIG_FILE,
    DONE_FILE,
    PHASES,
    RECIPE,
    Stage0Error,
    clean_work,
    phase_metrics,
    pretrain,
    run_stage0,
    stage0_folder,
    world_model_config,
    write_stage0_summary,
)
from .shapeseval import run_shapeseval
from .t2i import TextToImage, t2igen

RELEASE_DIR = Path(__file__).parent / "pretrained"
MANIFEST = "manifest.json"
CARD = "README.md"
MAX_FILE_BYTES = 20 * 1024 * 1024
# files a release does not hash: the manifest itself and the card that lists the hashes
UNHASHED = (MANIFEST, CARD)


class ReleaseError(ParaUniError, ValueError):
    """A Stage-0 release that is missing, incomplete or altered."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file of ``folder`` but the manifest and the card."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in UNHASHED)
    return {str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}


def verify_release(folder: str | Path) -> dict:
    """Check every file of a release against its ``manifest.json``; returns the manifest.

    Raises:
        ReleaseError: no manifest, or a file missing, extra or with another hash (naming it).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ReleaseError(
            f"{folder} is not a Stage-0 release (no {MANIFEST}): give a folder written by `parauni world "
            "pretrain`, or --stage0 scratch to train one here"
        )
    try:
        manifest = json.loads(path.read_text())
        expected = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReleaseError(
            f"{path} is not a Stage-0 release manifest (not JSON, or no 'files' with a sha256 each: {err!r}); "
            "reinstall or re-download the release"
        ) from err
    found = file_table(folder)
    for name, entry in expected.items():
        if name not in found:
            raise ReleaseError(
                f"{folder / name} is missing from the Stage-0 release: reinstall or re-download it"
            )
        if found[name]["sha256"] != entry:
            raise ReleaseError(
                f"{folder / name} does not match its sha256 in {path} (expected {entry[:12]}..., got "
                f"{found[name]['sha256'][:12]}...): the file is corrupt or was changed; reinstall or re-download it"
            )
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ReleaseError(f"{folder} holds files its {MANIFEST} does not list: {extra[:5]}; remove them")
    return manifest


def resolve_stage0(spec: str | Path) -> Path:
    """The folder of a Stage-0 release: "release" (the one shipped in the package), a local folder, or a
    Hugging Face Hub id (downloaded to the Hub cache); the hashes are checked either way."""
    if str(spec) == "release":
        if not (RELEASE_DIR / MANIFEST).is_file():
            raise ReleaseError(
                f"this installation has no shipped Stage-0 release in {RELEASE_DIR}: reinstall parauni, or run "
                "`parauni demo --stage0 scratch`"
            )
        folder = RELEASE_DIR
    elif Path(spec).exists():
        folder = Path(spec)
        if not folder.is_dir():
            raise ReleaseError(f"--stage0 {spec} is a file; give the folder of a Stage-0 release")
    elif "/" in str(spec) and not str(spec).startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(spec)))
        except Exception as e:  # offline, unknown repo, no access: one line with the cause
            raise ReleaseError(f"could not fetch the Stage-0 release {spec!r} from the Hub: {e}") from e
    else:
        raise ReleaseError(
            f"--stage0 {spec}: no such folder; give 'release', 'scratch', a folder written by `parauni world "
            "pretrain`, or a Hugging Face Hub id (owner/name)"
        )
    verify_release(folder)
    return folder


def release_config(folder: Path) -> dict:
    """The Stage-0 part of the world config a release was trained with (its ``world.json``)."""
    return stage0_base(json.loads((folder / CONFIG_FILE).read_text()))


STAGE0_SECTIONS = ("image_size", "seed", "vlm", "ae", "t2i", "reward")


def world_stage0(
    stage0: str | Path = "release",
    overrides: list[str] | None = None,
    quick: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    log=print,
) -> tuple[WorldConfig, Path]:
    """The world config and Stage-0 folder that the demo, ``parauni reproduce`` and ``--world`` commands use.

    ``stage0``: "release" (shipped), a release folder or Hub id: its models, with the world config they were
    trained with (``world.json``) under ``overrides`` of the later stages; "scratch": quick models trained here
    from the world config with ``overrides`` and cached in ``cache_dir``. ``quick`` shortens the stages
    (and, from scratch, Stage 0 itself).
    """
    if str(stage0) == "scratch":
        cfg = world_config(overrides, quick)
        return cfg, run_stage0(cfg, Path(cache_dir) if cache_dir else default_cache_dir(), progress, log)
    folder = resolve_stage0(stage0)
    fixed = [
        o
        for o in overrides or []
        if o.lstrip("-").removeprefix("world.").split(".")[0].split("=")[0] in STAGE0_SECTIONS
    ]
    if fixed:
        raise ConfigError(
            f"{fixed} change Stage-0 models, which come trained from {folder}: use --stage0 scratch to train "
            "them here, or `parauni world pretrain` for a release of your own"
        )
    base = release_config(folder)
    if quick:  # the quick stages, on the release's Stage-0 models
        stages = dataclasses.asdict(world_config(overrides, quick=True))
        base = {k: v for k, v in stages.items() if k not in STAGE0_SECTIONS} | base
        base["parauni"] = stages["parauni"] | base.get("parauni", {})
        overrides = []
    cfg = world_config(overrides, base=base)
    log(f"stage 0: the world's pretrained models from {folder}")
    return cfg, folder


def existing_stage0(
    stage0: str | Path = "release", cache_dir: str | Path | None = None, overrides: list[str] | None = None
) -> tuple[WorldConfig, Path]:
    """The world config (with ``overrides``, ``key=value``) and Stage-0 folder of a demo that has run
    (``--world`` commands): the release's, or with "scratch" the one cached in ``cache_dir`` (an error naming
    the fix if it was never trained)."""
    if str(stage0) == "scratch":
        cfg = world_config(overrides)
        return cfg, stage0_folder(cfg, Path(cache_dir) if cache_dir else default_cache_dir())
    folder = resolve_stage0(stage0)
    return world_config(overrides, base=release_config(folder)), folder


# ----------------------------------------------------------------------------------------------- training one
def run_pretrain(
    out: str | Path,
    overrides: list[str] | None = None,
    phases: list[str] | None = None,
    recipe: bool = True,
    progress: bool = True,
    log=print,
) -> dict | None:
    """``parauni world pretrain``: train the Stage-0 models of ``phases`` (default all) into ``out`` with the
    long recipe plus ``overrides`` (``section.key=value``), resuming what is there; once every phase has
    finished, measure them and write the release files. Returns the summary, or None while phases are missing."""
    out = Path(out)
    cfg = world_config([*(RECIPE if recipe else ()), *(overrides or [])])
    if (out / MANIFEST).is_file():
        log(f"stage 0: {out} is a finished release; verifying it")
        verify_release(out)
        return json.loads((out / DONE_FILE).read_text())
    pretrain(cfg, out, phases or PHASES, progress, log)
    missing = [p for p in PHASES if phase_metrics(out, p) is None and not (p == "ae" and not cfg.ae.enabled)]
    if missing:
        log(
            f"stage 0: phases {missing} still to train in {out}; the release is written once they have finished"
        )
        return None
    command = " ".join(
        [
            "parauni world pretrain",
            f"--out {out.name}",
            *(["--no-recipe"] if not recipe else []),
            *(f"--world.{o}" for o in overrides or []),
        ]
    )
    return finalize_release(cfg, out, command, progress, log)


# ----------------------------------------------------------------------------------------------- finishing
def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def evaluate_stage0(cfg: WorldConfig, folder: Path, progress: bool = True, log=print) -> dict:
    """ShapesEval of the DiT with its own text encoder (the EMA weights, and the last raw ones when the run
    kept them: the better is kept in ``t2i/``), and the prompt use of the VLM's query positions (relative spread
    of the query states across prompts per layer, fresh queries)."""
    rows = make_eval_metadata(cfg.eval.per_tag, seed=cfg.seed)
    e = cfg.eval

    def shapeseval(model: TextToImage, name: str) -> dict:
        t0 = time.time()
        r = run_shapeseval(
            t2igen(model, cfg),
            rows,
            e.images_per_prompt,
            e.batch_size,
            cfg.seed,
            progress=progress,
            desc=f"ShapesEval {name}",
        )
        log(
            f"ShapesEval Stage-0 DiT ({name}): overall {r['overall']:.3f} "
            + " ".join(f"{k} {v:.2f}" for k, v in r["tags"].items())
            + f" ({time.time() - t0:.0f} s)"
        )
        return {"overall": r["overall"], "tags": r["tags"]}

    t2i = TextToImage.from_pretrained(folder / "t2i").eval().to(default_device())
    ema = cfg.t2i.train.ema > 0
    scores = {"ema" if ema else "final": shapeseval(t2i, "EMA" if ema else "final")}
    raw = folder / "t2i" / RAW_FILE
    if raw.is_file():
        from safetensors.torch import load_file

        ema_state = {k: v.clone() for k, v in t2i.state_dict().items()}
        t2i.load_state_dict(load_file(str(raw), device=str(t2i.device)), strict=False)
        scores["raw"] = shapeseval(t2i, "raw weights")
        if scores["raw"]["overall"] > scores["ema"]["overall"]:
            log("stage 0: the raw weights score higher than the EMA; the release keeps the raw ones")
            t2i.cpu().save_pretrained(folder / "t2i")
        else:
            t2i.load_state_dict(ema_state)
    kept = max(scores, key=lambda k: scores[k]["overall"])
    model = ParaUni.from_config(world_model_config(cfg, folder))
    use = prompt_sensitivity(model, DEFAULT_PROMPTS)
    log(
        "stage 0: VLM query states across prompts, per layer: "
        + " ".join(f"{s:.3f}" for s in use["query_states"])
    )
    return {"shapeseval": scores, "shapeseval_kept": kept, "prompt_use": use}


def finalize_release(
    cfg: WorldConfig, folder: str | Path, command: str, progress: bool = True, log=print
) -> dict:
    """Measure a fully trained Stage-0 folder, drop what only resuming needed, and write ``stage0.json``, the
    model card and the manifest. Returns the summary."""
    folder = Path(folder)
    metrics = {p: phase_metrics(folder, p) for p in PHASES if not (p == "ae" and not cfg.ae.enabled)}
    missing = [p for p, m in metrics.items() if m is None]
    if missing:
        raise Stage0Error(f"{folder}: phases {missing} have not finished; run them first")
    evaluation = evaluate_stage0(cfg, folder, progress, log)
    clean_work(folder)
    info = {
        "command": command,
        "commit": _commit(),
        "device": _device(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
    }
    write_stage0_summary(folder, metrics, {"evaluation": evaluation, "release": info})
    write_card(folder, cfg, metrics, evaluation, info)
    manifest = {"files": file_table(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    too_big = [
        f"{n} ({e['bytes'] / 2**20:.1f} MB)"
        for n, e in manifest["files"].items()
        if e["bytes"] > MAX_FILE_BYTES
    ]
    total = sum(e["bytes"] for e in manifest["files"].values())
    log(f"stage 0: release {folder}: {len(manifest['files'])} files, {total / 2**20:.1f} MB")
    if too_big:
        log(f"stage 0: warning: files over {MAX_FILE_BYTES // 2**20} MB cannot ship in git: {too_big}")
    return json.loads((folder / DONE_FILE).read_text())


def write_card(folder: Path, cfg: WorldConfig, metrics: dict, evaluation: dict, info: dict) -> None:
    """The model card ``README.md``: what the models are, how they were trained, what they score, file hashes."""
    seconds = {p: m.get("seconds", 0.0) for p, m in metrics.items()}
    se = evaluation["shapeseval"][evaluation["shapeseval_kept"]]
    q = evaluation["prompt_use"]["query_states"]
    lines = [
        "# ParaUni shapes world: Stage-0 models",
        "",
        "The pretrained models the shapes world stands in for (InternVL3, SANA + DC-AE with its Gemma text encoder, "
        "CLIP, the aesthetic predictor), trained once by the project's own recipe and shipped with the package. "
        "`parauni demo` uses them by default; `parauni demo --stage0 scratch` trains quick ones instead.",
        "",
        "## How they were trained",
        "",
        f"* command: `{info['command']}`",
        f"* recipe (overrides of the world config's defaults): `{' '.join(RECIPE)}`",
        f"* commit {info['commit']}, {info['date']}, torch {info['torch']}, on {info['device']}",
        f"* steps: VLM {cfg.vlm.train.steps}, autoencoder {cfg.ae.train.steps}, text encoder "
        f"{cfg.t2i.text_train.steps}, DiT {cfg.t2i.train.steps} (batch {cfg.t2i.train.batch_size}, EMA "
        f"{cfg.t2i.train.ema}), CLIP {cfg.reward.train.steps}, aesthetic {cfg.reward.aesthetic_train.steps}",
        "* wall time per model (s): "
        + ", ".join(f"{p} {s:.0f}" for p, s in seconds.items())
        + f"; total {sum(seconds.values()):.0f}",
        "* the full config: `world.json`; the loss curves: `*_log.jsonl`, `t2i/train_log.jsonl`",
        "",
        "## What they score",
        "",
        f"* VLM: held-out caption token accuracy {metrics['vlm']['heldout_caption_accuracy']:.3f}; query states' "
        "relative spread across prompts per layer (fresh queries): " + " ".join(f"{s:.3f}" for s in q),
    ]
    if "ae" in metrics and metrics["ae"]:
        lines.append(f"* autoencoder: held-out PSNR {metrics['ae']['heldout_psnr']:.1f} dB")
    lines += [
        f"* DiT with its own text encoder, ShapesEval ({cfg.eval.per_tag * 6} prompts x {cfg.eval.images_per_prompt} "
        f"images, {cfg.eval.sampler} {cfg.eval.steps} steps, CFG {cfg.eval.cfg}; weights kept: "
        f"{evaluation['shapeseval_kept']}): overall {se['overall']:.3f}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in se["tags"].items()),
    ]
    for name, s in evaluation["shapeseval"].items():
        if name != evaluation["shapeseval_kept"]:
            lines.append(f"  (the {name} weights: overall {s['overall']:.3f})")
    r = metrics["rewards"]
    lines += [
        f"* world CLIP: held-out retrieval top-1 {r['heldout_retrieval_top1']:.3f}, hard-negative accuracy "
        f"{r['heldout_hard_negative_accuracy']:.3f}; aesthetic MLP ranking accuracy "
        f"{r['aesthetic']['heldout_ranking_accuracy']:.3f}",
        "",
        "## Files (sha256)",
        "",
        "`manifest.json` lists the same hashes; `parauni.world.release.verify_release` checks them on every load.",
        "",
        "| file | bytes | sha256 |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {e['bytes']} | {e['sha256']} |" for n, e in file_table(folder).items()]
    (folder / CARD).write_text("\n".join(lines) + "\n")
