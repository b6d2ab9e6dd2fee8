"""Resume from a damaged checkpoint (issue 19, item 3) and weights readable as the umask says (item 6).

Each file of a Stage I and a Stage III checkpoint is damaged in turn (truncated, altered in place, broken JSON,
deleted): ``resume`` names the file and what is wrong, falls back to the checkpoint before, and ends with the
weights of the uninterrupted run; with no intact checkpoint the error is one line naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from test_rl import _bright, _rl_config
from test_training import _tiny_run, _write_images

from parauni.cli import main
from parauni.models.parauni import CheckpointError, ParaUni
from parauni.rl.config import PhaseConfig
from parauni.rl.grpo import train_rl
from parauni.rl.prompts import PromptSource
from parauni.training.checkpoint import MANIFEST_FILE, RAW_FILE, checkpoint_problem, intact_checkpoint
from parauni.utils.run_files import CHECKPOINT_DIR

# (file, how it is damaged, what the message says)
DAMAGES = [
    ("trainable.safetensors", "truncate", "bytes where"),
    ("optimizer.pt", "alter", "does not match the sha256"),
    ("rng_0.pt", "truncate", "bytes where"),
    ("state.json", "broken_json", "bytes where"),
    ("ema.safetensors", "delete", "is missing"),
    (MANIFEST_FILE, "broken_json", "manifest.json is not valid JSON"),
]
IDS = [f"{name}-{how}" for name, how, _ in DAMAGES]
UMASK = 0o027  # group may read, others nothing: neither safetensors' 0600 nor the usual 0644


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "alter":  # same size, one byte changed: only the hash can tell
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    elif how == "broken_json":
        path.write_text('{"step": 4, "examples_se')
    else:
        path.unlink()


def _modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()
    }


def _tiny():
    return ParaUni.from_config(tiny_config())


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory) -> Path:
    """A Stage-II run (DiT and EMA saved) of 6 steps under UMASK, checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("stage_run")
    old = os.umask(UMASK)
    try:
        _tiny_run(_tiny, root, stage=2, steps=6, out="full", save_every=2, ema=0.5)
    finally:
        os.umask(old)
    return root


def test_checkpoints_and_weights_are_readable_as_the_umask_says(stage_run):
    modes = _modes(stage_run / "full")
    for name in (RAW_FILE, "model.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert name in modes
    assert f"{CHECKPOINT_DIR}/step_0000004/trainable.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o640)  # 0666 & ~0o027, not safetensors' 0600


def test_a_manifest_lists_every_file_of_the_checkpoint(stage_run):
    ckpt = stage_run / "full" / CHECKPOINT_DIR / "step_0000004"
    entries = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert set(entries) == {p.name for p in ckpt.iterdir()} - {MANIFEST_FILE}
    assert all(entries[n]["bytes"] == (ckpt / n).stat().st_size for n in entries)
    assert checkpoint_problem(ckpt) is None


@pytest.mark.parametrize(("name", "how", "says"), DAMAGES, ids=IDS)
def test_a_damaged_stage_checkpoint_falls_back_to_the_one_before(
    stage_run, tmp_path, capsys, name, how, says
):
    run = shutil.copytree(stage_run / "full", tmp_path / "run")
    for done in ("model.safetensors", "config.yaml", RAW_FILE):  # as if killed after the step-4 checkpoint
        (run / done).unlink()
    damaged = run / CHECKPOINT_DIR / "step_0000004" / name
    _damage(damaged, how)
    capsys.readouterr()
    _tiny_run(_tiny, tmp_path, stage=2, steps=6, out="run", save_every=2, ema=0.5, resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint step_0000004 is damaged: {damaged}" in out
    assert says in out
    assert f"resuming from {run / CHECKPOINT_DIR / 'step_0000002'}, the newest intact checkpoint" in out
    assert "at step 2" in out
    want, got = load_file(str(stage_run / "full" / RAW_FILE)), load_file(str(run / RAW_FILE))
    assert all(torch.equal(want[k], got[k]) for k in want)  # exactly the uninterrupted run
    want, got = (
        load_file(str(stage_run / "full" / "model.safetensors")),
        load_file(str(run / "model.safetensors")),
    )
    assert all(torch.equal(want[k], got[k]) for k in want)  # and its EMA


def test_a_checkpoint_from_before_manifests_resumes_unverified(stage_run, tmp_path, capsys):
    run = shutil.copytree(stage_run / "full", tmp_path / "run")
    (run / CHECKPOINT_DIR / "step_0000004" / MANIFEST_FILE).unlink()
    assert intact_checkpoint(run, "step").name == "step_0000004"
    assert (
        "step_0000004 has no manifest.json (written before checkpoints were verified)"
        in capsys.readouterr().out
    )


def test_no_intact_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    data = _write_images(tmp_path / "data", 4)
    argv = ["train", "--stage", "1", "--data", str(data), "--model", "tiny", "--out", str(tmp_path / "run")]
    argv += ["--image-size", "64", "--quiet", "--train.steps=2", "--train.batch_size=2", "--train.warmup=1"]
    assert main([*argv, "--train.save_every=1"]) == 0
    damaged = tmp_path / "run" / CHECKPOINT_DIR / "step_0000001" / "trainable.safetensors"
    _damage(damaged, "truncate")
    capsys.readouterr()
    assert main([*argv, "--train.save_every=1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"parauni train: error: no intact checkpoint to resume in {tmp_path / 'run'}")
    assert f"{damaged} has " in err and "bytes where" in err


# ------------------------------------------------------------------------------------------- Stage III
def _rl_cfg():
    phases = [PhaseConfig("p", {"bright": 1.0}, 3, "deep", 0.02)]
    return _rl_config(phases=phases, save_every=1, keep_last=5, lr=1e-3, ema=0.5)


PROMPTS = [("a red circle", None), ("a blue square", None)]


def _rl(out: Path, resume: bool = False) -> None:
    train_rl(
        _tiny(),
        _bright,
        ["bright"],
        PromptSource(PROMPTS),
        _rl_cfg(),
        out,
        resume=resume,
        progress=False,
        log=lambda *a: None,
    )


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory) -> Path:
    """3 RL epochs with an EMA under UMASK, checkpoints after epochs 0 and 1."""
    root = tmp_path_factory.mktemp("rl_run")
    old = os.umask(UMASK)
    try:
        _rl(root / "full")
    finally:
        os.umask(old)
    return root / "full"


def test_rl_weights_are_readable_as_the_umask_says(rl_run):
    modes = _modes(rl_run)
    assert "model.safetensors" in modes and f"{CHECKPOINT_DIR}/epoch_000001/ema.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o640)


@pytest.mark.parametrize(("name", "how", "says"), DAMAGES, ids=IDS)
def test_a_damaged_rl_checkpoint_falls_back_or_fails_naming_the_file(
    rl_run, tmp_path, capsys, name, how, says
):
    run = shutil.copytree(rl_run, tmp_path / "run")
    (run / "model.safetensors").unlink()
    damaged = run / CHECKPOINT_DIR / "epoch_000001" / name
    _damage(damaged, how)
    _damage(run / CHECKPOINT_DIR / "epoch_000000" / name, how)
    with pytest.raises(
        CheckpointError, match=f"no intact checkpoint to resume .*newest: {re.escape(str(damaged))}"
    ):
        _rl(run, resume=True)
    shutil.rmtree(run / CHECKPOINT_DIR / "epoch_000000")
    shutil.copytree(rl_run / CHECKPOINT_DIR / "epoch_000000", run / CHECKPOINT_DIR / "epoch_000000")
    capsys.readouterr()
    _rl(run, resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint epoch_000001 is damaged: {damaged}" in out
    assert says in out
    assert "resuming RL from" in out and "at epoch 1" in out
    want, got = load_file(str(rl_run / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert all(torch.equal(want[k], got[k]) for k in want)  # the EMA of the uninterrupted run
