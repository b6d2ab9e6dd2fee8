"""Checkpoints of every training loop: Stages I-II (``trainer.py``), Stage III (``rl/grpo.py``), and the atomic
JSON files of latent extraction (``latents.py``). The file names of a run folder are defined here, once.

A checkpoint is a folder ``<run>/checkpoints/<kind>_<N>`` (``step_0000042`` in Stages I-II, the optimizer
steps done; ``epoch_000007`` in Stage III, the last epoch done) holding::

    trainable.safetensors      the trained tensors, whole (gathered when sharded)
    ema.safetensors            their EMA, when the loop keeps one
    optimizer.pt / deepspeed/  the optimizer state (``distributed.save_optimizer``)
    rng_<rank>.pt              every process's RNG state
    state.json                 where the loop stands: step or epoch, data position, schedule, LDAM, ...
    manifest.json              the size and sha256 of every other file; written last

It is written atomically (:func:`atomic_checkpoint`: into ``.tmp_<name>``, renamed when every process is done;
the newest ``keep_last`` of its kind are kept). ``resume`` takes the newest checkpoint whose files match its
manifest (:func:`resume_checkpoint`): a damaged one (a truncated or altered file, a disk error) is named with
the file and what is wrong, and the one before is tried; with none intact the error names the newest one's
damaged file. Checkpoints written before manifests existed are resumed unverified, saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import CheckpointError, ConfigError
from ..utils.files import read_json, save_safetensors
from ..utils.run_files import CHECKPOINT_DIR, TRAIN_LOG, launcher_rank
from .distributed import like, save_optimizer, whole_tensors

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
RAW_FILE = (
    "raw_trainable.safetensors"  # Stages I-II with an EMA: the last raw weights beside the model folder
)
NAME_DIGITS = {"step": 7, "epoch": 6}  # step_0000042, epoch_000007: names sort in the order they were written


class SingleProcess:
    """What the functions here use of an ``accelerate.Accelerator``, for a loop that runs in one process without
    one (the shapes world's Stage-0 fits)."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    def print(self, *args) -> None:
        print(*args)


def rng_file(rank: int) -> str:
    """The file of process ``rank``'s RNG state in a checkpoint."""
    return f"rng_{rank}.pt"


def checkpoint_name(kind: str, number: int) -> str:
    """``step_0000042`` / ``epoch_000007``: the folder name of checkpoint ``number`` of ``kind``."""
    return f"{kind}_{number:0{NAME_DIGITS[kind]}d}"


def write_json_atomic(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename: a reader sees all or nothing."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's global RNG states (torch, CUDA if present, Python, NumPy), loadable weights-only."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------- manifest
def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Write ``folder/manifest.json``: the size and sha256 of every file below ``folder`` (subfolders too)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": entries}, indent=1))


def unverified_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint written before manifests, as far as its files show without hashes: its
    ``state.json`` must parse, each safetensors file open (its header fits the file) and each ``.pt`` file be a
    whole zip archive (a truncated one has lost its directory at the end)."""
    try:
        state = json.loads((folder / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return f"{folder / STATE_FILE} is missing"
    except ValueError:
        state = None
    if not isinstance(state, dict):
        return f"{folder / STATE_FILE} is not a checkpoint state (not a JSON object)"
    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".pt":
                zipfile.ZipFile(path).close()
        except Exception as err:  # safetensors and zipfile raise their own types for a truncated file
            return f"{path} cannot be read (truncated or damaged: {err})"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the checkpoint ``folder`` (naming the file), or None when it is intact.

    Every file of its manifest must exist with the recorded size and sha256. A checkpoint without a manifest
    (written before they existed) counts as intact when it has its ``state.json``.
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return unverified_problem(folder)
    try:
        entries = json.loads(manifest.read_bytes())["files"]
    except json.JSONDecodeError as err:
        return f"{manifest} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    except (UnicodeDecodeError, KeyError, TypeError):
        return f"{manifest} is not a checkpoint manifest (no 'files' entry, or not text)"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return f"{path} has {size} bytes where {entry['bytes']} were written (truncated or overwritten)"
        if file_sha256(path) != entry["sha256"]:
            return f"{path} does not match the sha256 written with it (its contents were altered)"
    return None


def intact_checkpoint(folder: Path, kind: str, say: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of ``kind`` in the run folder ``folder`` that is intact, or None if there is none.

    Each damaged checkpoint passed over is reported through ``say``, with its file and what is wrong. Raises
    CheckpointError (naming the newest one's damaged file) when there are checkpoints but none is intact.
    """
    found = sorted((folder / CHECKPOINT_DIR).glob(f"{kind}_*"), reverse=True)
    problems = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if not (ckpt / MANIFEST_FILE).is_file():
                say(
                    f"note: {ckpt} has no {MANIFEST_FILE} (written before checkpoints were verified); not verified"
                )
            if problems:
                say(f"resuming from {ckpt}, the newest intact checkpoint")
            return ckpt
        problems.append(problem)
        say(f"checkpoint {ckpt.name} is damaged: {problem}; trying the one before")
    if problems:
        raise CheckpointError(
            f"no intact checkpoint to resume in {folder / CHECKPOINT_DIR} ({len(problems)} damaged; newest: "
            f"{problems[0]}); start the run again without resuming (parauni: --overwrite)"
        )
    return None


def resume_checkpoint(folder: Path, kind: str, acc) -> Path | None:
    """:func:`intact_checkpoint` checked by the main process alone (the files are read once, not once per
    process) and its answer shared with every process; every process must call it."""
    answer: list = [None]
    if acc.is_main_process:
        try:
            ckpt = intact_checkpoint(folder, kind, acc.print)
            answer = [("found", ckpt.name if ckpt is not None else None)]
        except CheckpointError as err:
            answer = [("error", str(err))]
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(answer)
    status, value = answer[0]
    if status == "error":
        raise CheckpointError(value)
    return folder / CHECKPOINT_DIR / value if value is not None else None


# ------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_checkpoint(root: Path, name: str, acc, keep_last: int) -> Iterator[Path]:
    """Write the checkpoint ``root/name`` from every process, atomically, keeping the newest ``keep_last``.

    Every process writes into ``root/.tmp_<name>``; when all are done the main process writes the manifest,
    renames the folder to ``root/<name>`` (a reader, or ``resume`` after a crash, sees a complete checkpoint or
    none) and removes all but the newest ``keep_last`` of the same kind (``step_*`` / ``epoch_*``). The
    processes must share the file system of ``root``.
    """
    tmp, final = root / f".tmp_{name}", root / name
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    yield tmp
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kind = name.rsplit("_", 1)[0]
        for old in sorted(root.glob(f"{kind}_*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def remove_partial_checkpoints(root: Path) -> None:
    """Delete the temporary folders of checkpoints a killed run did not finish writing."""
    for tmp in root.glob(".tmp_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(
    folder: Path,
    kind: str,
    acc,
    wrapped,
    optimizer,
    trained: dict[str, torch.Tensor],
    state: dict,
    keep_last: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder/checkpoints/<kind>_<state[kind]>`` atomically; every process must call it.

    Args:
        trained: the trained tensors by name (after ``prepare``: DTensor shards under FSDP, gathered here).
        state: the loop's position, written as ``state.json``; ``state[kind]`` numbers the checkpoint.
        ema: the EMA of ``trained`` (same names), or None.
    """
    name = checkpoint_name(kind, state[kind])
    with atomic_checkpoint(folder / CHECKPOINT_DIR, name, acc, keep_last) as tmp:
        torch.save(rng_state(), tmp / rng_file(acc.process_index))
        tensors = whole_tensors(acc, trained)
        averaged = whole_tensors(acc, ema) if ema is not None else None
        save_optimizer(acc, wrapped, optimizer, tmp)
        if acc.is_main_process:
            save_safetensors(tensors, tmp / TRAINABLE_FILE)
            if averaged is not None:
                save_safetensors(averaged, tmp / EMA_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(state))
    return folder / CHECKPOINT_DIR / name


# ------------------------------------------------------------------------------------------- reading
def load_trained(path: Path, named: dict[str, torch.Tensor], hint: str) -> None:
    """Copy a checkpoint's trained tensors into ``named`` (before ``prepare``), strictly over what trains now.

    ``hint`` says what may have changed when the names differ (e.g. "was rl.trainable changed?").
    """
    state = load_file(str(path / TRAINABLE_FILE))
    missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match what trains now ({hint}): missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(state[name])


def load_checkpoint(path: Path, named: dict[str, torch.Tensor], rank: int, hint: str) -> dict:
    """Restore trained tensors and this process's RNG state (before ``prepare``); returns ``state.json``.

    The optimizer state is restored after ``prepare`` (:func:`distributed.load_optimizer`). A checkpoint written
    by a run with fewer processes has no RNG state for ``rank``; that process then keeps its own (every draw of
    the loops is seeded by the data position or the epoch, so only draws outside them are affected).
    """
    state = read_json(path / STATE_FILE, "checkpoint state")
    load_trained(path, named, hint)
    if (rng := path / rng_file(rank)).is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return state


def init_ema(
    named: dict[str, torch.Tensor], ckpt: Path | None, decay: float
) -> dict[str, torch.Tensor] | None:
    """The EMA of the trained tensors, in the order of ``named`` (None when ``decay`` is 0): from ``ckpt``'s
    ``ema.safetensors`` when resuming, else a copy of the current weights. After ``prepare``: each value is
    placed like its parameter (sharded the same way under FSDP)."""
    if decay == 0:
        return None
    ema = {n: p.detach().clone() for n, p in named.items()}
    if ckpt is not None:
        if not (ckpt / EMA_FILE).is_file():
            raise CheckpointError(f"{ckpt} has no {EMA_FILE}: it was written without an EMA (ema=0)")
        saved = load_file(str(ckpt / EMA_FILE))
        with torch.no_grad():
            for name, value in ema.items():
                value.copy_(like(value, saved[name]))
    return ema


def resume_step(folder: str | Path) -> int:
    """The step ``--resume`` continues from: that of the newest complete checkpoint in ``folder``, else a
    ConfigError saying what to do."""
    ckpt = intact_checkpoint(Path(folder), "step", say=lambda _: None)  # train says which one it takes
    if ckpt is None:
        raise ConfigError(
            f"--resume: {folder} holds no checkpoint to continue from (they are written every train.save_every "
            "steps); run without --resume (and with --overwrite to replace what the folder holds)"
        )
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def trim_train_log(folder: str | Path, start: int) -> None:
    """Drop the log rows of steps >= ``start`` (a killed run logged them after its last checkpoint), so a
    resumed run's log holds every step once. The launcher's first process writes the log, so only it trims."""
    log = Path(folder) / TRAIN_LOG
    if log.is_file() and launcher_rank() == 0:
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < start]
        log.write_text("".join(line + "\n" for line in kept))
