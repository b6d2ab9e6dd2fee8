"""The frozen parts a model folder refers to outside itself, pinned by sha256 (docs/run-folders.md).

A model folder's ``config.yaml`` names each frozen component (VLM, DiT, VAE) by Hugging Face id, or by a path
relative to the folder; for every such path that lies outside the folder, ``components.json`` records the
sha256 of each of its files when the folder was written. Loading checks them first (:func:`check_references`):
a moved, deleted or retrained component is answered with one line naming the file, before any model is built.
:func:`copy_in` makes a folder self-contained instead (``parauni train --self-contained``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

from ..errors import CheckpointError
from ..utils.run_files import COMPONENTS_FILE, CONFIG_FILE
from .components import ComponentLoadError

PARTS = ("vlm", "dit", "vae")
COPY_NAMES = {"vlm": "vlm", "dit": "transformer", "vae": "vae"}  # where copy_in puts each part


@lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The sha256 of a file, memoised by its size and modification time (a run hashes each part once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of the file ``path``."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def folder_hashes(folder: Path) -> dict[str, str]:
    """``{relative name: sha256}`` of every file below ``folder`` (hidden files and caches left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def part_folder(part, root: Path) -> Path | None:
    """The local folder a component config points at (its ``subfolder`` included), or None (a Hub id, or
    built from an arch dict)."""
    if not part.path:
        return None
    path = Path(part.path) if Path(part.path).is_absolute() else root / part.path
    if not path.exists():
        return None
    return path / part.subfolder if getattr(part, "subfolder", None) else path


def outside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies outside ``folder``."""
    return not Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def record_references(config, folder: Path) -> None:
    """Write ``folder/components.json``: the sha256 of every file of each frozen part of ``config`` (paths
    already relative to ``folder``) that lies outside it; no file when every part is inside or on the Hub."""
    references = {}
    for name in PARTS:
        part = getattr(config, name)
        where = part_folder(part, folder)
        if where is not None and outside(where, folder):
            references[name] = {"path": part.path, "subfolder": getattr(part, "subfolder", None)}
            references[name]["files"] = folder_hashes(where)
    target = folder / COMPONENTS_FILE
    if references:
        target.write_text(json.dumps(references, indent=1))
    else:
        target.unlink(missing_ok=True)


def check_references(folder: Path) -> None:
    """Check the parts ``folder/components.json`` pins: each file must exist with its recorded sha256.

    Raises CheckpointError naming the first missing or changed file and the fix.
    """
    record = folder / COMPONENTS_FILE
    if not record.is_file():
        return
    try:
        references = json.loads(record.read_text())
        entries = [
            (name, ref["path"], ref.get("subfolder"), ref["files"]) for name, ref in references.items()
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{record} is damaged ({err}); retrain the model folder or restore the file"
        ) from err
    for name, path, subfolder, files in entries:
        where = folder / path / (subfolder or "")
        fix = (
            f"restore it, or retrain {folder} (parauni train --self-contained copies its frozen parts in so that "
            "it stands alone)"
        )
        for rel, sha in files.items():
            target = where / rel
            if not target.is_file():
                raise CheckpointError(
                    f"{folder} needs its {name} at {path} (relative to it): {target} is missing; {fix}"
                )
            if file_sha256(target) != sha:
                raise CheckpointError(
                    f"{folder} needs its {name} at {path} (relative to it) as it was trained with: {target} has "
                    f"changed since (sha256 {file_sha256(target)[:12]}, recorded {sha[:12]}); {fix}"
                )


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _means_local(path: str) -> bool:
    """Whether a component path in a model folder's config names a folder (never a Hub id): the names
    ``save_pretrained`` copies parts to, a relative path (``./``, ``../``) or an absolute one."""
    return path in COPY_NAMES.values() or path.startswith((".", "/", "~")) or path.count("/") > 1


def check_parts(folder: Path, config) -> None:
    """Every frozen part the model folder's ``config`` keeps on disk must be there with its ``config.json`` and
    a weights file, checked before anything is built (a missing config would make Hugging Face build the
    default, full-size architecture); raises ComponentLoadError naming the missing folder or file."""
    for name in PARTS:
        part = getattr(config, name)
        if not part.path or not _means_local(part.path) or getattr(part, "kind", None) == "none":
            continue
        where = Path(part.path).expanduser()
        where = where if where.is_absolute() else folder / where
        where = where / part.subfolder if getattr(part, "subfolder", None) else where
        if not where.is_dir():
            raise ComponentLoadError(
                f"{folder} is incomplete: its {name} folder {where} does not exist (config.yaml: {name}.path="
                f"{part.path}); restore it, or copy the model folder again whole"
            )
        if not (where / "config.json").is_file():
            raise ComponentLoadError(
                f"{folder} is incomplete: {where / 'config.json'} (the {name}'s config) is missing"
            )
        if not any(p.suffix in WEIGHT_SUFFIXES for p in where.iterdir()):
            raise ComponentLoadError(
                f"{folder} is incomplete: {where} holds no weights file (*.safetensors) of the {name}"
            )


def copy_in(folder: Path) -> list[str]:
    """Copy every frozen part ``folder/config.yaml`` refers to outside the folder into it (``vlm/``,
    ``transformer/``, ``vae/``) and point the config there; returns the parts copied."""
    from ..config import ModelConfig, from_dict, load_yaml, save_yaml

    config = from_dict(ModelConfig, load_yaml(folder / CONFIG_FILE))
    copied = []
    for name in PARTS:
        part = getattr(config, name)
        where = part_folder(part, folder)
        if where is None or not outside(where, folder):
            continue
        shutil.copytree(where, folder / COPY_NAMES[name], dirs_exist_ok=True)
        part.path = COPY_NAMES[name]
        if hasattr(part, "subfolder"):
            part.subfolder = None
        copied.append(name)
    save_yaml(config, folder / CONFIG_FILE)
    record_references(config, folder)
    return copied
