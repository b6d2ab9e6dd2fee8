"""benchmarks/gpu_check.py in its quick form (``--preset tiny --device cpu``): every check runs and says ok.

The GPU check is the script a GPU machine runs at paper scale (issue 20); running its CPU form here keeps it
from rotting: each check (Stage I / II steps with the loop, all vs last layer, 20-step sampling with CFG,
reconstruction, a Stage-III epoch, FSDP2 under ``accelerate launch``) must run and report its figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_tiny_on_cpu_runs_every_check_and_says_ok(tmp_path, capsys):
    from accelerate.state import AcceleratorState

    gpu_check = _load_script()
    report = tmp_path / "gpu_check.json"
    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton other tests set
    try:
        code = gpu_check.main(
            [
                "--device",
                "cpu",
                "--preset",
                "tiny",
                "--json",
                str(report),
                "--workdir",
                str(tmp_path / "runs"),
            ]
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = capsys.readouterr().out
    summary = [line.split(maxsplit=1) for line in out.split("\nsummary")[-1].splitlines()[1:] if line.strip()]
    assert [name for name, _ in summary] == list(gpu_check.CHECKS), out[-4000:]
    assert all(verdict == "ok" for _, verdict in summary), out[-4000:]
    assert code == 0

    checks = json.loads(report.read_text())["checks"]
    for name in ("stage1", "stage2"):
        row = checks[name]
        assert row["batch"] == 2 and row["flops_per_step"] > 0 and row["step_seconds"] > 0
        assert row["peak_rss_mib"] > 0
    ratio = checks["all_vs_last"]
    assert ratio["flop_ratio"] > 1 and math.isfinite(ratio["time_ratio"])  # all layers count more work
    for name in ("sampling", "reconstruction"):
        assert checks[name]["tflop_per_s"] > 0 and checks[name]["step_seconds"] > 0
    assert checks["rl"]["lora_parameters"] > 0 and checks["rl"]["epoch_seconds"] > 0
    for stage in ("stage1", "stage2"):
        fsdp = checks["fsdp2"][stage]
        assert fsdp["sharded"] and "FSDP" in fsdp["distributed_type"] and fsdp["fsdp_version"] == 2


def test_gpu_check_fsdp2_trains_a_bf16_dit_in_stage_two(tmp_path, capsys):
    """The paper presets load the DiT in bf16: under FSDP2, Stage II trains it beside the fp32 queries and LIM
    in one unit, which FSDP2 refuses unless the trained parameters share a dtype (they become fp32 masters)."""
    from accelerate.state import AcceleratorState

    gpu_check = _load_script()
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        code = gpu_check.main(
            ["--device", "cpu", "--preset", "tiny", "--dtype", "bf16", "--checks", "fsdp2"]
            + ["--workdir", str(tmp_path / "runs")]
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    out = capsys.readouterr().out
    assert "Stage II second step" in out and out.split("\nsummary")[-1].split()[-1] == "ok", out[-4000:]
    assert code == 0
