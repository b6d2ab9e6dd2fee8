"""What the ``parauni`` commands share: the parser classes, config overrides, and the flags several commands
take, each defined once here.

The library is imported inside the commands, not at the top of the ``cli`` modules: importing the model code
loads torch, transformers and diffusers (about 10 s on a busy CPU), which ``parauni --help`` and a mistyped
flag should not wait for.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ModelConfig, check_cfg, field_type
from ..errors import ConfigError
from ..utils.files import OutputPathError, check_output_dir
from ..utils.run_files import (
    CHECKPOINT_DIR,
    COMPONENT_DIRS,
    COMPONENTS_FILE,
    CONFIG_FILE,
    MODEL_CARD,
    RAW_WEIGHTS,
    RL_CONFIG,
    RL_EVAL_LOG,
    RL_LOG,
    RUN_RECORD,
    TRAIN_CONFIG,
    TRAIN_LOG,
    WEIGHTS_FILE,
    launcher_rank,
)

if TYPE_CHECKING:
    from ..pipeline import GenerationOptions

OVERRIDE_HELP = "config overrides as --section.key=value (e.g. --lim.layers=last --sampling.steps=10)"
OVERWRITE_RUN_HELP = (
    "start over in an --out that holds a run (everything the run wrote there is deleted first)"
)
DATA_HELP = (
    "a JSONL file of {image, caption} lines (image paths relative to the file); a folder with such JSONL "
    "files or image + .txt pairs; a folder of webdataset .tar shards, a "
    ".tar path or a shard pattern ('data/shard-{000000..000099}.tar', 'data/*.tar'); a Hugging Face dataset "
    "folder (save_to_disk, parquet or arrow; needs `datasets`); or extracted latents (parauni extract-latents)"
)
# what a train / rl --out holds once a run wrote to it
RUN_FILES = (CHECKPOINT_DIR, WEIGHTS_FILE, CONFIG_FILE, TRAIN_LOG, RL_LOG)
# everything a run writes there, the model first (what `generate` reads): what --overwrite removes
WRITTEN_BY_A_RUN = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    COMPONENTS_FILE,
    *COMPONENT_DIRS,
    RAW_WEIGHTS,
    RUN_RECORD,
    MODEL_CARD,
    TRAIN_CONFIG,
    RL_CONFIG,
    TRAIN_LOG,
    RL_LOG,
    RL_EVAL_LOG,
    CHECKPOINT_DIR,
)
OLD_RUN = ".old_run"  # where --overwrite moves the old run before deleting it


# ---------------------------------------------------------------------------------------------- overrides
def top_level_keys() -> tuple[str, ...]:
    """The model config's keys outside any section (``seed``, ``name``): overrides without a dot."""
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    return tuple(n for n in names if not dataclasses.is_dataclass(field_type(ModelConfig, [n])))


def _is_override(item: str) -> bool:
    if not (item.startswith("--") and "=" in item):
        return False
    key = item[2:].split("=", 1)[0]
    return "." in key or key in top_level_keys()


def split_overrides(extra: list[str]) -> list[str]:
    """Keep ``--a.b=c`` items (and ``--seed=N`` / ``--name=X`` of the model config) as overrides; anything
    else is an error naming it."""
    bad = [e for e in extra if not _is_override(e)]
    if bad:
        raise ConfigError(f"unrecognised argument(s) {bad}; overrides look like --section.key=value")
    return extra


def route(overrides: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """Split overrides into those under ``prefix.`` (prefix removed) and the rest."""
    mine = [o[len(prefix) + 3 :] for o in overrides if o.startswith(f"--{prefix}.")]
    rest = [o for o in overrides if not o.startswith(f"--{prefix}.")]
    return mine, rest


def only_world_overrides(overrides: list[str], command: str) -> list[str]:
    """The ``--world.*`` overrides of a world command, which takes no other kind."""
    world, rest = route(overrides, "world")
    if rest:
        raise ConfigError(f"parauni {command} takes --world.* overrides only, got {rest}")
    return world


def no_overrides(overrides: list[str], command: str) -> None:
    """A command without a model or config takes no overrides."""
    if overrides:
        raise ConfigError(f"parauni {command} takes no config overrides, got {overrides}")


# ------------------------------------------------------------------------------------------------- checks
def sampling_options(args: argparse.Namespace) -> GenerationOptions:
    """The library's :class:`~parauni.pipeline.GenerationOptions` of --seed, --batch-size, --steps, --cfg
    (and --height / --width where the command has them), checked first: `_check_sampling_args`."""
    from ..pipeline import GenerationOptions  # torch: see the module's docstring

    _check_sampling_args(args)
    names = [f.name for f in dataclasses.fields(GenerationOptions)]
    return GenerationOptions(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def _check_sampling_args(args: argparse.Namespace) -> None:
    """--steps, --cfg, --seed, --batch-size (and --height / --width where the command has them), before any
    work: one-line errors naming the value and the allowed range."""
    from ..pipeline import check_seed  # torch: see the module's docstring

    if args.cfg is not None:
        try:
            check_cfg(args.cfg)
        except ValueError as err:
            raise ConfigError(
                f"--cfg {args.cfg}: must be a finite number >= 0 (1 turns guidance off)"
            ) from err
    positive = [("--steps", args.steps), ("--batch-size", args.batch_size)]
    positive += [(f"--{n}", getattr(args, n, None)) for n in ("height", "width", "images_per_prompt")]
    for flag, value in positive:
        if value is not None and value < 1:
            raise ConfigError(f"{flag.replace('_', '-')} {value} must be >= 1")
    check_seed(args.seed, flag="--seed")


def first_n(items: list, limit: int | None) -> list:
    """The first ``--limit N`` of `items` (all of them without --limit); N must be at least 1."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1")
    return items if limit is None else items[:limit]


def check_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """The --out of ``train`` / ``rl``: a new or empty folder; one holding a run needs --resume (continue)
    or --overwrite (start over: everything the old run wrote is removed first, by the launcher's first
    process: :func:`remove_old_run`)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it; give one")
    path = Path(out)
    held = [name for name in RUN_FILES if path.is_dir() and (path / name).exists()]
    if held and not (resume or overwrite):
        raise OutputPathError(
            f"--out {out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to start over, or choose another folder"
        )
    check_output_dir(path, overwrite=overwrite, resumable=resume)
    if overwrite and launcher_rank() == 0:
        remove_old_run(path)


def remove_old_run(folder: Path) -> None:
    """Remove everything a run wrote in ``folder`` (:data:`WRITTEN_BY_A_RUN`), other files left alone.

    Each entry is first renamed into ``folder/.old_run`` (a rename is atomic: a run killed meanwhile leaves the
    old model either whole in place, where ``--overwrite`` finds it again, or out of the way), then that folder
    is deleted.
    """
    aside = folder / OLD_RUN
    shutil.rmtree(aside, ignore_errors=True)  # what a killed --overwrite left
    for name in WRITTEN_BY_A_RUN:
        if (folder / name).exists() or (folder / name).is_symlink():
            aside.mkdir(exist_ok=True)
            (folder / name).replace(aside / name)
    shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------------------- shared flags
def add_quiet(p: argparse.ArgumentParser) -> None:
    """--quiet, of every command that shows progress."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """--model of the commands that generate from one model."""
    p.add_argument(
        "--model", required=True, help="a model folder (or a preset name for a random-weights smoke run)"
    )


def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    """--limit / --no-score of the benchmark commands that generate and then score."""
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--no-score", action="store_true", help="generate only")


def add_score_args(p: argparse.ArgumentParser, images_help: str, out_help: str) -> None:
    """--images / --out / --overwrite / --quiet of the commands that score an existing image folder."""
    p.add_argument("--images", required=True, help=images_help)
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_quiet(p)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--resume / --overwrite / --quiet of the commands that train into a run folder."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_RUN_HELP)
    add_quiet(p)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """--image-column / --caption-column of the commands that read a data set."""
    p.add_argument(
        "--image-column", default="image", help="Hugging Face datasets: the image column (default: image)"
    )
    p.add_argument(
        "--caption-column",
        default="caption",
        help="Hugging Face datasets: the caption column; tar shards: the caption key of KEY.json (default: caption)",
    )


def add_sampling_args(
    p: argparse.ArgumentParser, seed_help: str = "image i uses noise seed seed + i"
) -> None:
    """--steps, --cfg, --seed and --batch-size: the sampling options of every command that generates."""
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--batch-size", type=int, default=4, help="images per model call")


def add_world_stage0_args(p: argparse.ArgumentParser) -> None:
    """--stage0 / --cache of the commands whose --world reads the world's Stage-0 models."""
    p.add_argument(
        "--stage0",
        default="release",
        help="with --world: the Stage-0 models ('release' = shipped, default; 'scratch' = `parauni demo --stage0 "
        "scratch`'s; a release folder or Hub id)",
    )
    p.add_argument("--cache", help="with --world: the scratch Stage-0 cache (implies --stage0 scratch)")


# ------------------------------------------------------------------------------------------------ parsers
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written (they list config keys one a line); every flag's default in its help, unless the
    help already says it or there is none to say (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with :class:`HelpFormatter`; sub-command parsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    """The installed parauni version (``parauni --version``)."""
    try:
        return version("parauni")
    except PackageNotFoundError:
        return "unknown (not installed)"


def quiet_libraries() -> None:
    """``--quiet``: no progress bars from Hugging Face libraries either (weight loading, downloads)."""
    import diffusers  # heavy: only when --quiet is given
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
