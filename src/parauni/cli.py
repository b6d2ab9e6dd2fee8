"""The ``parauni`` command line.

    parauni info PRESET_OR_DIR                      components, depth, queries, parameter counts
    parauni generate --model DIR --prompt TEXT ...  text-to-image (or image-to-image with --image)

Every command takes ``--section.key=value`` overrides of the model config (unknown keys are errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError

OVERRIDE_HELP = "config overrides as --section.key=value (e.g. --lim.layers=last --sampling.steps=10)"


def split_overrides(extra: list[str]) -> list[str]:
    """Keep ``--a.b=c`` items as overrides; anything else is an error naming it."""
    bad = [e for e in extra if not (e.startswith("--") and "=" in e and "." in e.split("=", 1)[0])]
    if bad:
        raise ConfigError(f"unrecognised argument(s) {bad}; overrides look like --section.key=value")
    return extra


def _fmt(n: int) -> str:
    return f"{n:>15,}" + (f" ({n / 1e9:.2f}B)" if n >= 1e8 else f" ({n / 1e6:.2f}M)" if n >= 1e5 else "")


def load_model(source: str, overrides: list[str], meta: bool = False):
    """A ParaUni model from a model folder (config.yaml + weights) or a preset name / YAML file."""
    from .config import load_model_config
    from .models.parauni import CONFIG_FILE, ParaUni

    path = Path(source)
    if path.is_dir():
        if meta:
            from .config import ModelConfig, apply_overrides, from_dict, load_yaml

            if not (path / CONFIG_FILE).is_file():
                raise ConfigError(f"{path} has no {CONFIG_FILE}; it is not a ParaUni model folder")
            config = from_dict(ModelConfig, apply_overrides(load_yaml(path / CONFIG_FILE), overrides))
            return ParaUni.from_config(config, root=path, meta=True)
        return ParaUni.from_pretrained(path, overrides)
    return ParaUni.from_config(load_model_config(source, overrides), meta=meta)


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
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
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} does not exist")
        for i, line in enumerate(path.read_text().splitlines(), 1):
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


def _read_images(spec: str, height: int, width: int):
    import torch

    from .utils.images import ImageReadError, pil_to_tensor, read_image, resize_center_crop

    path = Path(spec)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ImageReadError(f"--image folder {path} holds no files")
    return torch.stack([pil_to_tensor(resize_center_crop(read_image(f), height, width)) for f in files])


def _output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() == ".png":
        path.parent.mkdir(parents=True, exist_ok=True)
        return [path] if n == 1 else [path.with_name(f"{path.stem}_{i:04d}.png") for i in range(n)]
    path.mkdir(parents=True, exist_ok=True)
    return [path / f"{i:04d}.png" for i in range(n)]


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pipeline import generate
    from .utils.images import tensor_to_pil

    prompts = _read_prompts(args)
    if args.image is None and not prompts:
        raise ConfigError("nothing to generate: give --prompt TEXT, --prompts-file FILE or --image IN")
    if args.image is not None and prompts:
        raise ConfigError("--image (image-to-image) and --prompt / --prompts-file exclude each other")
    model = load_model(args.model, overrides)
    s = model.config.sampling
    height, width = args.height or s.height, args.width or s.width
    model.check_size(height, width)
    images = None
    if args.image is not None:
        images = _read_images(args.image, height, width)
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
    paths = _output_paths(args.out, len(pixels))
    for x, p in zip(pixels, paths, strict=True):
        tensor_to_pil(x).save(p)
    print(f"wrote {len(paths)} image(s): {paths[0]}" + (f" ... {paths[-1]}" if len(paths) > 1 else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parauni", description="ParaUni: all-layer VLM conditioning for diffusion."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="components, layers, queries and parameter counts", epilog=OVERRIDE_HELP)
    p.add_argument("model", help="a preset name (paper, openuni_b, tiny, ...), a YAML file or a model folder")
    p.add_argument("--load", action="store_true", help="load real weights instead of a meta-device build")
    p.add_argument("--json", help="also write the counts to this JSON file")
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
    p.add_argument("--out", required=True, help="a .png path for one image, else a folder")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--sampler", choices=["dpm", "euler"], help="sampler (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses noise seed seed + i")
    p.add_argument("--height", type=int, help="image height (default: the model's)")
    p.add_argument("--width", type=int, help="image width (default: the model's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .models.components import ComponentLoadError
    from .models.parauni import CheckpointError
    from .utils.images import ImageReadError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = split_overrides(extra)
        return args.fn(args, overrides)
    except (ConfigError, CheckpointError, ComponentLoadError, ImageReadError, ValueError, TypeError) as err:
        print(f"parauni {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
