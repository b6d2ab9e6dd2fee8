"""Stages I and II as the library runs them for its callers: :func:`run_stage` (a model, a data source and a
training config; the shapes world and the CLI both call it) and :func:`run_stage_on_data` (what ``parauni
train`` asks for: a model preset or folder and a data path, whose sizes and data source are worked out here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..utils.run_files import launcher_rank
from .config import TrainConfig
from .sources import DataOptions
from .trainer import TrainResult


@dataclass
class RunOptions:
    """How a stage runs, for every stage (I-III) and caller."""

    resume: bool = False  # continue from the newest intact checkpoint in the run folder
    progress: bool = True  # show progress bars
    self_contained: bool = False  # copy the frozen parts the model refers to outside its folder into it
    log: Callable[[str], None] = print  # where the run's messages go (main process)


@dataclass
class StageReport:
    """What a finished stage reports to its caller: the trainer's result and what the run did around it."""

    result: TrainResult
    start: int = 0  # the step the run started from (a resumed run: its checkpoint's)
    copied: list[str] | None = None  # the parts copied in (None: the folder was not made self-contained here)
    skipped_while_training: int = 0  # corrupt samples a streamed source met during training


def _copy_in(out: Path) -> list[str] | None:
    """Make the model folder ``out`` stand alone (the launcher's first process only; None on the others)."""
    from ..models.references import copy_in
    from .run_folder import write_model_card

    if launcher_rank() != 0:
        return None
    copied = copy_in(out)
    write_model_card(out)
    return copied


def run_stage(
    model, source, cfg: TrainConfig, out: str | Path, options: RunOptions | None = None, teacher=None
):
    """Train one stage (:func:`parauni.training.trainer.train`) into the model folder ``out``; with
    ``options.self_contained`` copy the frozen parts it refers to into it. Returns a :class:`StageReport`."""
    from .trainer import train  # (read at call time: a caller may wrap the trainer)

    options = options or RunOptions()
    before = len(getattr(source, "skipped", ()))
    result = train(model, source, cfg, out, resume=options.resume, progress=options.progress, teacher=teacher)
    copied = _copy_in(Path(out)) if options.self_contained else None
    return StageReport(
        result, copied=copied, skipped_while_training=len(getattr(source, "skipped", ())) - before
    )


# ------------------------------------------------------------------------------------------- parauni train
@dataclass
class DataStage:
    """A Stage I/II run on the user's own data, as ``parauni train`` asks for it."""

    stage: int  # 1: queries + LIM; 2: + the DiT
    data: str  # the data path (any form of training.sources.data_kind)
    model: str  # preset, YAML or model folder to start from
    out: str  # the run folder
    image_size: int | None = (
        None  # square training size (default: the train config's, the latents', the model's)
    )
    options: DataOptions = field(default_factory=DataOptions)  # data columns and shard grouping
    cache_dir: str | None = None  # where a folder of images caches its prepared inputs
    train_overrides: list[str] = field(default_factory=list)  # train config overrides, key=value
    model_overrides: list[str] = field(default_factory=list)  # model config overrides, --section.key=value


def model_image_size(config) -> int:
    """The square training size a model config implies: its sampling size (which training then keeps)."""
    height, width = config.sampling.height, config.sampling.width
    if height != width:
        raise ConfigError(
            f"the model samples {height}x{width} images but training images are square; give --image-size"
        )
    return height


def _train_dict(request: DataStage) -> dict:
    """The train config's values from the overrides and the requested image size."""
    from ..config import apply_overrides

    train_dict = apply_overrides({}, request.train_overrides)
    if request.image_size:
        train_dict["image_size"] = request.image_size
    return train_dict


def check_data_stage(request: DataStage):
    """The data path's, the training config's and the model config's errors, before any folder or data is
    touched. Returns the model config."""
    from ..models.parauni import ParaUni
    from .config import stage_config
    from .sources import data_kind

    data_kind(request.data)
    stage_config(request.stage, _train_dict(request))
    return ParaUni.load_config(request.model, request.model_overrides)


def _sized(request: DataStage, config, latents) -> tuple[TrainConfig, object]:
    """The stage's train config with its image size (given, else that of the extracted ``latents``, else the
    model config's sampling size), and the model loaded to sample at that size."""
    from ..models.parauni import ParaUni
    from .config import stage_config

    train_dict = _train_dict(request)
    if latents is not None:  # extracted latents fix the image size
        train_dict.setdefault("image_size", latents.image_size)
    train_dict.setdefault("image_size", model_image_size(config))
    cfg = stage_config(request.stage, train_dict)
    model = ParaUni.load(request.model, request.model_overrides)
    model.check_size(cfg.image_size, cfg.image_size)
    # the model folder samples at the size it was trained at
    model.config.sampling.height = model.config.sampling.width = cfg.image_size
    return cfg, model


def _source(request: DataStage, model, image_size: int, latents, progress: bool):
    """The data source at ``image_size``: the extracted ``latents`` (checked against the model), or images (and
    their VAE latents, cached) from a folder, shards or a dataset."""
    from .latents import check_latents_fit, encoder_key
    from .sources import training_source

    key = encoder_key(model.vae)
    if latents is not None:
        check_latents_fit(latents, model.latent_shape(image_size, image_size), image_size, key)
        return latents
    return training_source(
        request.data,
        image_size,
        encode=model.encode_images,
        cache_key=key,
        options=request.options,
        progress=progress,
        cache_dir=request.cache_dir,
    )


def data_summary(request: DataStage, source, image_size: int) -> str:
    """One line on the data a run trains on."""
    from .sources import data_kind

    uncaptioned = len(getattr(source, "uncaptioned", ()))
    return (
        f"data ({data_kind(request.data)}): {len(source)} image-caption pairs from {request.data}"
        + (f"; skipped {len(source.skipped)} unreadable or corrupt sample(s)" if source.skipped else "")
        + (f"; left out {uncaptioned} image(s) without a caption" if uncaptioned else "")
        + f"; training at {image_size} px"
    )


def run_stage_on_data(
    request: DataStage, options: RunOptions, check_out: Callable[[], None] | None = None
) -> StageReport:
    """``parauni train``: check the configs, then ``check_out()`` (the caller's check of the run folder), then
    work out the image size, load the model and the data, and :func:`run_stage` (with the model's own text
    encoder as the teacher when the config distills). Ends a launched run's process group."""
    from .checkpoint import resume_step
    from .distributed import shut_down_processes
    from .latents import LatentShardSource
    from .sources import data_kind
    from .teacher import lm_teacher

    config = check_data_stage(request)
    if check_out is not None:
        check_out()
    start = resume_step(request.out) if options.resume else 0
    latents = None
    if data_kind(request.data) == "latents":
        latents = LatentShardSource(request.data, request.options.shards_per_group)
    cfg, model = _sized(request, config, latents)
    source = _source(request, model, cfg.image_size, latents, options.progress)
    options.log(data_summary(request, source, cfg.image_size))
    captions = getattr(source, "captions", None)  # the teacher standardises over them
    teacher = lm_teacher(model, seed=cfg.seed, captions=captions) if cfg.condition_distill > 0 else None
    report = run_stage(model, source, cfg, request.out, options, teacher)
    shut_down_processes()  # under a launcher: every process leaves the group together
    report.start = start
    return report
