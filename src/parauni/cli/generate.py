"""``parauni info``, ``generate``, ``import-openuni`` and ``export``: a model's structure, images from it, an
OpenUni checkpoint as a model folder, and a model folder as a diffusers pipeline folder (and back)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import ConfigError
from ..utils.files import OutputPathError, check_output_dir, check_output_file, read_lines
from .common import OVERRIDE_HELP, add_model_arg, add_quiet, add_sampling_args, sampling_options


def _fmt(n: int) -> str:
    return f"{n:>15,}" + (f" ({n / 1e9:.2f}B)" if n >= 1e8 else f" ({n / 1e6:.2f}M)" if n >= 1e5 else "")


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..models.parauni import ParaUni

    if args.json:
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    model = ParaUni.load(args.model, overrides, meta=not args.load)
    config = model.config
    vlm, dit = model.vlm, model.dit
    lim = config.lim
    print(
        f"ParaUni model '{config.name}'"
        + ("" if args.load else "  (structure on the meta device; no weights loaded)")
    )
    print(
        f"  VLM      {config.vlm.kind}: {config.vlm.path or 'built from arch'}; {vlm.num_layers} decoder layers, width {vlm.hidden_size}"
    )
    print(f"  queries  Q = {lim.num_queries}")
    connector = (
        f"connector {lim.connector_layers} x {lim.connector_hidden or vlm.hidden_size} ({lim.connector_heads} heads)"
        if lim.use_connector
        else "no connector"
    )
    print(
        f"  LIM      layers '{lim.layers}': {len(model.lim.layer_ids)} of {vlm.num_layers} {model.lim.layer_ids}; "
        f"{connector}; "
        f"LayerNorm {'on' if lim.use_layernorm else 'off'}; -> caption_channels {dit.config.caption_channels}"
    )
    dc = dit.config
    print(
        f"  DiT      SanaTransformer2DModel: {config.dit.path or 'built from arch'}; {dc.num_layers} layers, width "
        f"{dc.num_attention_heads * dc.attention_head_dim}, patch {dc.patch_size}, {dc.in_channels} channels"
    )
    vae = (
        "none (pixel space)"
        if model.vae is None
        else f"AutoencoderDC f{model.latent_factor}c{model.vae.config.latent_channels}: {config.vae.path or 'built from arch'}"
    )
    print(f"  VAE      {vae}")
    print(
        f"  sampling {config.sampling.sampler}, {config.sampling.steps} steps, CFG {config.sampling.cfg}, {config.sampling.height}x{config.sampling.width}"
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
                    "name": config.name,
                    "num_layers": vlm.num_layers,
                    "num_queries": lim.num_queries,
                    "parameters": counts,
                },
                indent=2,
            )
        )
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        for i, line in enumerate(read_lines(path, "--prompts-file"), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ConfigError(f"{path}:{i} is not a JSON object with a 'prompt' key") from err
                if not isinstance(prompt, str):
                    raise ConfigError(
                        f"{path}:{i}: 'prompt' is {prompt!r}, not text; give the prompt as a string"
                    )
                prompts.append(prompt)
            else:
                prompts.append(line.strip())
    return prompts


def _image_files(spec: str) -> list[Path]:
    """The --image input: one image file, or the image files of a folder (sorted)."""
    from ..training.data import IMAGE_SUFFIXES
    from ..utils.images import ImageReadError

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

    from ..utils.images import pil_to_tensor, read_image, resize_center_crop

    return torch.stack([pil_to_tensor(resize_center_crop(read_image(f), height, width)) for f in files])


def output_paths(out: str, n: int, overwrite: bool = False) -> list[Path]:
    """Where ``parauni generate`` writes its ``n`` images, checked before anything is generated.

    ``--out`` with an image suffix (.png, .jpg, .jpeg, .webp, .bmp) is a file (``stem_0000.png``, ... for
    several images), in that format; a path without a suffix, or ending in ``/``, is a folder of
    ``0000.png``, ... Nothing existing is replaced without ``overwrite``.
    """
    from ..training.data import IMAGE_SUFFIXES

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


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..models.parauni import ParaUni
    from ..pipeline import generate
    from ..utils.images import tensor_to_pil

    # every input and the output location first: nothing is loaded or generated before they pass
    prompts = _read_prompts(args)
    if args.image is None and not prompts:
        raise ConfigError("nothing to generate: give --prompt TEXT, --prompts-file FILE or --image IN")
    if args.image is not None and prompts:
        raise ConfigError("--image (image-to-image) and --prompt / --prompts-file exclude each other")
    options = sampling_options(args)
    files = None if args.image is None else _image_files(args.image)
    paths = output_paths(args.out, len(files) if files else len(prompts), args.overwrite)
    options = options.sized(ParaUni.load_config(args.model, overrides).sampling)
    images = None if files is None else _read_images(files, options.height, options.width)
    model = ParaUni.load(args.model, overrides)
    model.check_size(options.height, options.width)
    pixels = generate(
        model, prompts or None, images, **options.kwargs(), sampler=args.sampler, progress=not args.quiet
    )
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for x, p in zip(pixels, paths, strict=True):
        tensor_to_pil(x).save(p)
    print(f"wrote {len(paths)} image(s): {paths[0]}" + (f" ... {paths[-1]}" if len(paths) > 1 else ""))
    return 0


def cmd_import_openuni(args: argparse.Namespace, overrides: list[str]) -> int:
    from ..config import load_model_config
    from ..models.openuni import import_openuni

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


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    """A model folder (or pipeline folder) written as a diffusers pipeline folder, or as a model folder."""
    import torch

    from ..models.parauni import ParaUni

    check_output_dir(args.out, overwrite=args.overwrite)
    model = ParaUni.load(args.model, overrides, device="cpu")
    if args.to == "parauni":
        model.save_pretrained(args.out, copy_frozen=True)
        print(
            f"exported {args.model} as a ParaUni model folder (config.yaml, frozen parts copied in): {args.out}"
        )
        return 0
    from ..diffusers_pipeline import ParaUniPipeline

    pipe = ParaUniPipeline.from_parauni(model)
    if args.dtype:
        pipe.to(dtype=getattr(torch, args.dtype))
    pipe.save_pretrained(args.out)
    print(
        f"exported {args.model} as a diffusers pipeline folder (model_index.json; "
        f"{', '.join(sorted(k for k, v in pipe.components.items() if v is not None))}): {args.out}"
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this family's commands on the ``parauni`` sub-command parser."""
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
    add_model_arg(p)
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
    add_sampling_args(p)
    p.add_argument("--sampler", choices=["dpm", "euler"], help="sampler (default: the model's)")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    add_quiet(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser(
        "export",
        help="a model folder as a diffusers pipeline folder (model_index.json), or a pipeline folder back",
        epilog=OVERRIDE_HELP,
    )
    add_model_arg(p)
    p.add_argument(
        "--to",
        choices=["diffusers", "parauni"],
        default="diffusers",
        help="diffusers: a ParaUniPipeline folder; parauni: a self-contained model folder (default: diffusers)",
    )
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="cast the pipeline's weights first (default: as loaded)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.set_defaults(fn=cmd_export)
