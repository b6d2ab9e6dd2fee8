"""Achieved CPU throughput of a training step against the machine's matmul throughput, and peak memory.

    python benchmarks/bench_throughput.py [--presets tiny medium paper_small] [--batch 2] [--steps 3]
                                          [--matmul 2048] [--threads 2]

First the machine's reference: the median FLOP/s of a square fp32 ``torch.matmul`` (2 n^3 FLOPs). Then per
preset (all layers, Stage I, the step of ``bench_core.py``): the FLOPs of one step
(``FlopCounterMode``: matrix products, convolutions, attention), the median step time, the achieved FLOP/s
and its fraction of the matmul reference, and memory: the resident set with the model and batch loaded,
and its peak during the steps (Linux: the ``VmHWM`` high-water mark, reset through
``/proc/self/clear_refs`` before the steps; elsewhere the process's lifetime peak from ``getrusage``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import build, median_step_times  # noqa: E402


def matmul_flops_per_s(n: int, repeats: int = 5) -> float:
    """Median FLOP/s of an (n, n) @ (n, n) fp32 matmul."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.matmul(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _status_kib(field: str) -> int | None:
    path = Path("/proc/self/status")
    if not path.is_file():
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", path.read_text(), re.M)
    return int(m.group(1)) if m else None


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_mib(reset: bool) -> tuple[float, str]:
    """(peak resident set in MiB, what it covers)."""
    hwm = _status_kib("VmHWM")
    if reset and hwm is not None:
        return hwm / 1024, "during the steps"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (kib / 1024 if sys.platform != "darwin" else kib / 2**20), "process lifetime"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "medium", "paper_small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference matmul")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_flops_per_s(args.matmul)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, median of {args.steps} "
        f"steps; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"reference: fp32 matmul {args.matmul}x{args.matmul}: {peak / 1e9:.1f} GFLOP/s")
    print(
        f"{'preset':<12}{'GFLOP/step':>11}{'step (s)':>10}{'GFLOP/s':>9}{'of matmul':>11}"
        f"{'RSS loaded (MiB)':>18}{'peak RSS (MiB)':>16}"
    )
    for preset in args.presets:
        bench = build(preset, "all", args.batch)
        flops = bench.flops()
        loaded = (_status_kib("VmRSS") or 0) / 1024
        reset = reset_peak()
        seconds = median_step_times({"all": bench}, args.steps)["all"]
        top, scope = peak_mib(reset)
        achieved = flops / seconds
        print(
            f"{preset:<12}{flops / 1e9:>11.2f}{seconds:>10.3f}{achieved / 1e9:>9.1f}{achieved / peak:>10.0%}"
            f"{loaded:>18.0f}{top:>16.0f}  (peak {scope})"
        )
        del bench


if __name__ == "__main__":
    main()
