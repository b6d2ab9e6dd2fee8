"""What a run folder promises (docs/run-folders.md).

``--resume`` continues the same run, or refuses: every checkpoint's ``state.json`` records the run's
fingerprint (:func:`run_fingerprint`: the model config, the training settings that shape the weights, the
optimizer state or the data stream, and the data's size and captions), and a resume whose fingerprint differs
is refused naming each changed field with its old and new value (:func:`check_same_run`). Only the settings
in :data:`RESUMABLE_CHANGES` may change. A finished run records its final step in ``run.json``; a resume that
would end before it (and so replace the final model with an earlier one) is refused (:func:`check_resume_steps`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
from pathlib import Path

from ..config import to_dict
from ..errors import ConfigError
from ..models.references import PARTS, folder_hashes, outside, part_folder
from ..utils.files import read_json
from ..utils.run_files import CONFIG_FILE, MODEL_CARD, RUN_RECORD, WEIGHTS_FILE
from .checkpoint import STATE_FILE

# TrainConfig fields a resume may change: the length of the run and the learning-rate schedule (the schedule
# is a function of the step; a changed one is printed), how often it logs and saves, and how a step is computed
# (the same global batch in micro-steps, recomputed activations).
RESUMABLE_CHANGES = (
    "steps",
    "lr",
    "warmup",
    "min_lr_ratio",
    "log_every",
    "save_every",
    "keep_last",
    "grad_accum",
    "activation_checkpointing",
)
# ModelConfig keys that do not change the trained model (sampling is the default of generation only).
MODEL_KEYS_IGNORED = ("sampling", "name")
MAX_NAMED = 4  # changed fields named in the message


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"lim": {"num_queries": 8}}`` -> ``{"lim.num_queries": 8}`` (lists stay values)."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def data_fingerprint(source) -> dict[str, object]:
    """The size of the training data and a hash of its captions, where the source knows them (sources without a
    length, such as the tests' generated latents, give an empty dict: nothing to compare)."""
    found: dict[str, object] = {}
    if hasattr(source, "__len__"):
        found["data.pairs"] = len(source)
    captions = getattr(source, "captions", None)
    if isinstance(captions, list):
        found["data.captions_sha256"] = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    return found


def _part_hashes(config) -> dict[str, object]:
    """Each frozen part on disk by the sha256 of its files instead of its path (the same weights moved
    elsewhere are the same run; other weights at the same path are not)."""
    found: dict[str, object] = {}
    for name in PARTS:
        part = getattr(config, name, None)
        where = part_folder(part, Path.cwd()) if part is not None else None
        if where is not None:
            listing = json.dumps(folder_hashes(where), sort_keys=True)
            found[f"{name}.path"] = "sha256:" + hashlib.sha256(listing.encode()).hexdigest()[:16]
    return found


def run_fingerprint(model, cfg, source) -> dict[str, object]:
    """What must stay the same for a resume to continue this run: ``train.*`` fields but those of
    :data:`RESUMABLE_CHANGES`, the model config's keys (as ``--section.key``) but sampling, and the data."""
    found: dict[str, object] = {}
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        data = {k: v for k, v in to_dict(config).items() if k not in MODEL_KEYS_IGNORED}
        found.update(_flatten(data))
        found.update(_part_hashes(config))
    train = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    found.update(_flatten(train, "train."))
    found.update(data_fingerprint(source))
    return json.loads(json.dumps(found))  # as state.json holds it (tuples as lists)


def _shown(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


_UNSET = object()


def _value(fingerprint: dict, key: str) -> str:
    return _shown(fingerprint[key]) if key in fingerprint else "(unset)"


def check_same_run(saved: dict | None, now: dict[str, object], folder: Path, say=print) -> None:
    """Refuse to resume the run in ``folder`` (ConfigError) when ``now`` differs from the fingerprint ``saved``
    in its checkpoint, naming each changed field with its old and new value; a checkpoint written before
    fingerprints existed (``saved`` None) is resumed unchecked, saying so."""
    if saved is None:
        say(
            f"note: the checkpoint in {folder} records no settings (written before resumes checked them); not checked"
        )
        return
    changed = [
        f"{key} was {_value(saved, key)}, now {_value(now, key)}"
        for key in sorted(set(saved) | set(now))
        if saved.get(key, _UNSET) != now.get(key, _UNSET)
    ]
    if changed:
        more = f" and {len(changed) - MAX_NAMED} more" if len(changed) > MAX_NAMED else ""
        raise ConfigError(
            f"--resume: {folder} was trained with other settings ({'; '.join(changed[:MAX_NAMED])}{more}); "
            "resume with the run's own settings, or start a new run with --overwrite or another --out "
            f"(a resume may change train.{{{','.join(RESUMABLE_CHANGES)}}} only)"
        )


def finished_step(folder: Path) -> int | None:
    """The step at which the run in ``folder`` finished and wrote its model, or None (not finished)."""
    record = Path(folder) / RUN_RECORD
    if not record.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        return None
    try:
        return int(json.loads(record.read_text())["steps"])
    except (ValueError, KeyError, TypeError):
        return None  # a damaged record: the checkpoints alone decide


def check_resume_steps(folder: Path, start: int, steps: int) -> None:
    """Refuse a resume that cannot continue: its checkpoint is at or past ``train.steps``, or the run already
    finished at a step >= ``train.steps`` (its final model would be replaced by an earlier one)."""
    done = finished_step(folder)
    if done is not None and steps <= done:
        raise ConfigError(
            f"--resume: the run in {folder} finished at step {done} and wrote its model; train.steps={steps} "
            f"would replace it with the step-{steps} weights. Give train.steps > {done} to train on, or start a new "
            "run with --overwrite or another --out"
        )
    if start >= steps:
        raise ConfigError(
            f"--resume: the newest checkpoint in {folder} is at step {start}, not before train.steps={steps}; "
            f"give train.steps > {start} to train on, or start a new run with --overwrite or another --out"
        )


def write_run_record(folder: Path, record: dict) -> None:
    """``folder/run.json``: what the finished run was (stage, steps, final loss, data, command), and the model
    card made from it (:func:`write_model_card`)."""
    tmp = Path(folder) / f".{RUN_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(Path(folder) / RUN_RECORD)
    write_model_card(folder)


def _part_rows(folder: Path) -> list[str]:
    """The model card's rows of the frozen parts ``folder/config.yaml`` names: each file with its sha256."""
    from ..config import ModelConfig, from_dict, load_yaml

    if not (folder / CONFIG_FILE).is_file():
        return []
    config = from_dict(ModelConfig, load_yaml(folder / CONFIG_FILE))
    rows = []
    for name in PARTS:
        part = getattr(config, name)
        where = part_folder(part, folder)
        if where is None:
            source = f"Hugging Face `{part.path}`" if part.path else "built from the config's arch (seeded)"
            rows.append(f"| {name} | {source} | | |")
            continue
        place = (
            "in this folder"
            if not outside(where, folder)
            else "outside this folder, pinned in components.json"
        )
        for rel, sha in folder_hashes(where).items():
            rows.append(f"| {name} | `{part.path}` ({place}) | {rel} | {sha} |")
    return rows


def write_model_card(folder: Path) -> None:
    """``folder/README.md``: the model card of a trained folder (stage, steps, final loss, data, the command
    that made it, and the base models with the sha256 of their files), from ``run.json``."""
    folder = Path(folder)
    record = json.loads((folder / RUN_RECORD).read_text())
    settings = record.get("settings", {})
    data = record.get("data") or (
        f"{settings.get('data.pairs', '?')} image-caption pairs (captions sha256 "
        f"{settings.get('data.captions_sha256', '?')})"
    )
    results = [f"| final loss | {record['final_loss']:.4f} |"] if "final_loss" in record else []
    results += [f"| final reward {k} | {v:.4f} |" for k, v in record.get("final_rewards", {}).items()]
    lines = [
        f"# ParaUni Stage {record['stage']} model",
        "",
        f"Made by `{record['command']}`; load it with `parauni generate --model <this folder>`.",
        "",
        "| | |",
        "|---|---|",
        f"| stage | {record['stage']} |",
        f"| {record.get('unit', 'steps')} | {record['steps']} |",
        *results,
        f"| data | {data} |",
        "",
        "## Base models",
        "",
        "| part | source | file | sha256 |",
        "|---|---|---|---|",
        *_part_rows(folder),
        "",
        "Every training setting is in run.json (`settings`) and train_config.yaml.",
    ]
    (folder / MODEL_CARD).write_text("\n".join(lines) + "\n")


def check_resume(ckpt: Path, fingerprint: dict[str, object], steps: int, folder: Path, say=print) -> None:
    """Before a resume restores anything: the checkpoint ``ckpt`` must be of the same run
    (:func:`check_same_run`) and before ``steps`` (:func:`check_resume_steps`)."""
    state = read_json(ckpt / STATE_FILE, "checkpoint state")
    check_same_run(state.get("run"), fingerprint, folder, say)
    check_resume_steps(folder, int(state["step"]), steps)


def command_line() -> str:
    """The command that runs now, as a shell line (``parauni ...`` for the command line; no absolute path of
    this machine for the program)."""
    program = Path(sys.argv[0])
    name = "parauni" if "parauni" in program.parts or program.name == "parauni" else program.name
    return shlex.join([name, *sys.argv[1:]])
