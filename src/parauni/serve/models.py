"""The models ``parauni serve`` serves and how it generates with them: one text-to-image or reconstruction
request through :func:`parauni.pipeline.generate`, the ``--model`` specs (or the demo's models), and the
columns of the last-layer comparison."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.run_files import CONFIG_FILE, RL_LOG
from .requests import ServeError, ServeSettings, check_prompt, checked_options, read_upload

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..models.parauni import ParaUni

NO_MODEL_HINT = "run `parauni demo` first or pass --model DIR"


# ------------------------------------------------------------------------------------------- generation
def last_layer_scale_fn(model: ParaUni) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``generate(..., scale_fn=)`` hook keeping only the model's deepest selected layer in the LIM's mean."""
    from ..analysis.layers import kept_layers_scale

    layers = model.lim.layers
    scale = kept_layers_scale(len(layers), [layers.index(max(layers))])  # (1, L_sel, 1, 1)
    return lambda per_layer: scale.to(per_layer)


def text_to_image(
    model: ParaUni,
    prompt: object,
    *,
    batch: object,
    settings: ServeSettings,
    last_layer_only: bool = False,
    cancel: threading.Event | None = None,
    **sampling: object,
) -> list[Image.Image]:
    """``batch`` images of one validated prompt (image i with noise seed ``seed + i``); ``sampling``: the
    request's steps, cfg, seed, height and width (:func:`checked_options`); ``cancel`` set stops the generation
    (GenerationCancelled) between two denoising steps."""
    from ..pipeline import generate
    from ..utils.images import tensor_to_pil

    prompt = check_prompt(prompt, settings)
    options = checked_options(model, settings, batch=batch, **sampling)
    scale_fn = last_layer_scale_fn(model) if last_layer_only else None
    prompts = [prompt] * options.batch_size
    pixels = generate(model, prompts, **options.kwargs(), progress=False, scale_fn=scale_fn, cancel=cancel)
    return [tensor_to_pil(x) for x in pixels]


def reconstruct(
    model: ParaUni,
    upload: str | Path | None,
    *,
    steps: object,
    cfg: object,
    seed: object,
    height: object,
    width: object,
    settings: ServeSettings,
    cancel: threading.Event | None = None,
) -> tuple[Image.Image, Image.Image]:
    """(the upload resized and centre-cropped to height x width, its reconstruction by the model)."""
    from ..pipeline import generate
    from ..utils.images import pil_to_tensor, resize_center_crop, tensor_to_pil

    options = checked_options(model, settings, steps, cfg, seed, height, width)
    image = resize_center_crop(read_upload(upload, settings), options.height, options.width)
    pixels = generate(
        model, images=pil_to_tensor(image)[None], **options.kwargs(), progress=False, cancel=cancel
    )
    return image, tensor_to_pil(pixels[0])


# ------------------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class Variant:
    """One column of the comparison tab: a served model, optionally conditioned on its deepest layer alone."""

    label: str
    model: str
    last_layer_only: bool = False


@dataclass
class Served:
    """The models the app serves (display name -> model, in menu order), the comparison columns and a note."""

    models: dict[str, ParaUni]
    sources: dict[str, str]
    variants: list[Variant]
    note: str


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``NAME=DIR_OR_PRESET`` or ``DIR_OR_PRESET`` -> (display name, source)."""
    name, sep, source = spec.partition("=")
    if sep and name and source and "/" not in name:
        return name, source
    if not spec:
        raise ServeError("--model is empty; give a model folder or preset, optionally as NAME=DIR")
    return Path(spec).name or spec, spec


def demo_sources(demo_dir: str | Path) -> dict[str, str]:
    """The models ``parauni demo`` trained in ``demo_dir``: Stage III (RL) when present, then Stage II."""
    demo_dir = Path(demo_dir)
    stage2, stage3 = demo_dir / "stage2", demo_dir / "stage3"
    if not (stage2 / CONFIG_FILE).is_file():
        raise ServeError(f"no model to serve: {stage2} holds no trained model; {NO_MODEL_HINT}")
    sources = {"Stage III": str(stage3)} if (stage3 / CONFIG_FILE).is_file() else {}
    sources["Stage II"] = str(stage2)
    return sources


def is_rl_model(source: str) -> bool:
    """Whether a model folder is a Stage-III policy (its RL log lies beside the weights)."""
    return (Path(source) / RL_LOG).is_file()


def comparison_variants(models: dict[str, ParaUni], sources: dict[str, str]) -> tuple[list[Variant], str]:
    """The comparison columns and the page's note on what they are.

    Order: last-layer models (trained, or the LIM mask of the first all-layer model before RL when none is
    served), then all-layer models before RL, then after RL.
    """
    single = [n for n, m in models.items() if len(m.lim.layers) == 1]
    multi = [n for n, m in models.items() if len(m.lim.layers) > 1]
    before = [n for n in multi if not is_rl_model(sources[n])]
    after = [n for n in multi if is_rl_model(sources[n])]
    variants = [Variant(f"{n}: last layer (trained)", n) for n in single]
    notes = []
    if not single and multi:
        base = (before or after)[0]
        layer = max(models[base].lim.layers)
        variants.append(Variant(f"{base}: last layer only (LIM mask)", base, last_layer_only=True))
        notes.append(
            f"No last-layer model is served, so **last layer only** is *{base}* conditioned on its deepest "
            f"selected VLM layer ({layer}) alone: the LIM's per-layer scale keeps that layer, as "
            "`parauni analyze layers` does. These are the all-layer weights, not a separately trained "
            "last-layer (OpenUni) baseline; pass one trained with `--lim.layers=last` as `--model` to compare "
            "with a real baseline."
        )
    for n in before + after:
        rl = ", after RL" if n in after else ""
        variants.append(Variant(f"{n}: all {len(models[n].lim.layers)} layers{rl}", n))
    if after:
        notes.append(
            f"Columns marked *after RL* are Stage-III (Flow-GRPO + LDAM) policies ({RL_LOG} lies beside "
            "their weights), shown after the models before RL."
        )
    return variants, " ".join(notes)


def load_served(specs: list[str], overrides: list[str], demo_dir: str | Path = "parauni-demo") -> Served:
    """Load the ``--model`` specs (or, with none, the models of ``parauni demo`` in ``demo_dir``)."""
    from ..models.parauni import ParaUni

    if specs:
        pairs = [parse_model_spec(s) for s in specs]
        names = [n for n, _ in pairs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ServeError(f"model name(s) {duplicates} given twice; name them apart as --model NAME=DIR")
        sources = dict(pairs)
    else:
        sources = demo_sources(demo_dir)
    models = {name: ParaUni.load(source, overrides).eval() for name, source in sources.items()}
    variants, note = comparison_variants(models, sources)
    return Served(models, sources, variants, note)
