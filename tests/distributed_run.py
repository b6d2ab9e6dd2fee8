"""A short Stage-I or Stage-III run of the tiny model, for the tests that launch processes (test_distributed).

Run it as a plain script (one process) or under ``accelerate launch --cpu --num_processes 2`` (DDP over
gloo); the trainers pick the processes up from the launcher's environment. ``--backend fsdp`` / ``deepspeed``
run it under ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` / ``deepspeed_zero2.yaml`` on
CPU (see :func:`cpu_accelerator` for what that takes).

    python tests/distributed_run.py train OUT [--grad-accum 2] [--delay 0.2] [--resume] [--nan-at STEP]
    python tests/distributed_run.py rl OUT [--delay 0.2] [--resume]

``train`` fits the tiny model (built with the test fixtures' recipe, ``conftest.tiny_config``) on seeded
random latents; ``rl`` runs Flow-GRPO with a brightness reward. Both save the model folder to OUT; ``rl``
also writes ``OUT/rank_<r>.json`` with each process's LDAM state and epoch history. ``--delay``
slows every step down (data or reward call), so that a test can kill the run between two checkpoints.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import tiny_config  # noqa: E402

from parauni.config import TrainableConfig  # noqa: E402
from parauni.models.parauni import ParaUni  # noqa: E402
from parauni.rl.config import PhaseConfig, RLConfig  # noqa: E402
from parauni.rl.grpo import train_rl  # noqa: E402
from parauni.rl.ldam import LDAMConfig  # noqa: E402
from parauni.rl.prompts import PromptSource  # noqa: E402
from parauni.training.config import stage_config  # noqa: E402
from parauni.training.distributed import shut_down_processes  # noqa: E402
from parauni.training.trainer import train  # noqa: E402

CAPTIONS = ["a red circle", "two blue squares", "a green cross left of a yellow triangle", "a photo of a cat"]
PROMPTS = [("a red circle", None), ("a blue square", None), ("two crosses", None)]
TRAIN_STEPS, SAVE_EVERY, GLOBAL_BATCH = 6, 2, 4
RL_EPOCHS, RL_UPDATES = 4, 1  # RL_UPDATES: optimizer steps per epoch
LR = 1e-3  # both runs; test_distributed derives its tolerances from it
# a run takes 5-40 s; one still running after this long is hung: every thread's stack goes to stderr, exit 1
HANG_SECONDS = float(os.environ.get("DISTRIBUTED_RUN_HANG_SECONDS", 240))
HANG_MARK = "Timeout ("  # how faulthandler's dump begins


class LatentSource:
    """Seeded random latents (already in the DiT's space) with captions; example i is the same everywhere."""

    encoded = True

    def __init__(self, shape: tuple[int, ...], delay: float, nan_at: int | None) -> None:
        self.shape, self.delay, self.nan_at = shape, delay, nan_at

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        time.sleep(self.delay)
        x = torch.stack(
            [torch.randn(self.shape, generator=torch.Generator().manual_seed(i)) for i in indices]
        )
        if self.nan_at is not None and indices[0] // GLOBAL_BATCH == self.nan_at:
            x[0, 0, 0, 0] = float("nan")  # only on the process that holds the step's first example
        return x, [CAPTIONS[i % len(CAPTIONS)] for i in indices]


def cpu_accelerator(backend: str, grad_accum: int = 1):
    """The Accelerator of a CPU run under ``backend`` ('ddp': None, the loops build their own).

    accelerate 1.15 picks FSDP and DeepSpeed only with an accelerator: on CPU its multi-CPU (gloo) state
    ignores an FSDP plugin, and under DeepSpeed it initialises gloo but counts one process. So on CPU:
    * deepspeed: the process group is named up front (``PartialState(backend="gloo")``); the loops then build
      their Accelerator with the DeepSpeed plugin of the launcher's config, as on GPUs;
    * fsdp: the multi-CPU state is switched to FSDP with the plugin of the launcher's config (env FSDP_*),
      so that accelerate's own FSDP2 preparation (``fully_shard`` over gloo) and every FSDP path of the loops
      run. Mixed precision is not exercised this way.
    """
    if backend == "ddp":
        return None
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if backend == "deepspeed":
        PartialState(backend="gloo")
        return None
    plugin = FullyShardedDataParallelPlugin()
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, fsdp_plugin=plugin)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def run_train(args: argparse.Namespace) -> None:
    model = ParaUni.from_config(tiny_config())
    cfg = stage_config(
        1,
        {
            "steps": TRAIN_STEPS,
            "batch_size": GLOBAL_BATCH,
            "grad_accum": args.grad_accum,
            "lr": LR,
            "warmup": 1,
            "save_every": SAVE_EVERY,
            "keep_last": 2,
            "log_every": 1,
            "image_size": 64,
        },
    )
    source = LatentSource(model.latent_shape(64, 64), args.delay, args.nan_at)
    acc = cpu_accelerator(args.backend, args.grad_accum)
    train(model, source, cfg, args.out, resume=args.resume, progress=False, accelerator=acc)


def rl_config() -> RLConfig:
    """Three prompts x groups of 2 = 6 samples: over 2 processes, the second prompt's group spans both."""
    return RLConfig(
        phases=[PhaseConfig("bright", {"bright": 1.0}, RL_EPOCHS, "deep", 0.02)],
        prompts_per_epoch=3,
        group_size=2,
        steps=3,
        cfg=2.0,
        height=32,
        width=32,
        updates_per_epoch=RL_UPDATES,
        micro_batch=8,
        rollout_batch=8,
        lr=LR,
        trainable=TrainableConfig(queries=False, lim=False, dit=False, dit_lora_rank=4, dit_lora_alpha=8.0),
        ldam=LDAMConfig(window=2, drop_epochs=1, grad_gate=False),  # per reward: one LDAM, on "bright"
        ema=0.0,  # the saved weights are the policy's, which the tests compare
        eval_prompts=3,  # held-out: 6 images, the middle prompt's over both processes, before and after
        eval_images=2,
        save_every=1,
        keep_last=2,
    )


def run_rl(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    def bright(images, prompts, metadata):
        time.sleep(args.delay)
        return {"bright": images.mean(dim=(1, 2, 3)).tolist()}

    result = train_rl(
        ParaUni.from_config(tiny_config()),
        bright,
        ["bright"],
        PromptSource(PROMPTS),
        rl_config(),
        args.out,
        resume=args.resume,
        progress=False,
        accelerator=cpu_accelerator(args.backend),
        log=lambda *a: None,
    )
    rank = PartialState().process_index
    row = {
        "ldam": result.ldam,
        "history": [{k: v for k, v in r.items() if k != "seconds"} for r in result.history],
        "evals": [{k: v for k, v in r.items() if k != "seconds"} for r in result.evals],
    }
    (Path(args.out) / f"rank_{rank}.json").write_text(json.dumps(row, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "rl"])
    parser.add_argument("out")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds of sleep per data / reward call")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--nan-at", type=int, default=None, help="train: a NaN input at this step")
    parser.add_argument("--backend", choices=["ddp", "fsdp", "deepspeed"], default="ddp")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    torch.set_num_threads(1)
    (run_train if args.what == "train" else run_rl)(args)
    shut_down_processes()  # before exit: a group left to the interpreter's teardown can abort a process
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
