"""The ``parauni`` command line.

    parauni demo [--quick]                          the whole pipeline on the embedded shapes world
    parauni reproduce [--seeds 0 1 2] [--rows ...]  the paper's ablation table on the world
    parauni info PRESET_OR_DIR                      components, depth, queries, parameter counts
    parauni generate --model DIR --prompt TEXT ...  text-to-image (or image-to-image with --image)
    parauni train --stage 1|2 --data DIR --model M  Stage I / II on your own image-caption folder
    parauni extract-latents --data SRC --model M --out DIR   VAE latents of a data set, in shards
                                                    (splits the work under accelerate launch; resumable)
    parauni rl --model DIR --out DIR [--world]       Stage III: Flow-GRPO + LDAM with a reward curriculum
    parauni import-openuni CKPT --preset P --out D  an OpenUni / ParaUni .pth checkpoint as a model folder
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

Commands take ``--section.key=value`` overrides of the model config, ``--train.key=value`` of the training
config, ``--rl.key=value`` / ``--rewards.key=value`` of Stage III and ``--world.key=value`` of the world config
(unknown keys are errors).

Every command checks its inputs and its output location before it loads a model or computes anything, and
replaces nothing already there without ``--overwrite`` (resumable commands continue what their ``--out``
holds instead; ``train`` / ``rl`` take ``--resume`` for that). A user's mistake is answered in one line that
names the value and the fix (exit status 2); a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError

OVERRIDE_HELP = "config overrides as --section.key=value (e.g. --lim.layers=last --sampling.steps=10)"


def top_level_keys() -> tuple[str, ...]:
    """The model config's keys outside any section (``seed``, ``name``): overrides without a dot."""
    import dataclasses

    from .config import ModelConfig, field_type

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


def _fmt(n: int) -> str:
    return f"{n:>15,}" + (f" ({n / 1e9:.2f}B)" if n >= 1e8 else f" ({n / 1e6:.2f}M)" if n >= 1e5 else "")


def _looks_like_path(source: str) -> bool:
    """Whether a --model value is meant as a path (a folder or a YAML file) rather than a preset name."""
    return (
        "/" in source or "\\" in source or source.startswith((".", "~")) or source.endswith((".yaml", ".yml"))
    )


def model_config(source: str, overrides: list[str]):
    """The ModelConfig of a model folder (its config.yaml) or a preset name / YAML file, without weights."""
    from .config import ModelConfig, apply_overrides, from_dict, list_presets, load_model_config, load_yaml
    from .models.parauni import CONFIG_FILE

    path = Path(source).expanduser()
    if not path.exists() and _looks_like_path(source):
        raise ConfigError(
            f"--model {source}: the folder does not exist; give a model folder (config.yaml + weights), "
            f"a YAML file or a preset name ({', '.join(list_presets())})"
        )
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} has no {CONFIG_FILE}; it is not a ParaUni model folder")
        return from_dict(
            ModelConfig, apply_overrides(load_yaml(path / CONFIG_FILE), overrides, schema=ModelConfig)
        )
    return load_model_config(source, overrides)


def load_model(source: str, overrides: list[str], meta: bool = False):
    """A ParaUni model from a model folder (config.yaml + weights) or a preset name / YAML file."""
    from .models.parauni import ParaUni

    path = Path(source).expanduser()
    if path.is_dir() and not meta:
        model = ParaUni.from_pretrained(path, overrides)
    else:
        model = ParaUni.from_config(
            model_config(source, overrides), root=path if path.is_dir() else None, meta=meta
        )
    return model if meta else model.to(default_device())


def default_device() -> str:
    """``$PARAUNI_DEVICE`` if set, else ``cuda`` when a GPU is visible, else ``cpu`` (:mod:`parauni.utils.device`)."""
    from .utils.device import default_device as device

    return device()


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from .utils.files import check_output_file

    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    model = load_model(args.model, overrides, meta=not args.load)
    cfg = model.config
    vlm, dit = model.vlm, model.dit
    lim = cfg.lim
    print(
        f"ParaUni model '{cfg.name}'"
        + ("" if args.load else "  (structure on the meta device; no weights loaded)")
    )
    print(
        f"  VLM      {cfg.vlm.kind}: {cfg.vlm.path or 'built from arch'}; {vlm.num_layers} decoder layers, width {vlm.hidden_size}"
    )
    print(f"  queries  Q = {lim.num_queries}")
    connector = (
        f"connector {lim.connector_layers} x {lim.connector_hidden or vlm.hidden_size} ({lim.connector_heads} heads)"
        if lim.use_connector
        else "no connector"
    )
    print(
        f"  LIM      layers '{lim.layers}': {len(model.lim.layers)} of {vlm.num_layers} {model.lim.layers}; {connector}; "
        f"LayerNorm {'on' if lim.use_layernorm else 'off'}; -> caption_channels {dit.config.caption_channels}"
    )
    dc = dit.config
    print(
        f"  DiT      SanaTransformer2DModel: {cfg.dit.path or 'built from arch'}; {dc.num_layers} layers, width "
        f"{dc.num_attention_heads * dc.attention_head_dim}, patch {dc.patch_size}, {dc.in_channels} channels"
    )
    vae = (
        "none (pixel space)"
        if model.vae is None
        else f"AutoencoderDC f{model.latent_factor}c{model.vae.config.latent_channels}: {cfg.vae.path or 'built from arch'}"
    )
    print(f"  VAE      {vae}")
    print(
        f"  sampling {cfg.sampling.sampler}, {cfg.sampling.steps} steps, CFG {cfg.sampling.cfg}, {cfg.sampling.height}x{cfg.sampling.width}"
    )
    counts = model.parameter_counts()
    print(f"\n  {'component':<10}{'trainable':>28}{'frozen':>28}")
    total_t = total_f = 0
    for name, c in counts.items():
        print(f"  {name:<10}{_fmt(c['trainable']):>28}{_fmt(c['frozen']):>28}")
        total_t += c["trainable"]
        total_f += c["frozen"]
    print(f"  {'total':<10}{_fmt(total_t):>28}{_fmt(total_f):>28}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "name": cfg.name,
                    "num_layers": vlm.num_layers,
                    "num_queries": lim.num_queries,
                    "parameters": counts,
                },
                indent=2,
            )
        )
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from .utils.files import read_lines

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        for i, line in enumerate(read_lines(path, "--prompts-file"), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(f"{path}:{i} is not a JSON object with a 'prompt' key") from err
            else:
                prompts.append(line.strip())
    return prompts


def _image_files(spec: str) -> list[Path]:
    """The --image input: one image file, or the image files of a folder (sorted)."""
    from .training.data import IMAGE_SUFFIXES
    from .utils.images import ImageReadError

    path = Path(spec)
    if not path.exists():
        raise ImageReadError(f"--image {path} does not exist; give an image file or a folder of images")
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    )
    if not files:
        raise ImageReadError(f"--image folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_images(files: list[Path], height: int, width: int):
    """(N, 3, height, width) in [-1, 1]: each file resized and centre-cropped."""
    import torch

    from .utils.images import pil_to_tensor, read_image, resize_center_crop

    return torch.stack([pil_to_tensor(resize_center_crop(read_image(f), height, width)) for f in files])


def output_paths(out: str, n: int, overwrite: bool = False) -> list[Path]:
    """Where ``parauni generate`` writes its ``n`` images, checked before anything is generated.

    ``--out`` with an image suffix (.png, .jpg, .jpeg, .webp, .bmp) is a file (``stem_0000.png``, ... for
    several images), in that format; a path without a suffix, or ending in ``/``, is a folder of
    ``0000.png``, ... Nothing existing is replaced without ``overwrite``.
    """
    from .training.data import IMAGE_SUFFIXES
    from .utils.files import OutputPathError, check_output_dir, check_output_file

    path = Path(out)
    is_folder = out.endswith(("/", "\\")) or path.is_dir() or not path.suffix
    if not is_folder and path.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputPathError(
            f"--out {out}: {path.suffix} is not an image type this command writes; end the file name in "
            f"{', '.join(IMAGE_SUFFIXES)}, or give a folder (end it with / if its name has a dot)"
        )
    if is_folder:
        check_output_dir(path, resumable=True)
        paths = [path / f"{i:04d}.png" for i in range(n)]
    else:
        paths = [path] if n == 1 else [path.with_name(f"{path.stem}_{i:04d}{path.suffix}") for i in range(n)]
    for p in paths:
        if p.exists() and not overwrite:
            more = f" (and {n - 1} more name(s) like it)" if n > 1 else ""
            raise OutputPathError(
                f"--out: {p}{more} already exists; pass --overwrite to replace it or choose another --out"
            )
        if not is_folder:
            check_output_file(p, overwrite=overwrite)
    return paths


def _check_sampling_args(args: argparse.Namespace) -> None:
    """--steps, --cfg, --seed, --batch-size (and --height / --width where the command has them), before any
    work: one-line errors naming the value and the allowed range."""
    from .pipeline import check_cfg

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
    if args.seed < 0:
        raise ConfigError(f"--seed {args.seed} must be >= 0")


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pipeline import generate
    from .utils.images import tensor_to_pil

    # every input and the output location first: nothing is loaded or generated before they pass
    prompts = _read_prompts(args)
    if args.image is None and not prompts:
        raise ConfigError("nothing to generate: give --prompt TEXT, --prompts-file FILE or --image IN")
    if args.image is not None and prompts:
        raise ConfigError("--image (image-to-image) and --prompt / --prompts-file exclude each other")
    _check_sampling_args(args)
    files = None if args.image is None else _image_files(args.image)
    paths = output_paths(args.out, len(files) if files else len(prompts), args.overwrite)
    s = model_config(args.model, overrides).sampling
    height, width = args.height or s.height, args.width or s.width
    images = None if files is None else _read_images(files, height, width)
    model = load_model(args.model, overrides)
    model.check_size(height, width)
    pixels = generate(
        model,
        prompts or None,
        images,
        steps=args.steps,
        cfg=args.cfg,
        sampler=args.sampler,
        seed=args.seed,
        height=height,
        width=width,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for x, p in zip(pixels, paths, strict=True):
        tensor_to_pil(x).save(p)
    print(f"wrote {len(paths)} image(s): {paths[0]}" + (f" ... {paths[-1]}" if len(paths) > 1 else ""))
    return 0


def _route(overrides: list[str], prefix: str) -> tuple[list[str], list[str]]:
    """Split overrides into those under ``prefix.`` (prefix removed) and the rest."""
    mine = [o[len(prefix) + 3 :] for o in overrides if o.startswith(f"--{prefix}.")]
    rest = [o for o in overrides if not o.startswith(f"--{prefix}.")]
    return mine, rest


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from .utils.files import check_output_dir
    from .world.demo import run_demo

    world, rest = _route(overrides, "world")
    if rest:
        raise ConfigError(f"parauni demo takes --world.* overrides only, got {rest}")
    out = Path(args.out)
    earlier_report = (out / "report.md").is_file() or (out / "metrics.json").is_file()
    check_output_dir(out, overwrite=args.overwrite, resumable=earlier_report)
    run_demo(
        args.out, args.cache, quick=args.quick, overrides=world, progress=not args.quiet, stage0=args.stage0
    )
    return 0


def cmd_world_pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from .world.release import run_pretrain

    world, rest = _route(overrides, "world")
    if rest:
        raise ConfigError(f"parauni world pretrain takes --world.* overrides only, got {rest}")
    phases = args.phases.split(",") if args.phases else None
    run_pretrain(args.out, world, phases, recipe=not args.no_recipe, progress=not args.quiet)
    return 0


def cmd_reproduce(args: argparse.Namespace, overrides: list[str]) -> int:
    from .utils.files import check_output_dir
    from .world.reproduce import run_reproduce

    world, rest = _route(overrides, "world")
    if rest:
        raise ConfigError(f"parauni reproduce takes --world.* overrides only, got {rest}")
    check_output_dir(args.out, resumable=True)  # a rerun continues the table
    run_reproduce(
        args.out,
        seeds=args.seeds,
        rows=args.rows,
        cache_dir=args.cache,
        quick=args.quick,
        overrides=world,
        analyses=not args.no_analyses,
        progress=not args.quiet,
        stage0=args.stage0,
    )
    return 0


RUN_FILES = ("checkpoints", "model.safetensors", "config.yaml", "train_log.jsonl", "rl_log.jsonl")


def check_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """The --out of ``train`` / ``rl``: a new or empty folder; one holding a run needs --resume (continue)
    or --overwrite (start over: its checkpoints are deleted first, by the launcher's first process)."""
    import os
    import shutil

    from .utils.files import OutputPathError, check_output_dir

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
    if overwrite and (path / "checkpoints").is_dir() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(path / "checkpoints")


def model_image_size(config) -> int:
    """The square training size a model config implies: its sampling size (which training then keeps)."""
    height, width = config.sampling.height, config.sampling.width
    if height != width:
        raise ConfigError(
            f"the model samples {height}x{width} images but training images are square; give --image-size"
        )
    return height


def check_resumable(out: str) -> int:
    """The step ``--resume`` continues from: that of the newest complete checkpoint in ``out``, else an error."""
    from .training.checkpoint import STATE_FILE, intact_checkpoint

    ckpt = intact_checkpoint(Path(out), "step", say=lambda _: None)  # train says which one it takes
    if ckpt is None:
        raise ConfigError(
            f"--resume: {out} holds no checkpoint to continue from (they are written every train.save_every "
            "steps); run without --resume (and with --overwrite to replace what the folder holds)"
        )
    return int(json.loads((ckpt / STATE_FILE).read_text())["step"])


def trim_train_log(out: str, start: int) -> None:
    """Drop the log rows of steps >= ``start`` (a killed run logged them after its last checkpoint), so a
    resumed run's log holds every step once."""
    import os

    from .training.checkpoint import TRAIN_LOG

    log = Path(out) / TRAIN_LOG
    if log.is_file() and int(os.environ.get("RANK", "0")) == 0:  # the launcher's first process writes the log
        kept = [line for line in log.read_text().splitlines() if line and json.loads(line)["step"] < start]
        log.write_text("".join(line + "\n" for line in kept))


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import apply_overrides
    from .training.config import stage_config
    from .training.latents import LatentShardSource, check_latents_fit, encoder_key
    from .training.sources import DataOptions, data_kind, training_source
    from .training.teacher import lm_teacher
    from .training.trainer import train

    train_items, model_overrides = _route(overrides, "train")
    train_dict = apply_overrides({}, train_items)
    if args.image_size:
        train_dict["image_size"] = args.image_size
    kind = data_kind(args.data)
    stage_config(args.stage, train_dict)  # the training config's errors before any data is read
    config = model_config(args.model, model_overrides)  # and the model config's
    check_run_folder(args.out, args.resume, args.overwrite)
    start = check_resumable(args.out) if args.resume else 0
    options = DataOptions(args.image_column, args.caption_column, args.shards_per_group)
    latents = LatentShardSource(args.data, args.shards_per_group) if kind == "latents" else None
    if latents is not None:  # extracted latents fix the image size
        train_dict.setdefault("image_size", latents.image_size)
    train_dict.setdefault("image_size", model_image_size(config))
    cfg = stage_config(args.stage, train_dict)
    model = load_model(args.model, model_overrides)
    model.check_size(cfg.image_size, cfg.image_size)
    # the model folder samples at the size it was trained at
    model.config.sampling.height = model.config.sampling.width = cfg.image_size
    key = encoder_key(model.vae)
    if latents is not None:
        shape = model.latent_shape(cfg.image_size, cfg.image_size)
        check_latents_fit(latents, shape, cfg.image_size, key)
        source = latents
    else:
        source = training_source(
            args.data,
            cfg.image_size,
            encode=model.encode_images,
            cache_key=key,
            options=options,
            progress=not args.quiet,
            cache_dir=args.cache_dir,
        )
    uncaptioned = len(getattr(source, "uncaptioned", ()))
    print(
        f"data ({kind}): {len(source)} image-caption pairs from {args.data}"
        + (f"; skipped {len(source.skipped)} unreadable or corrupt sample(s)" if source.skipped else "")
        + (f"; left out {uncaptioned} image(s) without a caption" if uncaptioned else "")
        + f"; training at {cfg.image_size} px"
    )
    if args.resume:
        trim_train_log(args.out, start)
    before = len(source.skipped)
    captions = getattr(source, "captions", None)  # the teacher standardises over them
    teacher = lm_teacher(model, seed=cfg.seed, captions=captions) if cfg.condition_distill > 0 else None
    result = train(model, source, cfg, args.out, resume=args.resume, progress=not args.quiet, teacher=teacher)
    more = len(source.skipped) - before
    done = f"{result.steps} steps" if start == 0 else f"steps {start}-{result.steps} of {result.steps}"
    print(
        f"stage {args.stage}: {done} in {result.seconds:.1f} s, final loss {result.final_loss:.4f}; "
        f"model written to {result.model_dir}"
        + (f"; skipped {more} more corrupt sample(s) while streaming" if more else "")
    )
    return 0


def cmd_extract_latents(args: argparse.Namespace, overrides: list[str]) -> int:
    from accelerate import Accelerator

    from .training.latents import extract_latents, finish_extraction, vae_encoder
    from .training.sources import DataOptions, pixel_source
    from .utils.files import check_output_dir

    check_output_dir(args.out, resumable=True)  # a rerun with the same options resumes
    config = model_config(args.model, overrides)
    root = Path(args.model) if Path(args.model).is_dir() else None
    size = args.image_size or config.sampling.height
    acc = Accelerator()  # the processes of accelerate launch / torchrun (on CPUs: ACCELERATE_USE_CPU=true)
    source = pixel_source(args.data, size, DataOptions(args.image_column, args.caption_column))
    encode, key = vae_encoder(config, root, acc.device)
    result = extract_latents(
        source,
        encode,
        args.out,
        image_size=size,
        encoder_key=key,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        dtype=args.dtype,
        rank=acc.process_index,
        world=acc.num_processes,
        progress=not args.quiet,
    )
    print(
        f"process {acc.process_index + 1} of {acc.num_processes}: wrote {result.written} shard(s), "
        f"{result.reused} already done, skipped {result.skipped} corrupt sample(s)"
    )
    acc.wait_for_everyone()
    if acc.is_main_process:
        manifest = finish_extraction(args.out)
        print(
            f"latents of {sum(manifest['sizes'])} samples ({len(manifest['skipped'])} corrupt skipped) at "
            f"{size} px, shape {manifest['latent_shape']}, in {manifest['num_shards']} shard(s) in {args.out}; "
            f"train with parauni train --data {args.out}"
        )
    return 0


def build_rewards(cfg) -> dict:
    """The reward models a :class:`~parauni.rl.config.RewardsConfig` names, by reward name."""
    from .rl.rewards import Aesthetic, CLIPScore, PickScore

    out = {}
    if cfg.world:
        from .world.reward_models import world_rewards

        out.update(world_rewards(cfg.world, batch_size=cfg.batch_size))
    if cfg.pickscore:
        out["pickscore"] = PickScore.from_pretrained(cfg.pickscore, cfg.pickscore_processor, cfg.batch_size)
    if cfg.aesthetic_mlp:
        out["aesthetic"] = Aesthetic.from_pretrained(
            cfg.aesthetic_mlp, cfg.aesthetic_clip, batch_size=cfg.batch_size
        )
    if cfg.clip:
        out["clip"] = CLIPScore.from_pretrained(cfg.clip, cfg.batch_size)
    if not out:
        raise ConfigError(
            "no reward model is configured: give --rewards.pickscore / --rewards.aesthetic_mlp / --rewards.clip "
            "(local folders or Hugging Face ids), or --world for the shapes world's rewards"
        )
    return out


def cmd_rl(args: argparse.Namespace, overrides: list[str]) -> int:
    import dataclasses

    from .config import apply_overrides, from_dict, load_yaml
    from .rl.config import RewardsConfig, RLConfig
    from .rl.grpo import PromptSource, WorldPromptSource, train_rl
    from .rl.rewards import CombinedReward

    rl_items, rest = _route(overrides, "rl")
    reward_items, model_overrides = _route(rest, "rewards")
    check_run_folder(args.out, args.resume, args.overwrite)
    rl_dict, rewards_dict = {}, {}
    model_dir = args.model
    if args.world:
        from .world.release import existing_stage0
        from .world.rl import world_rl_config

        wcfg, stage0 = existing_stage0("scratch" if args.cache else args.stage0, args.cache)
        rl_dict = dataclasses.asdict(world_rl_config(wcfg.rl, wcfg.image_size))
        rewards_dict = {"world": str(stage0)}
        model_dir = model_dir or "parauni-demo/stage2"
    if not model_dir:
        raise ConfigError("parauni rl needs --model DIR (a Stage-II model folder), or --world")
    if args.config:
        data = load_yaml(args.config)
        unknown = sorted(set(data) - {"rl", "rewards"})
        if unknown:
            raise ConfigError(
                f"{args.config}: unknown section(s) {unknown}; an RL config has 'rl' and 'rewards'"
            )
        rl_dict = {**rl_dict, **data.get("rl", {})}
        rewards_dict = {**rewards_dict, **data.get("rewards", {})}
    cfg = from_dict(RLConfig, apply_overrides(rl_dict, rl_items), prefix="rl.")
    rewards_cfg = from_dict(RewardsConfig, apply_overrides(rewards_dict, reward_items), prefix="rewards.")
    if args.prompts:
        prompts = PromptSource.from_file(args.prompts)
    elif args.world:
        prompts = WorldPromptSource()
    else:
        raise ConfigError("parauni rl needs --prompts FILE (.txt or GenEval-style .jsonl), or --world")
    model = load_model(model_dir, model_overrides)
    rewards = build_rewards(rewards_cfg)
    combined = CombinedReward(rewards, {name: 1.0 for name in rewards})
    print(
        f"RL: {cfg.total_epochs} epochs over phases "
        + ", ".join(f"{p.name} ({p.epochs} epochs, {p.rewards}, zone {p.zone})" for p in cfg.phases)
        + f"; rewards available: {sorted(rewards)}"
    )
    result = train_rl(
        model,
        lambda images, prompts_, metadata: combined(images, prompts_, metadata)[1],
        list(rewards),
        prompts,
        cfg,
        args.out,
        resume=args.resume,
        progress=not args.quiet,
    )
    first, last = result.history[0], result.history[-1]
    for key in sorted(k for k in last if k.startswith("reward_") and not k.endswith("_std")):
        print(f"{key[len('reward_') :]}: first epoch {first[key]:.4f} -> last epoch {last[key]:.4f}")
    print(
        f"LDAM triggers: {sum(bool(r.get('ldam_triggered')) for r in result.history)}; log {result.log_path}"
    )
    return 0


def cmd_import_openuni(args: argparse.Namespace, overrides: list[str]) -> int:
    from .config import load_model_config
    from .models.openuni import import_openuni
    from .utils.files import check_output_dir

    if not Path(args.checkpoint).is_file():
        raise ConfigError(
            f"checkpoint {args.checkpoint} does not exist; give the OpenUni / ParaUni .pth file"
        )
    check_output_dir(args.out, overwrite=args.overwrite)
    config = load_model_config(args.preset, overrides)
    model = import_openuni(args.checkpoint, config, args.out, layers=args.layers)
    print(
        f"imported {args.checkpoint}: layers '{model.config.lim.layers}', LayerNorm "
        f"{'on' if model.config.lim.use_layernorm else 'off'}, DiT {'fine-tuned' if model.config.trainable.dit else 'from the preset'}; "
        f"written to {args.out}"
    )
    return 0


def _geneval_detector(args: argparse.Namespace):
    """The (detector, classify_colors) pair named by --detector, --detections, --detector-model, --clip."""
    from .eval.geneval import PrecomputedDetections, world_detector

    if args.detector is None:
        raise ConfigError(
            "give --detector world (the shapes world), --detector mask2former (GenEval's detector) or "
            "--detector file --detections FILE"
        )
    if args.detector != "mask2former" and (args.detector_model or args.clip):
        raise ConfigError(f"--detector-model / --clip go with --detector mask2former, not {args.detector}")
    if args.detector == "mask2former":
        from .eval.geneval_mask2former import (
            CLIP_L14,
            MASK2FORMER_REPO,
            CLIPColorClassifier,
            Mask2FormerDetector,
        )

        if args.detections:
            raise ConfigError("--detections FILE goes with --detector file, not --detector mask2former")
        detector = Mask2FormerDetector.from_pretrained(args.detector_model or MASK2FORMER_REPO)
        return detector, CLIPColorClassifier.from_pretrained(args.clip or CLIP_L14)
    if args.detector == "world":
        if args.detections:
            raise ConfigError("--detections FILE goes with --detector file, not --detector world")
        return world_detector()
    if not args.detections:
        raise ConfigError("--detector file needs --detections FILE (a JSONL of precomputed detections)")
    detections = PrecomputedDetections(args.detections)
    return detections, detections.classify_colors


def _score_and_print(args: argparse.Namespace, images: str, out: Path, pair: tuple | None = None) -> None:
    """Score `images` with `pair` (detector, classify_colors), by default the one the arguments name."""
    from .eval.geneval import format_summary, score_geneval, world_classes

    detector, classify_colors = pair or _geneval_detector(args)
    if args.detector == "world":
        classes = world_classes()
    elif args.detector == "mask2former":
        from .eval.geneval_mask2former import GENEVAL_OBJECTS

        classes = GENEVAL_OBJECTS
    else:  # precomputed detections: the detector that made them is not known here
        classes = None
    summary = score_geneval(images, detector, classify_colors, out, classes=classes, progress=not args.quiet)
    print(format_summary(summary))
    print(f"per-image results: {out}; summary: {out.parent / 'summary.json'}")


def cmd_eval_geneval(args: argparse.Namespace, overrides: list[str]) -> int:
    from .eval.geneval import generate_geneval
    from .utils.files import check_output_dir, read_lines
    from .world.captions import read_metadata

    if args.no_score and (args.detector or args.detections or args.detector_model or args.clip):
        raise ConfigError(
            "--no-score skips scoring; drop --detector / --detections / --detector-model / --clip"
        )
    _check_sampling_args(args)
    check_output_dir(args.out, resumable=True)  # a rerun completes the prompts not yet generated
    # Load the detector before spending time on generation (its errors come first).
    pair = None if args.no_score else _geneval_detector(args)
    metadata = Path(args.metadata)
    if not metadata.is_file():
        raise ConfigError(f"--metadata {metadata} does not exist; give GenEval's evaluation_metadata.jsonl")
    read_lines(metadata, "--metadata")  # a line that is not UTF-8 is named before the rows are parsed
    rows = read_metadata(metadata)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit {args.limit} must be >= 1")
        rows = rows[: args.limit]
    model = load_model(args.model, overrides)
    counts = generate_geneval(
        model,
        rows,
        args.out,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        cfg=args.cfg,
        progress=not args.quiet,
    )
    print(
        f"GenEval: {counts['generated']} prompt(s) generated, {counts['skipped']} already complete, "
        f"{args.images_per_prompt} image(s) each, in {args.out}"
    )
    if pair is not None:
        _score_and_print(args, args.out, Path(args.out) / "results.jsonl", pair)
    return 0


def cmd_eval_geneval_score(args: argparse.Namespace, overrides: list[str]) -> int:
    from .utils.files import check_output_file

    if overrides:
        raise ConfigError(f"parauni eval geneval-score takes no config overrides, got {overrides}")
    check_output_file(args.out, overwrite=args.overwrite)
    _score_and_print(args, args.images, Path(args.out))
    return 0


def _dpg_questions(args: argparse.Namespace):
    """The parsed --csv and the checked --vqa source (both needed to score)."""
    from .eval.dpg import check_vqa_source, read_dpg_csv

    if not (args.csv and args.vqa):
        raise ConfigError(
            "scoring needs --csv dpg_bench.csv (ELLA's question file) and --vqa PATH_OR_ID "
            "(a BLIP VQA model folder or id, e.g. Salesforce/blip-vqa-base)"
        )
    return read_dpg_csv(args.csv), check_vqa_source(args.vqa)


def _dpg_score_and_print(
    args: argparse.Namespace, items: dict, vqa_source: str, images: str, out: Path
) -> None:
    import torch

    from .eval.dpg import BlipVQA, format_dpg_summary, score_dpg

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqa = BlipVQA.from_pretrained(vqa_source, device=device)
    summary = score_dpg(images, items, vqa, out, category_crops=args.category_crops, progress=not args.quiet)
    print(format_dpg_summary(summary))
    if summary["unscored"]:
        print(f"{summary['unscored']} prompt(s) of {args.csv} have no grid in {images} and were not scored")
    print(f"per-prompt results: {out}; summary: {out.parent / 'summary.json'}")


def cmd_eval_dpg(args: argparse.Namespace, overrides: list[str]) -> int:
    from .eval.dpg import RESULTS_FILE, generate_dpg, read_dpg_prompts
    from .utils.files import check_output_dir

    _check_sampling_args(args)
    check_output_dir(args.out, resumable=True)  # a rerun completes the grids not yet generated
    if args.no_score and (args.csv or args.vqa):
        raise ConfigError("--no-score skips scoring; drop --csv / --vqa")
    # Check the scoring inputs before spending time on generation.
    items, vqa_source = (None, None) if args.no_score else _dpg_questions(args)
    prompts = read_dpg_prompts(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit {args.limit} must be >= 1")
        prompts = prompts[: args.limit]
    s = model_config(args.model, overrides).sampling
    height, width = args.height or s.height, args.width or s.width
    model = load_model(args.model, overrides)
    model.check_size(height, width)
    counts = generate_dpg(
        model,
        prompts,
        args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        cfg=args.cfg,
        height=height,
        width=width,
        progress=not args.quiet,
    )
    del model  # free the generator before the VQA model loads
    print(
        f"DPG-Bench: {counts['generated']} grid(s) generated, {counts['skipped']} already there, in {args.out}"
    )
    if not args.no_score:
        _dpg_score_and_print(args, items, vqa_source, args.out, Path(args.out) / RESULTS_FILE)
    return 0


def cmd_eval_dpg_score(args: argparse.Namespace, overrides: list[str]) -> int:
    from .utils.files import check_output_file

    if overrides:
        raise ConfigError(f"parauni eval dpg-score takes no config overrides, got {overrides}")
    check_output_file(args.out, overwrite=args.overwrite)
    items, vqa_source = _dpg_questions(args)
    _dpg_score_and_print(args, items, vqa_source, args.images, Path(args.out))
    return 0


def _model_names(sources: list[str]) -> list[str]:
    """Output folder names: each model's folder (or preset) name, prefixed by its index if names repeat."""
    names = [Path(s).name or s for s in sources]
    if len(set(names)) == len(names):
        return names
    return [f"{i}_{name}" for i, name in enumerate(names)]


def cmd_eval_reconstruct(args: argparse.Namespace, overrides: list[str]) -> int:
    from .eval.reconstruct import read_image_folder, reconstruct_folder, side_by_side
    from .rl.rewards import CLIPEmbedder
    from .utils.files import check_output_dir

    _check_sampling_args(args)
    check_output_dir(args.out, overwrite=args.overwrite)
    images = Path(args.images)
    if not images.is_dir():
        raise ConfigError(f"--images {images} is not a folder")
    # Fail on an empty / unreadable folder before loading any model (the size does not matter here).
    read_image_folder(images, 8, 8)
    clip = CLIPEmbedder.from_pretrained(args.clip, text=False) if args.clip else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, columns = [], {}
    for name, source in zip(_model_names(args.model), args.model, strict=True):
        model = load_model(source, overrides)
        result = reconstruct_folder(
            model,
            images,
            out / name,
            image_size=args.image_size,
            batch_size=args.batch_size,
            seed=args.seed,
            steps=args.steps,
            cfg=args.cfg,
            clip=clip,
            progress=not args.quiet,
        )
        columns.setdefault("input", result.inputs)
        columns[name] = result.outputs
        summary.append(
            {
                "name": name,
                "model": source,
                "lim_layers": model.config.lim.layers,
                "dir": str(out / name),
                "num_images": result.metrics["num_images"],
                "mean": result.metrics["mean"],
            }
        )
        del model  # one model in memory at a time
    if result.skipped:
        print(
            f"skipped {len(result.skipped)} unreadable file(s): "
            + ", ".join(s["file"] for s in result.skipped)
        )
    figure = side_by_side(columns, out / "side_by_side.png")
    (out / "reconstruct.json").write_text(
        json.dumps(
            {"images": str(images), "skipped": result.skipped, "models": summary, "figure": str(figure)},
            indent=2,
        )
    )

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    print(f"{'model':<24}{'images':>8}{'PSNR':>10}{'SSIM':>10}{'CLIP sim':>10}")
    for row in summary:
        m = row["mean"]
        print(
            f"{row['name']:<24}{row['num_images']:>8}{cell(m['psnr']):>10}{cell(m['ssim']):>10}"
            f"{cell(m.get('clip_similarity')):>10}"
        )
    print(
        f"reconstructions and metrics.json per model in {out}; figure {figure}; summary {out / 'reconstruct.json'}"
    )
    return 0


def _analysis_prompts(args: argparse.Namespace) -> tuple[list[str], list[dict] | None]:
    """Prompts (and GenEval metadata rows, when known) for ``parauni analyze``."""
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ConfigError(
                f"--prompts {path} does not exist; give a .txt (one a line) or a GenEval .jsonl"
            )
        if path.suffix == ".jsonl":
            from .world.captions import read_metadata

            rows = read_metadata(path)
            prompts, metadata = [r["prompt"] for r in rows], rows
        else:
            from .utils.files import read_lines

            prompts = [line.strip() for line in read_lines(path, "--prompts") if line.strip()]
            metadata = None
    elif args.world:
        from .world.captions import make_eval_metadata

        metadata = make_eval_metadata(per_tag=2)
        prompts = [r["prompt"] for r in metadata]
    else:
        raise ConfigError("give --prompts FILE (or --world for the shapes world's evaluation prompts)")
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError(f"--limit {args.limit} must be >= 1")
        prompts = prompts[: args.limit]
        metadata = None if metadata is None else metadata[: args.limit]
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts} holds no prompts")
    return prompts, metadata


def cmd_analyze_layers(args: argparse.Namespace, overrides: list[str]) -> int:
    from .analysis.layers import analyze_layers, format_tables

    if args.world == bool(args.clip):
        raise ConfigError(
            "give exactly one reward source: --world (the shapes world's rewards) or --clip PATH_OR_ID"
        )
    from .utils.files import check_output_dir

    _check_sampling_args(args)
    check_output_dir(args.out, overwrite=args.overwrite)
    if args.cache and not args.world:
        raise ConfigError("--cache is the shapes world's Stage-0 cache; it needs --world")
    prompts, metadata = _analysis_prompts(args)
    if args.world:
        from .world.release import existing_stage0
        from .world.reward_models import world_rewards

        rewards = world_rewards(existing_stage0("scratch" if args.cache else args.stage0, args.cache)[1])
        if metadata is None:  # the GenEval-style reward needs metadata rows
            rewards.pop("geneval")
    else:
        from .rl.rewards import CLIPScore

        rewards = {"clip": CLIPScore.from_pretrained(args.clip)}
    model = load_model(args.model, overrides)
    for reward in rewards.values():
        reward.to(model.device)
    result = analyze_layers(
        model,
        prompts,
        metadata,
        rewards,
        args.out,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(format_tables(result))
    print(f"numbers in {Path(args.out) / 'analysis.json'}; figures " + ", ".join(result["figures"].values()))
    return 0


def cmd_serve(args: argparse.Namespace, overrides: list[str]) -> int:
    from .serve import SETTING_FLAGS, ServeSettings, build_app, launch, load_served

    settings = ServeSettings(**{field: getattr(args, field) for field in SETTING_FLAGS})
    served = load_served(args.model or [], overrides, args.demo_dir)
    print(f"serving {', '.join(served.models)} on http://{settings.host}:{settings.port} (Ctrl+C stops)")
    launch(build_app(served, settings), settings)
    return 0


OVERWRITE_RUN_HELP = "start over in an --out that holds a run (its checkpoints/ are deleted first)"

DATA_HELP = (
    "a JSONL file of {image, caption} lines (image paths relative to the file); a folder with such JSONL "
    "files or image + .txt pairs; a folder of webdataset .tar shards, a "
    ".tar path or a shard pattern ('data/shard-{000000..000099}.tar', 'data/*.tar'); a Hugging Face dataset "
    "folder (save_to_disk, parquet or arrow; needs `datasets`); or extracted latents (parauni extract-latents)"
)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-column", default="image", help="Hugging Face datasets: the image column (default: image)"
    )
    p.add_argument(
        "--caption-column",
        default="caption",
        help="Hugging Face datasets: the caption column; tar shards: the caption key of KEY.json (default: caption)",
    )


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detector",
        choices=["mask2former", "world", "file"],
        help="mask2former: GenEval's detector (Mask2Former + CLIP colours); world: the shapes world's detector; "
        "file: precomputed detections from --detections",
    )
    p.add_argument(
        "--detections",
        help="with --detector file: a JSONL of {filename, detections} (see parauni.eval.geneval)",
    )
    p.add_argument(
        "--detector-model",
        help="with --detector mask2former: a Mask2Former COCO-instance folder or Hugging Face id "
        "(default: facebook/mask2former-swin-small-coco-instance)",
    )
    p.add_argument(
        "--clip",
        help="with --detector mask2former: the colour classifier's CLIP folder or Hugging Face id "
        "(default: openai/clip-vit-large-patch14)",
    )


def _add_dpg_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--csv", help="DPG-Bench's question file dpg_bench.csv (from the ELLA repository)")
    p.add_argument(
        "--vqa",
        help="the question answerer: a BLIP VQA folder or Hugging Face id (e.g. Salesforce/blip-vqa-base)",
    )
    p.add_argument(
        "--category-crops",
        choices=["last", "all"],
        default="last",
        help="category scores pool the raw answers of the last crop (the official scorer) or of all 4",
    )
    p.add_argument("--device", help="device of the VQA model (default: cuda if available, else cpu)")


def _add_sampling_args(
    p: argparse.ArgumentParser, seed_help: str = "image i uses noise seed seed + i"
) -> None:
    """--steps, --cfg, --seed and --batch-size: the sampling options of every command that generates."""
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--batch-size", type=int, default=4, help="images per model call")


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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parauni")
    except PackageNotFoundError:
        return "unknown (not installed)"


def train_epilog() -> str:
    """``parauni train --help``'s list of the --train.* keys with their per-stage defaults and meaning."""
    import dataclasses

    from .training.config import STAGE_DEFAULTS, TrainConfig

    lines = [
        "training settings as --train.key=value (e.g. --train.steps=2000 --train.batch_size=64 --train.lr=1e-4):"
    ]
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        staged = {stage: d[f.name] for stage, d in STAGE_DEFAULTS.items() if f.name in d}
        shown = ", ".join(f"{v} at stage {k}" for k, v in staged.items()) if staged else default
        lines.append(f"  --train.{f.name:<24} {f.metadata.get('help', '')} (default: {shown})")
    lines.append(
        "model settings as --section.key=value (e.g. --lim.layers=last); all keys: docs/configuration.md"
    )
    return "\n".join(lines)


def _add_world_stage0_args(p: argparse.ArgumentParser) -> None:
    """--stage0 / --cache of the commands whose --world reads the world's Stage-0 models."""
    p.add_argument(
        "--stage0",
        default="release",
        help="with --world: the Stage-0 models ('release' = shipped, default; 'scratch' = `parauni demo --stage0 "
        "scratch`'s; a release folder or Hub id)",
    )
    p.add_argument("--cache", help="with --world: the scratch Stage-0 cache (implies --stage0 scratch)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="parauni", description="ParaUni: all-layer VLM conditioning for diffusion.")
    parser.add_argument("--version", action="version", version=f"parauni {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo",
        help="train and measure the whole pipeline on the embedded shapes world",
        epilog="world overrides as --world.section.key=value, e.g. --world.t2i.steps=500",
    )
    p.add_argument(
        "--out",
        default="parauni-demo",
        help="report folder; an earlier demo report there is replaced (default: parauni-demo)",
    )
    p.add_argument(
        "--stage0",
        default="release",
        help="the world's Stage-0 models: 'release' (shipped with the package, default), 'scratch' (train quick "
        "ones here, cached in --cache), a folder written by `parauni world pretrain`, or a Hub id",
    )
    p.add_argument(
        "--cache", help="with --stage0 scratch: its cache (default: $PARAUNI_CACHE or ~/.cache/parauni/world)"
    )
    p.add_argument("--quick", action="store_true", help="every stage for a few steps (smoke test)")
    p.add_argument(
        "--overwrite", action="store_true", help="write into an --out folder that holds other files"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser(
        "reproduce",
        help="the paper's ablation table on the shapes world (rows x seeds, resumable)",
        epilog="world overrides as --world.section.key=value, e.g. --world.eval.per_tag=20",
    )
    p.add_argument("--out", default="parauni-reproduce", help="output folder (rerun to continue)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per row (default 0 1 2)")
    p.add_argument(
        "--rows",
        nargs="+",
        help="only these rows (default: all): last_layer all_layers no_shallow no_middle no_deep interval "
        "no_layernorm rl_no_ldam ldam_no_grad_gate ldam_no_reward_gate full",
    )
    p.add_argument(
        "--stage0",
        default="release",
        help="the world's Stage-0 models: 'release' (shipped, default), 'scratch', a release folder or a Hub id",
    )
    p.add_argument("--cache", help="Stage-0 cache (default: as parauni demo)")
    p.add_argument("--quick", action="store_true", help="every stage for a few steps (smoke test)")
    p.add_argument(
        "--no-analyses", action="store_true", help="skip the reconstruction comparison and layer analyses"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_reproduce)

    p = sub.add_parser("world", help="the shapes world's own models")
    worlds = p.add_subparsers(dest="world_command", required=True)
    p = worlds.add_parser(
        "pretrain",
        help="train the world's Stage-0 models by the long recipe (resumable: rerun the same command)",
        epilog="world overrides as --world.section.key=value on top of the recipe, e.g. --world.t2i.steps=500",
    )
    p.add_argument("--out", required=True, help="the Stage-0 folder (a killed run resumes from it)")
    p.add_argument(
        "--phases",
        help="comma-separated subset of vlm,ae,t2i,rewards (default: all, then measured and finished as a "
        "release); two processes may train different phases into one --out at once",
    )
    p.add_argument(
        "--no-recipe",
        action="store_true",
        help="the world config's quick defaults instead of the long recipe",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_world_pretrain)

    p = sub.add_parser("train", help="Stage I / II on your own image-caption folder", epilog=train_epilog())
    p.add_argument("--stage", type=int, required=True, choices=[1, 2], help="1: queries + LIM; 2: + DiT")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--model",
        required=True,
        help="preset, YAML or model folder to start from (Stage II: Stage I's output)",
    )
    p.add_argument(
        "--out", required=True, help="run folder: the trained model, checkpoints/ and train_log.jsonl"
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="square training size, kept as the model's sampling size (default: train.image_size if given, "
        "else the model's sampling size; latents: theirs)",
    )
    _add_data_args(p)
    p.add_argument(
        "--shards-per-group",
        type=int,
        default=4,
        help="sharded data: shards whose samples are shuffled together (default: 4)",
    )
    p.add_argument(
        "--cache-dir",
        help="a folder of images: where their prepared inputs (VAE latents) are cached "
        "(default: .parauni_cache in the data folder)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_RUN_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "extract-latents",
        help="VAE latents of a data set in safetensors shards (run under accelerate launch to split the work)",
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--data", required=True, help="the images + captions, in any --data form of parauni train but latents"
    )
    p.add_argument("--model", required=True, help="preset, YAML or model folder whose VAE encodes the images")
    p.add_argument("--out", required=True, help="latents folder (rerun with the same options to resume)")
    p.add_argument("--image-size", type=int, help="square image size (default: the model's sampling size)")
    _add_data_args(p)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per latent shard (default: 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (default: 32)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="stored latent dtype"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_extract_latents)

    p = sub.add_parser(
        "rl",
        help="Stage III: Flow-GRPO with LDAM and a reward curriculum",
        epilog="overrides: --rl.key=value (e.g. --rl.group_size=8 --rl.ldam.enabled=false), "
        "--rewards.key=value (e.g. --rewards.clip=openai/clip-vit-large-patch14), and model overrides",
    )
    p.add_argument("--model", help="the Stage-II model folder (with --world: default parauni-demo/stage2)")
    p.add_argument("--out", required=True, help="run folder: the RL policy, checkpoints/ and rl_log.jsonl")
    p.add_argument("--config", help="a YAML file with 'rl' (RLConfig) and 'rewards' (RewardsConfig) sections")
    p.add_argument("--prompts", help="RL prompts: .txt (one a line) or .jsonl with 'prompt' (GenEval rows)")
    p.add_argument("--world", action="store_true", help="the shapes world: its prompts, rewards and defaults")
    _add_world_stage0_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_RUN_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_rl)

    p = sub.add_parser(
        "import-openuni", help="convert an OpenUni / ParaUni .pth checkpoint", epilog=OVERRIDE_HELP
    )
    p.add_argument("checkpoint", help="the .pth state dict (read with weights_only=True)")
    p.add_argument("--preset", default="paper", help="the components it was trained with (default: paper)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--layers", help="override the layer selection (default: all with its LayerNorm, else last)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.set_defaults(fn=cmd_import_openuni)

    p = sub.add_parser("info", help="components, layers, queries and parameter counts", epilog=OVERRIDE_HELP)
    p.add_argument("model", help="a preset name (paper, openuni_b, tiny, ...), a YAML file or a model folder")
    p.add_argument("--load", action="store_true", help="load real weights instead of a meta-device build")
    p.add_argument("--json", help="also write the counts to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("generate", help="text-to-image / image-to-image to PNG files", epilog=OVERRIDE_HELP)
    p.add_argument(
        "--model", required=True, help="a model folder (or a preset name for a random-weights smoke run)"
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument(
        "--prompts-file", help="a .txt file with one prompt per line, or a .jsonl with 'prompt' keys"
    )
    p.add_argument("--image", help="an input image or a folder of images (image-to-image)")
    p.add_argument(
        "--out",
        required=True,
        help="an image path (.png, .jpg, .webp, .bmp; name_0000.png ... for several images) or a folder "
        "(0000.png ...; end it with / if its name has a dot)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace images already at those paths")
    _add_sampling_args(p)
    p.add_argument("--sampler", choices=["dpm", "euler"], help="sampler (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "eval", help="benchmarks: GenEval and DPG-Bench generation and scoring, reconstruction"
    )
    evals = p.add_subparsers(dest="eval_command", required=True)
    p = evals.add_parser(
        "geneval",
        help="GenEval images in the official layout (resumable), then their scores",
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--model", required=True, help="a model folder (or a preset name for a random-weights smoke run)"
    )
    p.add_argument("--metadata", required=True, help="GenEval's evaluation_metadata.jsonl (or one like it)")
    p.add_argument(
        "--out", required=True, help="output folder: 00000/metadata.jsonl, 00000/samples/0000.png, ..."
    )
    p.add_argument("--images-per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    _add_sampling_args(p, "image j of prompt i uses seed + i * images-per-prompt + j")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--no-score", action="store_true", help="generate only")
    _add_detector_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_eval_geneval)

    p = evals.add_parser("geneval-score", help="score an existing GenEval image folder")
    p.add_argument("--images", required=True, help="a GenEval output folder (00000/metadata.jsonl, ...)")
    _add_detector_args(p)
    p.add_argument("--out", required=True, help="per-image results JSONL; summary.json is written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_eval_geneval_score)

    p = evals.add_parser(
        "dpg",
        help="DPG-Bench 2x2 grids <item_id>.png (resumable), then their VQA scores",
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--model", required=True, help="a model folder (or a preset name for a random-weights smoke run)"
    )
    p.add_argument("--prompts", required=True, help='DPG-Bench prompts: a JSONL of {"item_id", "prompt"}')
    p.add_argument(
        "--out", required=True, help="output folder: <item_id>.png grids, results.jsonl, summary.json"
    )
    _add_sampling_args(p, "image j of prompt i uses seed + i * 4 + j")
    p.add_argument("--height", type=int, help="height of each of the 4 images (default: the model's)")
    p.add_argument("--width", type=int, help="width of each of the 4 images (default: the model's)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--no-score", action="store_true", help="generate only")
    _add_dpg_score_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_eval_dpg)

    p = evals.add_parser("dpg-score", help="score an existing DPG-Bench folder of <item_id>.png grids")
    p.add_argument("--images", required=True, help="a folder of <item_id>.png 2x2 grids")
    _add_dpg_score_args(p)
    p.add_argument("--out", required=True, help="per-prompt results JSONL; summary.json is written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_eval_dpg_score)

    p = evals.add_parser(
        "reconstruct",
        help='image reconstruction ("Keep the image as it is."): PSNR, SSIM, CLIP similarity per model',
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model folder or preset (repeat to compare, e.g. a last-layer and an all-layer model)",
    )
    p.add_argument("--images", required=True, help="a folder of input images")
    p.add_argument(
        "--out",
        required=True,
        help="output folder: <model>/*.png + metrics.json, side_by_side.png, reconstruct.json",
    )
    p.add_argument(
        "--clip", help="a CLIP model folder or Hugging Face id for CLIP similarity (default: none)"
    )
    p.add_argument("--image-size", type=int, help="square size (default: each model's sampling size)")
    _add_sampling_args(p)
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_eval_reconstruct)

    p = sub.add_parser("analyze", help="analyses of a model: the role of each VLM layer")
    analyses = p.add_subparsers(dest="analyze_command", required=True)
    p = analyses.add_parser(
        "layers",
        help="per-layer conditioning scores, inter-layer similarity and zone removal (paper figs. 2, 4, 5)",
        epilog=OVERRIDE_HELP,
    )
    p.add_argument(
        "--model", required=True, help="a model folder (or a preset name for a random-weights smoke run)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: analysis.json, per_layer_scores.png, layer_similarity.png, zone_removal.png",
    )
    p.add_argument(
        "--prompts",
        help="a .txt (one prompt a line) or a GenEval metadata .jsonl (default with --world: its eval set)",
    )
    p.add_argument(
        "--world", action="store_true", help="the shapes world's rewards (aesthetic, clip, geneval)"
    )
    _add_world_stage0_args(p)
    p.add_argument("--clip", help="a CLIP model folder or Hugging Face id: CLIP score as the reward")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    _add_sampling_args(p, "image i uses noise seed seed + i (same for every run)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_analyze_layers)

    from .serve import add_serve_arguments

    p = sub.add_parser(
        "serve",
        help="a local web app: text-to-image, image-to-image, last layer vs all layers",
        epilog=OVERRIDE_HELP + " (applied to every served model)",
    )
    add_serve_arguments(p)
    p.set_defaults(fn=cmd_serve)
    return parser


def quiet_libraries() -> None:
    """``--quiet``: no progress bars from Hugging Face libraries either (weight loading, downloads)."""
    import diffusers
    import huggingface_hub
    import transformers

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from .models.components import ComponentLoadError
    from .models.parauni import CheckpointError
    from .rl.rewards import RewardModelError
    from .training.data import DataError
    from .utils.errors import TrainingDiverged
    from .utils.images import ImageReadError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "quiet", False):
        quiet_libraries()
    try:
        overrides = split_overrides(extra)
        return args.fn(args, overrides)
    except (
        ConfigError,
        CheckpointError,
        ComponentLoadError,
        ImageReadError,
        DataError,
        RewardModelError,
        TrainingDiverged,
        FileNotFoundError,
        ValueError,
        TypeError,
    ) as err:
        sub_command = (
            getattr(args, "eval_command", None)
            or getattr(args, "analyze_command", None)
            or getattr(args, "world_command", None)
        )
        command = " ".join(filter(None, [args.command, sub_command]))
        print(f"parauni {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
