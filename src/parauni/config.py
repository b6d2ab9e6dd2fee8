"""Typed configuration: dataclasses, YAML presets and ``--section.key=value`` overrides.

Every default (the paper's, docs/configuration.md lists them) lives here as a field with help text, never as a
constant inside model code. A config is a tree of dataclasses; it is read from YAML, overridden from the
command line and saved beside every checkpoint. Unknown keys are errors that name the key and the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

CONDITIONAL_TEMPLATE = (
    "<|im_start|>user\nGenerate an image: {caption}<|im_end|>\n<|im_start|>assistant\n<img>"
)
UNCONDITIONAL_TEMPLATE = "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n<img>"
IMAGE_TEMPLATE = "<|im_start|>user\n{image}\n{instruction}<|im_end|>\n<|im_start|>assistant\n<img>"

# Qwen2.5-VL as OpenUni prompts it: Qwen's chat format, no system turn, the queries follow "assistant\n" (no <img>);
# an input image is Qwen's own <|vision_start|><|image_pad|>...<|vision_end|> block, put in {image} by the adapter.
QWEN_VL_TEMPLATE = "<|im_start|>user\nGenerate an image: {caption}<|im_end|>\n<|im_start|>assistant\n"
QWEN_VL_UNCOND_TEMPLATE = "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
QWEN_VL_IMAGE_TEMPLATE = "<|im_start|>user\n{image}{instruction}<|im_end|>\n<|im_start|>assistant\n"

# Janus-Pro's text-to-image format ("<|User|>: ...\n\n<|Assistant|>:" then its image-start tag); the tokenizer adds BOS.
JANUS_TEMPLATE = "<|User|>: {caption}\n\n<|Assistant|>:<begin_of_image>"
JANUS_UNCOND_TEMPLATE = "<|User|>: \n\n<|Assistant|>:<begin_of_image>"
JANUS_IMAGE_TEMPLATE = "<|User|>: {image}\n{instruction}\n\n<|Assistant|>:<begin_of_image>"

# A language model of unknown chat format (causal_lm, text_encoder): plain text, no special tokens; the tokenizer
# adds its own (BOS, or BERT's [CLS] ... [SEP]). Text-only kinds never use the image template.
PLAIN_TEMPLATE = "Generate an image: {caption}"
PLAIN_UNCOND_TEMPLATE = "Generate an image."
PLAIN_IMAGE_TEMPLATE = "{image}\n{instruction}"

# Each backbone kind's own prompt format: (template, uncond_template, image_template), used when vlm.* is null.
PROMPT_FORMATS = {
    "internvl": (CONDITIONAL_TEMPLATE, UNCONDITIONAL_TEMPLATE, IMAGE_TEMPLATE),
    "qwen2_5_vl": (QWEN_VL_TEMPLATE, QWEN_VL_UNCOND_TEMPLATE, QWEN_VL_IMAGE_TEMPLATE),
    "janus": (JANUS_TEMPLATE, JANUS_UNCOND_TEMPLATE, JANUS_IMAGE_TEMPLATE),
    "causal_lm": (PLAIN_TEMPLATE, PLAIN_UNCOND_TEMPLATE, PLAIN_IMAGE_TEMPLATE),
    "text_encoder": (PLAIN_TEMPLATE, PLAIN_UNCOND_TEMPLATE, PLAIN_IMAGE_TEMPLATE),
}

LAYER_MODES = ("all", "last", "list", "drop_shallow", "drop_middle", "drop_deep", "interval")
VLM_KINDS = ("internvl", "qwen2_5_vl", "janus", "causal_lm", "text_encoder")
# Component sections whose arch dict describes the preset's own weights: an override of the path drops it.
ARCH_SECTIONS = ("vlm", "dit", "vae")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class VLMConfig:
    """The frozen vision-language model that reads the prompt and the learnable queries."""

    kind: str = field(
        default="internvl",
        metadata={
            "help": f"backbone adapter, one of {VLM_KINDS} (causal_lm: a decoder-only LM; text_encoder: a "
            "bidirectional one such as BERT)"
        },
    )
    path: str | None = field(
        default="OpenGVLab/InternVL3-2B-hf",
        metadata={
            "help": "local folder or Hugging Face id (relative paths are relative to the model folder)"
        },
    )
    arch: dict | None = field(
        default=None, metadata={"help": "config dict to build the model without weights (meta / random)"}
    )
    max_length: int = field(default=128, metadata={"help": "maximum number of text tokens of a prompt"})
    template: str | None = field(
        default=None, metadata={"help": "conditional prompt template; null = the kind's own (PROMPT_FORMATS)"}
    )
    uncond_template: str | None = field(
        default=None, metadata={"help": "CFG / dropout template; null = the kind's own"}
    )
    image_template: str | None = field(
        default=None,
        metadata={"help": "template with an input image ({image}, {instruction}); null = the kind's own"},
    )
    image_instruction: str = field(
        default="Keep the image as it is.", metadata={"help": "instruction used with an input image"}
    )
    dtype: str = field(default="bfloat16", metadata={"help": f"weights dtype, one of {DTYPES}"})

    def __post_init__(self) -> None:
        check_choice("vlm.kind", self.kind, VLM_KINDS)
        check_choice("vlm.dtype", self.dtype, DTYPES)
        own = PROMPT_FORMATS[self.kind]
        self.template = own[0] if self.template is None else self.template
        self.uncond_template = own[1] if self.uncond_template is None else self.uncond_template
        self.image_template = own[2] if self.image_template is None else self.image_template
        if self.path is None and self.arch is None:
            raise ConfigError("vlm needs a path (folder or Hugging Face id) or an arch dict; both are empty")
        if self.max_length < 8:
            raise ConfigError(f"vlm.max_length={self.max_length} is too small; use at least 8")
        if "{caption}" not in self.template:
            raise ConfigError("vlm.template must contain '{caption}'")


@dataclass
class LIMConfig:
    """Learnable queries and the Layer Integration Module (paper section 3.2)."""

    num_queries: int = field(default=256, metadata={"help": "number of learnable query tokens Q"})
    use_connector: bool = field(default=True, metadata={"help": "shared transformer connector on/off"})
    connector_layers: int = field(default=6, metadata={"help": "connector depth"})
    connector_hidden: int | None = field(
        default=None, metadata={"help": "connector width; None = the VLM width (OpenUni's enc->proj layout)"}
    )
    connector_intermediate: int = field(default=8960, metadata={"help": "connector MLP width"})
    connector_heads: int = field(default=24, metadata={"help": "connector attention heads"})
    use_layernorm: bool = field(default=True, metadata={"help": "shared LayerNorm before the mean on/off"})
    whiten: bool = field(
        default=False,
        metadata={
            "help": "whiten each selected layer's query states before the connector: subtract their mean per "
            "query and multiply by the inverse square root of their covariance over prompts, both estimated "
            "once from lim.whiten_captions training captions when training starts (not in the paper; "
            "docs/world.md, 'What colour attribution loses')"
        },
    )
    whiten_captions: int = field(
        default=512, metadata={"help": "with lim.whiten: captions its statistics are from"}
    )
    whiten_floor: float = field(
        default=1e-4,
        metadata={"help": "with lim.whiten: the covariance's eigenvalues are raised to this x the largest"},
    )
    layers: str = field(default="all", metadata={"help": f"layer selection, one of {LAYER_MODES}"})
    layer_list: list[int] = field(default_factory=list, metadata={"help": "layers for layers=list (0-based)"})
    interval: int = field(default=2, metadata={"help": "stride for layers=interval"})
    zone_bounds: list[float] = field(
        default_factory=lambda: [12 / 28, 24 / 28],
        metadata={
            "help": "shallow|middle and middle|deep boundaries as fractions of the depth, on the paper's hidden-state "
            "index (0 = embeddings; decoder layer k is k + 1): 23-27 is InternVL3-2B's deep zone"
        },
    )

    def __post_init__(self) -> None:
        check_choice("lim.layers", self.layers, LAYER_MODES)
        if self.num_queries < 1:
            raise ConfigError(f"lim.num_queries={self.num_queries} must be >= 1")
        if self.layers == "list" and not self.layer_list:
            raise ConfigError("lim.layers=list needs lim.layer_list, e.g. --lim.layer_list=[0,5,11]")
        if self.interval < 1:
            raise ConfigError(f"lim.interval={self.interval} must be >= 1")
        lo, hi = (list(self.zone_bounds) + [None, None])[:2]
        if len(self.zone_bounds) != 2 or not (0.0 < lo < hi < 1.0):
            raise ConfigError(f"lim.zone_bounds={self.zone_bounds} must be two fractions 0 < a < b < 1")
        if self.whiten_captions < 2 or not 0 < self.whiten_floor <= 1:
            raise ConfigError(
                f"lim.whiten_captions={self.whiten_captions} must be >= 2 and lim.whiten_floor={self.whiten_floor} "
                "in (0, 1]"
            )
        if self.use_connector and self.connector_layers < 1:
            raise ConfigError("lim.connector_layers must be >= 1 (or set lim.use_connector=false)")


@dataclass
class DiTConfig:
    """The diffusion transformer (diffusers ``SanaTransformer2DModel``)."""

    path: str | None = field(
        default="Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
        metadata={"help": "local folder or Hugging Face id of a diffusers SANA model"},
    )
    subfolder: str | None = field(default="transformer", metadata={"help": "subfolder inside path"})
    arch: dict | None = field(default=None, metadata={"help": "SanaTransformer2DModel config to build"})
    dtype: str = field(default="bfloat16", metadata={"help": f"weights dtype, one of {DTYPES}"})

    def __post_init__(self) -> None:
        check_choice("dit.dtype", self.dtype, DTYPES)
        if self.path is None and self.arch is None:
            raise ConfigError("dit needs a path or an arch dict; both are empty")


@dataclass
class VAEConfig:
    """The autoencoder (diffusers ``AutoencoderDC``) or none for pixel space."""

    kind: str = field(default="dcae", metadata={"help": "'dcae' or 'none' (pixel space)"})
    path: str | None = field(
        default="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", metadata={"help": "folder or HF id"}
    )
    subfolder: str | None = field(default=None, metadata={"help": "subfolder inside path"})
    arch: dict | None = field(default=None, metadata={"help": "AutoencoderDC config to build"})
    dtype: str = field(default="bfloat16", metadata={"help": f"weights dtype, one of {DTYPES}"})

    def __post_init__(self) -> None:
        check_choice("vae.kind", self.kind, ("dcae", "none"))
        check_choice("vae.dtype", self.dtype, DTYPES)
        if self.kind == "dcae" and self.path is None and self.arch is None:
            raise ConfigError("vae.kind=dcae needs a path or an arch dict (or set vae.kind=none)")


@dataclass
class TrainableConfig:
    """What trains. The VLM never does."""

    queries: bool = field(default=True, metadata={"help": "train the learnable queries"})
    lim: bool = field(default=True, metadata={"help": "train the Layer Integration Module"})
    dit: bool = field(default=False, metadata={"help": "train the whole DiT"})
    dit_lora_rank: int = field(default=0, metadata={"help": "> 0: train a LoRA of this rank on the DiT"})
    dit_lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha"})
    dit_lora_targets: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "LoRA target modules"}
    )

    def __post_init__(self) -> None:
        if self.dit and self.dit_lora_rank > 0:
            raise ConfigError("trainable.dit=true and trainable.dit_lora_rank>0 exclude each other; pick one")
        if self.dit_lora_rank < 0:
            raise ConfigError(f"trainable.dit_lora_rank={self.dit_lora_rank} must be >= 0")
        _check_finite("trainable.dit_lora_alpha", self.dit_lora_alpha)


@dataclass
class SamplingConfig:
    """Defaults for generation (docs/how-it-works.md, "Conventions")."""

    sampler: str = field(default="dpm", metadata={"help": "'dpm' (DPM-Solver++ flow) or 'euler'"})
    steps: int = field(default=20, metadata={"help": "denoising steps"})
    cfg: float = field(default=4.5, metadata={"help": "classifier-free guidance scale (1 = off)"})
    shift: float = field(default=3.0, metadata={"help": "flow shift of the sampling sigmas"})
    height: int = field(default=1024, metadata={"help": "image height in pixels"})
    width: int = field(default=1024, metadata={"help": "image width in pixels"})

    def __post_init__(self) -> None:
        check_sampling("sampling.", self.sampler, self.steps, self.cfg, self.shift)
        for name in ("height", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sampling.{name}={getattr(self, name)} must be >= 1")


SAMPLERS = ("dpm", "euler")


def check_cfg(cfg: object, name: str = "cfg", most: float | None = None) -> float:
    """The guidance scale as a float: finite, >= 0 (1 = guidance off) and, where a caller has a limit, <= ``most``."""
    ok = not isinstance(cfg, bool) and isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0
    if not ok or (most is not None and cfg > most):
        upper = "" if most is None else f" and <= {most:g}"
        raise ConfigError(f"{name}={cfg!r} must be a finite number >= 0{upper} (1 turns guidance off)")
    return float(cfg)


def check_sampling(prefix: str, sampler: object, steps: object, cfg: object, shift: object) -> None:
    """The rules every sampling request and config obeys (names in errors are ``prefix + field``); the
    sampler's own step bound and the model's sizes are :func:`parauni.pipeline.check_request`'s."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"{prefix}sampler={sampler!r} is not valid; choose one of {list(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{prefix}steps={steps!r} must be an integer >= 1")
    check_cfg(cfg, prefix + "cfg")
    if (
        isinstance(shift, bool)
        or not isinstance(shift, (int, float))
        or not math.isfinite(shift)
        or shift <= 0
    ):
        raise ConfigError(f"{prefix}shift={shift!r} must be a finite number > 0")


@dataclass
class ModelConfig:
    """A whole ParaUni model: components, what trains and how it samples."""

    name: str = field(default="paper", metadata={"help": "a label for this model"})
    vlm: VLMConfig = field(default_factory=VLMConfig)
    lim: LIMConfig = field(default_factory=LIMConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = field(default=0, metadata={"help": "seed for the initialisation of new parameters"})


T = TypeVar("T")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices)}")


def _check_finite(name: str, value: float) -> None:
    """A ConfigError for NaN or infinity (comparisons with NaN are all false, so range checks let it pass)."""
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} must be a finite number")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (light coercion: int -> float, str numbers from CLI)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=name + ".")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (item,) = args or (Any,)
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise :class:`ConfigError`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys: {names}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The nested plain-dict form of a dataclass config (YAML-safe)."""
    return dataclasses.asdict(config)


def _parse_value(text: str) -> Any:
    """A command-line value as YAML (``3``, ``1e-4``, ``true``, ``[0,1]``, ``null``), else the raw string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string; people mean the number
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def field_type(cls: type, parts: list[str]) -> Any:
    """The annotation of the field ``parts`` (e.g. ``["vlm", "template"]``) of dataclass ``cls``, or None."""
    tp: Any = cls
    for part in parts:
        if typing.get_origin(tp) is list and part.isdigit():  # an item of a list field, e.g. rl.phases.0
            (tp,) = typing.get_args(tp) or (Any,)
            continue
        if not _is_dataclass_type(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_text_field(tp: Any) -> bool:
    """``str`` or ``str | None``: a command-line value for it is the text as typed, never YAML."""
    return tp is str or (
        typing.get_origin(tp) in (types.UnionType, typing.Union)
        and set(typing.get_args(tp)) == {str, type(None)}
    )


def _override_value(text: str, tp: Any) -> Any:
    """A command-line value: the raw text for a text field (``null`` / ``~`` = None where allowed), else YAML."""
    if _is_text_field(tp):
        return None if text in ("null", "~") and tp is not str else text
    return _parse_value(text)


def apply_overrides(data: dict, overrides: list[str], schema: type | None = None) -> dict:
    """Apply ``section.key=value`` strings (a leading ``--`` is allowed) to a nested dict, in order.

    With ``schema`` (a config dataclass) a text field takes the value as typed (a template such as
    ``Draw: {caption}`` is not read as a YAML mapping), and an override of a component's ``path`` (``vlm``,
    ``dit``, ``vae``) that does not also set its ``arch`` drops the arch, which described the old weights.
    """
    out = yaml.safe_load(yaml.safe_dump(data))
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(key, node, part)]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        value = _override_value(text, field_type(schema, parts) if schema else None)
        if isinstance(node, list):
            node[_list_index(key, node, parts[-1])] = value
        else:
            node[parts[-1]] = value
    if schema is not None:
        _drop_stale_arch(out, overrides)
    return out


def _list_index(key: str, items: list, part: str) -> int:
    """The position ``part`` names in ``items`` (an override such as ``rl.phases.1.epochs=6``)."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {key!r}: {part!r} is not a position in a list of {len(items)} item(s); "
            f"use 0 to {len(items) - 1}"
        )
    return int(part)


def with_overrides(config: T, overrides: list[str], prefix: str = "") -> T:
    """A copy of the dataclass ``config`` with ``key=value`` overrides (keys relative to it, e.g.
    ``ldam.enabled=false`` or ``phases.0.epochs=3`` on an :class:`~parauni.rl.config.RLConfig`)."""
    cls = type(config)
    return from_dict(cls, apply_overrides(to_dict(config), overrides, schema=cls), prefix=prefix)


def _drop_stale_arch(data: dict, overrides: list[str]) -> None:
    """Remove ``section.arch`` where an override gave ``section.path`` a value and none touched the arch."""
    keys = [item.removeprefix("--").split("=", 1)[0] for item in overrides]
    for section in ARCH_SECTIONS:
        node = data.get(section)
        set_path = f"{section}.path" in keys and isinstance(node, dict) and node.get("path") is not None
        if set_path and not any(k == f"{section}.arch" or k.startswith(f"{section}.arch.") for k in keys):
            node["arch"] = None


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def preset_dict(name: str) -> dict:
    """The raw dict of a shipped preset, e.g. ``paper``, ``openuni_b``, ``tiny``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available presets: {list_presets()}")
    return load_yaml(path)


def load_model_config(source: str | Path | dict, overrides: list[str] | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, a YAML file or a dict, then the overrides."""
    if isinstance(source, dict):
        data = source
    elif Path(source).suffix in (".yaml", ".yml") or Path(source).is_file():
        data = load_yaml(source)
    else:
        data = preset_dict(str(source))
    data = apply_overrides(data, overrides or [], schema=ModelConfig)
    return from_dict(ModelConfig, data)


def save_yaml(config: Any, path: str | Path) -> None:
    """Write a dataclass config (or dict) as YAML."""
    data = config if isinstance(config, dict) else to_dict(config)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` rows for every field of a config dataclass, recursively."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if _is_dataclass_type(hint):
            rows.extend(describe(hint, prefix + f.name + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
