"""Configuration of the shapes world: the sizes of its models and the length of every stage of the demo.

Defaults are chosen so that ``parauni demo`` runs end to end on a 2-core laptop CPU in about a quarter of an
hour; ``quick()`` shrinks every stage to a few steps for smoke tests. Override any field on the command line
as ``--world.section.key=value``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from ..config import ConfigError


@dataclass
class WorldVLMConfig:
    """The world's VLM: InternVL architecture (vision tower + Qwen2 decoder), Stage 0 captioning + text LM."""

    layers: int = field(default=8, metadata={"help": "decoder layers (zones scale with the depth)"})
    hidden: int = field(default=128, metadata={"help": "decoder width"})
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    patch: int = field(default=4, metadata={"help": "vision patch size (pixel shuffle 0.5 follows)"})
    vocab_size: int = field(default=512, metadata={"help": "byte-level BPE vocabulary trained on the world"})
    steps: int = 500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50


@dataclass
class WorldT2IConfig:
    """The world's SANA DiT and its own text encoder (Gemma-2 architecture), trained together in Stage 0."""

    text_layers: int = 2
    text_hidden: int = field(
        default=128, metadata={"help": "text encoder width = the DiT's caption_channels"}
    )
    text_heads: int = 4
    dit_layers: int = 6
    dit_heads: int = field(default=4, metadata={"help": "DiT heads of width 32"})
    dit_patch: int = 4
    mlp_ratio: float = 2.5
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    timestep_sampling: str = "logit_normal"


@dataclass
class WorldParaUniConfig:
    """ParaUni on the world: queries + LIM sizes and Stages I and II."""

    num_queries: int = 16
    connector_layers: int = 2
    connector_heads: int = 4
    connector_intermediate: int = 384
    stage1_steps: int = 600
    stage1_lr: float = 1e-3
    stage1_warmup: int = 50
    stage2_steps: int = 400
    stage2_lr: float = 1e-4
    stage2_warmup: int = 20
    batch_size: int = 64


@dataclass
class WorldEvalConfig:
    """ShapesEval: prompts per GenEval tag, images per prompt and the sampler."""

    per_tag: int = 40
    images_per_prompt: int = 4
    steps: int = 20
    cfg: float = 4.5
    sampler: str = "dpm"
    batch_size: int = 64


@dataclass
class WorldConfig:
    """Everything about the embedded default world."""

    image_size: int = field(default=32, metadata={"help": "side of the world's square images"})
    seed: int = 0
    vlm: WorldVLMConfig = field(default_factory=WorldVLMConfig)
    t2i: WorldT2IConfig = field(default_factory=WorldT2IConfig)
    parauni: WorldParaUniConfig = field(default_factory=WorldParaUniConfig)
    eval: WorldEvalConfig = field(default_factory=WorldEvalConfig)

    def __post_init__(self) -> None:
        if self.image_size % (4 * self.vlm.patch) or self.image_size % self.t2i.dit_patch:
            raise ConfigError(
                f"world.image_size={self.image_size} must be a multiple of 4 x vlm.patch ({4 * self.vlm.patch}) "
                f"and of t2i.dit_patch ({self.t2i.dit_patch})"
            )

    def quick(self) -> WorldConfig:
        """A copy with every stage shortened to a few steps (CI smoke runs)."""
        q = copy.deepcopy(self)
        q.vlm.steps, q.vlm.warmup, q.vlm.batch_size = 4, 1, 8
        q.t2i.steps, q.t2i.warmup, q.t2i.batch_size = 4, 1, 8
        q.parauni.stage1_steps = q.parauni.stage2_steps = 3
        q.parauni.stage1_warmup = q.parauni.stage2_warmup = 1
        q.parauni.batch_size = 8
        q.eval.per_tag, q.eval.images_per_prompt, q.eval.steps = 2, 2, 4
        return q
