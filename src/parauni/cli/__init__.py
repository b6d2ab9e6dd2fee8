"""The ``parauni`` command line: thin commands that parse, call the library and print.

    parauni demo [--quick]                          the whole pipeline on the embedded shapes world
    parauni reproduce [--seeds 0 1 2] [--rows ...]  the paper's ablation table on the world
    parauni info PRESET_OR_DIR                      components, depth, queries, parameter counts
    parauni generate --model DIR --prompt TEXT ...  text-to-image (or image-to-image with --image)
    parauni train --stage 1|2 --data DIR --model M  Stage I / II on your own image-caption folder
    parauni extract-latents --data SRC --model M --out DIR   VAE latents of a data set, in shards
                                                    (splits the work under accelerate launch; resumable)
    parauni rl --model DIR --out DIR [--world]       Stage III: Flow-GRPO + LDAM with a reward curriculum
    parauni import-openuni CKPT --preset P --out D  an OpenUni / ParaUni .pth checkpoint as a model folder
    parauni export --model DIR --out D [--to diffusers|parauni]   a model folder as a diffusers pipeline
                                                    folder (ParaUniPipeline), or a pipeline folder back
    parauni eval geneval --model M --metadata F --out D --detector mask2former|world|file
                                                    GenEval images in the official layout, then their scores
    parauni eval geneval-score --images D --detector mask2former|world|file --out F
                                                    score an existing GenEval folder
    parauni eval dpg --model M --prompts F --out D (--csv dpg_bench.csv --vqa V | --no-score)
                                                    DPG-Bench 2x2 grids (resumable), then their VQA scores
    parauni eval dpg-score --images D --csv F --vqa V --out F   score an existing DPG-Bench folder
    parauni eval reconstruct --model M [--model M2 ...] --images D --out D [--clip C]
                                                    image reconstruction: PSNR / SSIM / CLIP similarity
    parauni analyze layers --model DIR --out DIR (--world | --clip C) [--prompts F]
                                                    per-layer scores, layer similarity, zone removal
    parauni serve [--model [NAME=]DIR ...] [--port P]  a local web app: text-to-image, reconstruction,
                                                    last layer vs all layers (default: the demo's models)

One module per family of commands (:mod:`.world`, :mod:`.train`, :mod:`.rl`, :mod:`.generate`, :mod:`.eval`,
:mod:`.analyze`, :mod:`.serve`), each with an ``add_commands``; the flags several commands share are defined
once in :mod:`.common`. Nothing in the library imports this package.

Commands take ``--section.key=value`` overrides of the model config, ``--train.key=value`` of the training
config, ``--rl.key=value`` / ``--rewards.key=value`` of Stage III and ``--world.key=value`` of the world config
(unknown keys are errors).

Every command checks its inputs and its output location before it loads a model or computes anything, and
replaces nothing already there without ``--overwrite`` (resumable commands continue what their ``--out``
holds instead; ``train`` / ``rl`` take ``--resume`` for that). A user's mistake (a
:class:`parauni.errors.ParaUniError`) is answered in one line that names the value and the fix (exit status
2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import ParaUniError
from . import analyze, eval, generate, rl, serve, train, world
from .common import Parser, package_version, quiet_libraries, split_overrides

__all__ = ["build_parser", "main", "split_overrides"]

# the order of `parauni --help`
FAMILIES = (world, train, rl, generate, eval, analyze, serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``parauni`` parser with every command; each sets ``fn(args, overrides) -> exit status``."""
    parser = Parser(prog="parauni", description="ParaUni: all-layer VLM conditioning for diffusion.")
    parser.add_argument("--version", action="version", version=f"parauni {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``parauni`` with ``argv`` (default: the process's arguments); returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        return args.fn(args, split_overrides(extra))
    except ParaUniError as err:
        sub_command = (
            getattr(args, "eval_command", None)
            or getattr(args, "analyze_command", None)
            or getattr(args, "world_command", None)
        )
        command = " ".join(filter(None, [args.command, sub_command]))
        print(f"parauni {command}: error: {err}", file=sys.stderr)
        return 2
