"""Loading the frozen / pretrained components: VLM, DiT and VAE.

Each component comes from a local folder or a Hugging Face id (``path``), or is built from an architecture
dict (``arch``): with random weights (tests, the tiny preset) or on the meta device (paper-size structure and
parameter counts without any weights). Relative paths are resolved against the model folder.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from ..config import DiTConfig, VAEConfig, VLMConfig
from ..errors import WeightsError
from ..utils.loading import load_pretrained
from .tokenizer import BASIC_CORPUS, train_bpe_tokenizer
from .vlm import BACKBONES, VLMBackbone, is_causal

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ComponentLoadError(WeightsError):
    """A component could not be loaded; the message names it, where from, and what to do."""


def resolve_path(path: str, root: str | Path | None) -> str:
    """Where a component's ``path`` points, independent of the working directory.

    Relative to ``root`` (the model folder) when that exists, else relative to the working directory when that
    exists; either way returned absolute. Anything else (a Hugging Face id) is returned unchanged.
    """
    candidates = [Path(path)] if Path(path).is_absolute() else [Path(root) / path] if root is not None else []
    candidates.append(Path(path).expanduser())
    for candidate in candidates:
        if candidate.exists():
            return os.path.abspath(candidate)
    return path


def portable_path(path: str, folder: str | Path) -> str:
    """How a model folder's config refers to a component: relative to ``folder``, whether inside it or not (the
    folder and what it refers to can be moved together; ``components.json`` pins what lies outside), or unchanged
    when it is not on disk (a Hugging Face id)."""
    if not Path(path).exists():
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


@contextlib.contextmanager
def _build_context(meta: bool, seed: int, dtype: torch.dtype):
    """Meta device or a forked RNG seeded for reproducible random weights; parameters created in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if meta:
            with torch.device("meta"):
                yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                yield
    finally:
        torch.set_default_dtype(previous)


def _vlm_classes(kind: str):
    import transformers as tf

    if kind == "internvl":
        return tf.InternVLForConditionalGeneration, tf.InternVLConfig
    if kind == "qwen2_5_vl":
        return tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig
    if kind == "janus":
        return tf.JanusForConditionalGeneration, tf.JanusConfig
    return tf.AutoModel, None


# Janus-Pro's own special tokens, added to the locally trained tokenizer of an arch-built Janus (tests, smoke runs).
JANUS_SPECIAL_TOKENS = [
    "<|User|>",
    "<|Assistant|>",
    "<begin_of_image>",
    "<end_of_image>",
    "<image_placeholder>",
]


def _arch_tokenizer(kind: str, arch: dict) -> tuple[object, dict]:
    """A locally trained tokenizer for an arch-built VLM, and the arch patched to agree with its ids."""
    text = arch.get("text_config", arch)
    extra = JANUS_SPECIAL_TOKENS if kind == "janus" else None
    tok = train_bpe_tokenizer(
        BASIC_CORPUS, vocab_size=min(int(text.get("vocab_size", 512)), 512), special_tokens=extra
    )
    arch = dict(arch)
    if kind == "janus":
        arch["image_token_id"] = tok.convert_tokens_to_ids("<image_placeholder>")
    elif kind == "internvl":
        arch["image_token_id"] = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    elif kind == "qwen2_5_vl":
        arch["image_token_id"] = tok.convert_tokens_to_ids("<|image_pad|>")
        arch["vision_start_token_id"] = tok.convert_tokens_to_ids("<|vision_start|>")
        arch["vision_end_token_id"] = tok.convert_tokens_to_ids("<|vision_end|>")
    return tok, arch


def load_vlm(
    cfg: VLMConfig,
    root: str | Path | None = None,
    meta: bool = False,
    seed: int = 0,
    preprocessing: str | Path | None = None,
) -> VLMBackbone:
    """The frozen VLM backbone of ``cfg`` (see :mod:`parauni.models.vlm`).

    ``preprocessing``: a folder holding the tokenizer (``tokenizer/``) and image processor
    (``image_processor/``) in their own subfolders, as a diffusers pipeline folder keeps them; by default they
    are read from the VLM's own folder."""
    import transformers as tf

    model_cls, config_cls = _vlm_classes(cfg.kind)
    dtype = DTYPES[cfg.dtype]
    image_processor = None
    if meta or cfg.path is None:
        if cfg.arch is None and cfg.path is None:
            raise ComponentLoadError(f"vlm has no arch dict; cannot build {cfg.kind} without weights")
        if cfg.arch is None:  # meta build of a folder / HF id: read its config only
            hf_config = load_pretrained(
                (config_cls or tf.AutoConfig).from_pretrained,
                resolve_path(cfg.path, root),
                "VLM config",
                error=ComponentLoadError,
            )
            tokenizer = None
        else:
            tokenizer, arch = (None, cfg.arch) if meta else _arch_tokenizer(cfg.kind, cfg.arch)
            hf_config = config_cls(**arch) if config_cls else tf.AutoConfig.for_model(**arch)
        with _build_context(meta, seed, dtype):
            model = model_cls(hf_config) if config_cls else tf.AutoModel.from_config(hf_config)
        if not meta:
            image_processor = _arch_image_processor(cfg.kind, hf_config)
    else:
        path = resolve_path(cfg.path, root)
        model = load_pretrained(model_cls.from_pretrained, path, "VLM", error=ComponentLoadError, dtype=dtype)
        extra = Path(preprocessing) if preprocessing is not None else None
        tokenizer = load_pretrained(
            tf.AutoTokenizer.from_pretrained,
            str(extra / "tokenizer") if extra else path,
            "VLM tokenizer",
            error=ComponentLoadError,
        )
        image_processor = _folder_image_processor(cfg.kind, str(extra / "image_processor") if extra else path)
    backbone_cls = BACKBONES[cfg.kind]
    if cfg.kind == "causal_lm" and not meta:
        _check_decoder_only(model, cfg.path)
    if cfg.kind in IMAGE_PROCESSORS:
        return backbone_cls(model, tokenizer, cfg, image_processor=image_processor)
    return backbone_cls(model, tokenizer, cfg)


def _check_decoder_only(model: nn.Module, path: str | None) -> None:
    """Refuse a bidirectional encoder given as ``vlm.kind=causal_lm`` (its states would see the queries)."""
    if not is_causal(model, model.config.hidden_size):
        raise ComponentLoadError(
            f"vlm {path or 'arch'} ({type(model).__name__}) is a bidirectional encoder, not a decoder-only LM "
            "(its tokens see later tokens); use --vlm.kind=text_encoder for it"
        )


# The kinds whose adapter preprocesses input images with the checkpoint's own Hugging Face image processor.
IMAGE_PROCESSORS = {"qwen2_5_vl": "Qwen2VLImageProcessorPil", "janus": "JanusImageProcessorPil"}


def _arch_image_processor(kind: str, hf_config):
    """The image processor of an arch-built VLM, sized from its vision config (None for the other kinds)."""
    import transformers as tf

    vc = getattr(hf_config, "vision_config", None)
    if kind == "qwen2_5_vl":
        return tf.Qwen2VLImageProcessorPil(
            patch_size=vc.patch_size,
            temporal_patch_size=vc.temporal_patch_size,
            merge_size=vc.spatial_merge_size,
        )
    if kind == "janus":
        return tf.JanusImageProcessorPil(size={"height": vc.image_size, "width": vc.image_size})
    return None


def _folder_image_processor(kind: str, path: str):
    """The image processor saved with a checkpoint, or None (text-only use needs none; encode_images says so)."""
    import transformers as tf

    if kind not in IMAGE_PROCESSORS:
        return None
    try:
        return getattr(tf, IMAGE_PROCESSORS[kind]).from_pretrained(path)
    except OSError:
        return None


def save_vlm(vlm: VLMBackbone, folder: str | Path) -> None:
    """Write the VLM, its tokenizer (and image processor) as a Hugging Face folder."""
    vlm.model.save_pretrained(folder)
    vlm.tokenizer.save_pretrained(folder)
    processor = getattr(vlm, "image_processor", None)
    if processor is not None:
        processor.save_pretrained(folder)


def _diffusers_config(what: str, model_cls, cfg, root) -> dict:
    """The config dict of a diffusers model folder / id (no weights), for meta builds."""
    if cfg.path is None:
        raise ComponentLoadError(f"{what} has neither a path nor an arch dict")
    kwargs = {"subfolder": cfg.subfolder} if cfg.subfolder else {}
    return load_pretrained(
        model_cls.load_config,
        resolve_path(cfg.path, root),
        f"{what} config",
        error=ComponentLoadError,
        **kwargs,
    )


def load_dit(cfg: DiTConfig, root: str | Path | None = None, meta: bool = False, seed: int = 0) -> nn.Module:
    """The ``SanaTransformer2DModel`` of ``cfg``."""
    from diffusers import SanaTransformer2DModel

    dtype = DTYPES[cfg.dtype]
    if meta or cfg.path is None:
        arch = cfg.arch or _diffusers_config("DiT", SanaTransformer2DModel, cfg, root)
        with _build_context(meta, seed, dtype):
            return SanaTransformer2DModel.from_config(arch)
    kwargs = {"torch_dtype": dtype}
    if cfg.subfolder:
        kwargs["subfolder"] = cfg.subfolder
    return load_pretrained(
        SanaTransformer2DModel.from_pretrained,
        resolve_path(cfg.path, root),
        "DiT",
        error=ComponentLoadError,
        **kwargs,
    )


def load_vae(
    cfg: VAEConfig, root: str | Path | None = None, meta: bool = False, seed: int = 0
) -> nn.Module | None:
    """The ``AutoencoderDC`` of ``cfg``, frozen, or None for pixel space."""
    from diffusers import AutoencoderDC

    if cfg.kind == "none":
        return None
    dtype = DTYPES[cfg.dtype]
    if meta or cfg.path is None:
        arch = cfg.arch or _diffusers_config("VAE", AutoencoderDC, cfg, root)
        with _build_context(meta, seed, dtype):
            model = AutoencoderDC.from_config(arch)
    else:
        kwargs = {"torch_dtype": dtype}
        if cfg.subfolder:
            kwargs["subfolder"] = cfg.subfolder
        model = load_pretrained(
            AutoencoderDC.from_pretrained,
            resolve_path(cfg.path, root),
            "VAE",
            error=ComponentLoadError,
            **kwargs,
        )
    model.requires_grad_(False)
    return model.eval()
