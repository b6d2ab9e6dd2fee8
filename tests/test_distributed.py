"""Stages I and III under DDP and across crashes: processes launched as subprocesses, on CPU over gloo.

* 2 processes (``torch.distributed.run``, accelerate picks them up) train the same weights as 1 process with
  the same global batch; in Stage III the prompt groups span processes, rewards are gathered, and every
  process ends with the same LDAM state and epoch history;
* a run killed with SIGKILL after a checkpoint and resumed with ``resume`` ends with exactly the weights of
  an uninterrupted run (1 process, deterministic CPU settings).

The runs are ``tests/distributed_run.py`` (the tiny model of the fixtures, seeded random latents / a
brightness reward); the references run it in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import distributed_run
import pytest
import torch
from safetensors.torch import load_file

from parauni.rl.grpo import _check_same_everywhere

SCRIPT = Path(distributed_run.__file__)


def _command(args: list[str], processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, str(SCRIPT), *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(SCRIPT),
        *args,
    ]


def _launch(args: list[str], processes: int = 1) -> subprocess.Popen:
    # ACCELERATE_USE_CPU: accelerate's multi-CPU (gloo) mode for the torchrun processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        _command(args, processes), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run(args: list[str], processes: int) -> str:
    proc = _launch(args, processes)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_after(proc: subprocess.Popen, marker: Path, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as ``marker`` exists (a complete checkpoint), while it is still running."""
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before {marker} appeared:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"no {marker} after {timeout} s"
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; raise its --delay"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _in_process(what: str, out: Path, **kw) -> None:
    """distributed_run in this process (one process, the same thread count as the subprocesses)."""
    from accelerate.state import AcceleratorState

    defaults = dict(grad_accum=1, delay=0.0, resume=False, nan_at=None)
    args = argparse.Namespace(out=str(out), **{**defaults, **kw})
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
    try:
        (distributed_run.run_train if what == "train" else distributed_run.run_rl)(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _log(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def _history(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"rank_{rank}.json").read_text())


# Stage I: 1 process x 2 micro-steps of 2, with a NaN example at step 1 (the step must be skipped)
TRAIN_ARGS = dict(grad_accum=2, nan_at=1)


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_reference")
    _in_process("train", out, **TRAIN_ARGS)
    return out


@pytest.fixture(scope="module")
def rl_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl_reference")
    _in_process("rl", out)
    return out


def test_two_processes_train_the_same_weights_as_one(train_reference, tmp_path):
    out = tmp_path / "ddp"
    _run(["train", str(out), "--grad-accum", "1", "--nan-at", "1"], processes=2)
    ref, got = _weights(train_reference), _weights(out)
    assert set(ref) == set(got)
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, f"max abs weight difference 1 vs 2 processes: {diff}"
    # the NaN reached one process only; both skipped the step together (no hang) and logged it
    log = _log(out, "train_log.jsonl")
    assert [r["skipped"] for r in log] == [False, True, False, False, False, False]
    assert [r["skipped"] for r in _log(train_reference, "train_log.jsonl")] == [r["skipped"] for r in log]
    ckpt = out / "checkpoints" / "step_0000004"
    assert {p.name for p in ckpt.iterdir()} == {
        "trainable.safetensors",
        "optimizer.pt",
        "state.json",
        "rng_0.pt",
        "rng_1.pt",
    }
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]


def test_killed_training_resumes_to_exactly_the_uninterrupted_weights(train_reference, tmp_path):
    out = tmp_path / "killed"
    proc = _launch(["train", str(out), "--grad-accum", "2", "--nan-at", "1", "--delay", "1.0"])
    _kill_after(proc, out / "checkpoints" / "step_0000002" / "state.json")
    assert not (out / "model.safetensors").exists()
    partial = out / "checkpoints" / ".tmp_step_0000004"  # as if killed while writing the next checkpoint
    partial.mkdir(exist_ok=True)
    (partial / "trainable.safetensors").write_bytes(b"truncated")
    state = json.loads((out / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["step"] == 2 and state["examples_seen"] == 2 * distributed_run.GLOBAL_BATCH
    assert {"schedule", "lr", "bad_in_a_row"} <= set(state)
    _in_process("train", out, **TRAIN_ARGS, resume=True)
    ref, got = _weights(train_reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert [r["step"] for r in _log(out, "train_log.jsonl")] == list(range(distributed_run.TRAIN_STEPS))
    assert not partial.exists()


def test_two_processes_run_rl_like_one_with_the_same_ldam_state(rl_reference, tmp_path):
    out = tmp_path / "ddp_rl"
    _run(["rl", str(out)], processes=2)
    ref, got = _weights(rl_reference), _weights(out)
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert diff <= 1e-5, f"max abs weight difference 1 vs 2 processes: {diff}"
    rank0, rank1, single = _history(out, 0), _history(out, 1), _history(rl_reference)
    assert rank0 == rank1  # LDAM's histories, gates, gamma and triggers: identical on both processes
    assert single["ldam"][0]["triggers"] >= 1, "the recipe is meant to trigger LDAM at least once"
    assert rank0["ldam"][0]["triggers"] == single["ldam"][0]["triggers"]
    for a, b in zip(rank0["history"], single["history"], strict=True):
        # the rewards of all 6 samples (3 prompts x 2, the middle group across both processes) are gathered
        assert a["phase_reward"] == pytest.approx(b["phase_reward"], abs=1e-5)
        assert a["ldam_triggered"] == b["ldam_triggered"]
    torch.testing.assert_close(
        torch.tensor(rank0["ldam"][0]["rewards"]),
        torch.tensor(single["ldam"][0]["rewards"]),
        atol=1e-5,
        rtol=0,
    )


def test_killed_rl_resumes_to_exactly_the_uninterrupted_weights(rl_reference, tmp_path):
    out = tmp_path / "killed_rl"
    proc = _launch(["rl", str(out), "--delay", "2.0"])
    _kill_after(proc, out / "checkpoints" / "epoch_000000" / "state.json")
    assert not (out / "model.safetensors").exists()
    _in_process("rl", out, resume=True)
    ref, got = _weights(rl_reference), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert _history(out) == _history(rl_reference)  # LDAM state and every epoch's log row


def test_state_that_differs_between_processes_is_an_error(monkeypatch):
    import accelerate.utils

    two = SimpleNamespace(num_processes=2)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda values: values * 2)
    _check_same_everywhere(two, "LDAM state", {"gamma": 0.1})  # the same on both: fine
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda values: [*values, '{"gamma": 0.5}'])
    with pytest.raises(RuntimeError, match="LDAM state differs between processes"):
        _check_same_everywhere(two, "LDAM state", {"gamma": 0.1})
