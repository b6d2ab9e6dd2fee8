"""Configuration of the shapes world: the sizes of its models and the length of every stage of the demo.

Defaults are chosen so that ``parauni demo`` runs end to end on a 2-core laptop CPU in about a quarter of an
hour; ``quick()`` shrinks every stage to a few steps for smoke tests. Override any field on the command line
as ``--world.section.key=value``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainableConfig, apply_overrides, from_dict
from ..errors import ConfigError
from ..rl.config import PhaseConfig, RLConfig
from ..rl.ldam import LDAMConfig
from ..training.config import TrainConfig

# Each Stage-0 model and each stage of the demo draws its own stream of world examples: example i of a stage
# is example i of WorldStream(seed + offset).
STREAM_OFFSETS: dict[str, int] = {
    "tokenizer": 101,
    "vlm": 202,
    "t2i": 303,
    "stage1": 404,
    "stage2": 505,
    "heldout": 606,
    "text": 707,
    "ae": 808,
    "clip": 909,
    "aesthetic": 1010,
}


def world_rl_defaults() -> RLConfig:
    """Stage III on the world: the paper's curriculum (aesthetic on the middle zone, then CLIP with ShapesEval
    partial credit on the deep zone) at a CPU's scale, a rank-8 LoRA on the DiT and LDAM's looser world gates
    (``parauni.world.rl``'s docstring measures them)."""
    return RLConfig(
        phases=[
            PhaseConfig("aesthetic", {"aesthetic": 1.0}, epochs=8, zone="middle", beta=0.02),
            PhaseConfig("clip+geneval", {"clip": 1.0, "geneval": 1.0}, epochs=8, zone="deep", beta=0.02),
        ],
        prompts_per_epoch=16,
        group_size=4,
        steps=10,
        cfg=2.0,
        lr=3e-3,
        updates_per_epoch=1,
        micro_batch=16,
        rollout_batch=64,
        trainable=TrainableConfig(queries=False, lim=False, dit=False, dit_lora_rank=8, dit_lora_alpha=8),
        ldam=LDAMConfig(window=3, drop_epochs=1, grad_sigmas=0.0),
        save_every=5,
        keep_last=1,
    )


def world_stage_defaults(stage: int) -> TrainConfig:
    """Stage I or II on the world: the paper's recipe (AdamW 0.9/0.95, wd 0.05, warm-up + cosine, clip 1.0,
    10% caption dropout) at the world's scale, with logit-normal times as in Stage 0 and condition distillation
    against the Stage-0 DiT's own text encoder (not in the paper; docs/world.md)."""
    steps, lr, warmup = (1200, 3e-3, 20) if stage == 1 else (150, 1e-4, 10)
    return TrainConfig(
        stage=stage,
        steps=steps,
        batch_size=16,
        lr=lr,
        warmup=warmup,
        timestep_sampling="logit_normal",
        condition_distill=1.0,
        image_size=32,
        save_every=steps // 4,
        keep_last=1,
        log_every=5,
        seed=stage,
    )


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
    steps: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    restate: bool = field(
        default=False,
        metadata={
            "help": "text rows continue the generation prompt with the caption, so that the positions of the "
            "queries carry the prompt (query states vary about 10x more across prompts; not the demo default)"
        },
    )


@dataclass
class WorldAEConfig:
    """The world's autoencoder (diffusers ``AutoencoderDC``, ResBlocks); ``enabled=false`` = pixel space."""

    enabled: bool = True
    latent_channels: int = 8
    channels: list[int] = field(
        default_factory=lambda: [16, 32, 64], metadata={"help": "per stage; f = 2^(n-1)"}
    )
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    latent_noise: float = field(
        default=0.1, metadata={"help": "noise added to latents in training (diffusability)"}
    )


@dataclass
class WorldT2IConfig:
    """The world's SANA DiT and its own text encoder (Gemma-2 architecture), trained together in Stage 0."""

    text_layers: int = 2
    text_hidden: int = field(
        default=128, metadata={"help": "text encoder width = the DiT's caption_channels"}
    )
    text_heads: int = 4
    text_steps: int = field(
        default=100, metadata={"help": "language-model pretraining steps of the text encoder"}
    )
    text_batch_size: int = 64
    text_lr: float = 2e-3
    text_warmup: int = 20
    text_weight_decay: float = 0.01
    text_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    text_grad_clip: float = 1.0
    text_tokens: int = field(
        default=32,
        metadata={
            "help": "captions padded (or cut) to this many tokens, all read by the DiT, padding states included "
            "(= parauni.num_queries, so that every condition token ParaUni gives was seen in Stage 0); 0 = "
            "padded to the batch's longest and masked"
        },
    )
    tune_text_encoder: bool = field(
        default=True,
        metadata={"help": "keep training the text encoder with the DiT (else frozen, as in SANA)"},
    )
    dit_layers: int = 6
    dit_heads: int = field(default=4, metadata={"help": "DiT heads of width 32"})
    dit_patch: int = field(
        default=1,
        metadata={
            "help": "DiT patch size on its input (latents, or pixels); 2 is about twice as fast but draws the "
            "requested shape far less often (docs/world.md)"
        },
    )
    mlp_ratio: float = 2.5
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the DiT stage"})
    caption_dropout: float = field(default=0.1, metadata={"help": "unconditional captions (for CFG)"})
    ema: float = field(default=0.0, metadata={"help": "EMA decay of the DiT's weights (0 = off)"})
    timestep_sampling: str = "logit_normal"


@dataclass
class WorldParaUniConfig:
    """ParaUni on the world: the sizes of its queries and LIM, and Stages I and II as whole training configs."""

    num_queries: int = field(default=32, metadata={"help": "learnable queries = condition tokens"})
    connector_layers: int = 2
    connector_heads: int = 4
    connector_intermediate: int = 384
    stage1: TrainConfig = field(
        default_factory=lambda: world_stage_defaults(1),
        metadata={
            "help": "Stage I (queries + LIM). On the shipped Stage 0, 1200 steps at batch 16 and lr 3e-3 scored 0.433 "
            "on ShapesEval, 600 at batch 32 and lr 1e-3 0.281; batch 16 learnt faster per CPU-second than 32. "
            "condition_distill (1.0) also pulls the condition to the Stage-0 DiT's own text-encoder states (not in "
            "the paper; 0 = the flow loss alone, which collapses here). image_size follows world.image_size and "
            "seed world.seed + 1 unless given (docs/world.md)"
        },
    )
    stage2: TrainConfig = field(
        default_factory=lambda: world_stage_defaults(2),
        metadata={
            "help": "Stage II (+ the DiT), on Stage I's model; image_size follows world.image_size and seed "
            "world.seed + 2 unless given"
        },
    )

    def stage(self, n: int) -> TrainConfig:
        """The training config of Stage ``n`` (1 or 2)."""
        if n not in (1, 2):
            raise ConfigError(f"the world trains ParaUni's Stages 1 and 2 with a TrainConfig, not stage {n}")
        return self.stage1 if n == 1 else self.stage2


@dataclass
class WorldEvalConfig:
    """ShapesEval: prompts per GenEval tag, images per prompt and the sampler."""

    per_tag: int = 40
    images_per_prompt: int = 4
    steps: int = field(default=10, metadata={"help": "sampler steps (20 scored the same, at twice the time)"})
    cfg: float = 2.0
    sampler: str = "dpm"
    batch_size: int = 64


@dataclass
class WorldRewardConfig:
    """The world's reward models, trained at the end of Stage 0: a small CLIP (contrastive on world captions,
    the stand-in for CLIP ViT-L/14) and an aesthetic MLP on its image embeddings (LAION's predictor's
    stand-in) that ranks clean renders above blurred, noised and jittered ones."""

    patch: int = field(default=4, metadata={"help": "CLIP vision patch size"})
    vision_hidden: int = field(default=96, metadata={"help": "CLIP vision width"})
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_length: int = field(default=64, metadata={"help": "CLIP text positions (world captions <= 43)"})
    projection_dim: int = 64
    steps: int = field(default=300, metadata={"help": "contrastive training steps"})
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    grad_clip: float = 1.0
    hard_negatives: bool = field(
        default=True,
        metadata={
            "help": "add one caption per GenEval-style example with a swapped colour / relation / count"
        },
    )
    aesthetic_hidden: list[int] = field(
        default_factory=lambda: [64, 16],
        metadata={"help": "hidden widths of the aesthetic MLP (LAION's: 1024-128-64-16)"},
    )
    aesthetic_dropout: float = 0.1
    aesthetic_steps: int = 100
    aesthetic_batch_size: int = 64
    aesthetic_lr: float = 1e-3
    aesthetic_warmup: int = 10
    aesthetic_weight_decay: float = 0.01


@dataclass
class WorldConfig:
    """Everything about the embedded default world."""

    image_size: int = field(default=32, metadata={"help": "side of the world's square images"})
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the world's example streams and Stage 0; Stages I and II use world.seed + 1 and + 2 "
            "unless their own seed is given"
        },
    )
    save_every: int = field(
        default=100,
        metadata={"help": "Stage-0 checkpoints every N steps of each model (resuming; no effect on results)"},
    )
    vlm: WorldVLMConfig = field(default_factory=WorldVLMConfig)
    ae: WorldAEConfig = field(default_factory=WorldAEConfig)
    t2i: WorldT2IConfig = field(default_factory=WorldT2IConfig)
    parauni: WorldParaUniConfig = field(default_factory=WorldParaUniConfig)
    eval: WorldEvalConfig = field(default_factory=WorldEvalConfig)
    reward: WorldRewardConfig = field(default_factory=WorldRewardConfig)
    rl: RLConfig = field(
        default_factory=world_rl_defaults,
        metadata={
            "help": "Stage III, the library's RLConfig with the world's defaults: override as --world.rl.key=value, "
            "a phase as --world.rl.phases.0.epochs=4 (parauni.world.rl)"
        },
    )

    def __post_init__(self) -> None:
        dit_multiple = self.t2i.dit_patch * (2 ** (len(self.ae.channels) - 1) if self.ae.enabled else 1)
        if self.image_size % (4 * self.vlm.patch) or self.image_size % dit_multiple:
            raise ConfigError(
                f"world.image_size={self.image_size} must be a multiple of 4 x vlm.patch ({4 * self.vlm.patch}) "
                f"and of the autoencoder factor x t2i.dit_patch ({dit_multiple})"
            )
        if self.t2i.text_tokens and self.t2i.text_tokens != self.parauni.num_queries:
            raise ConfigError(
                f"world.t2i.text_tokens={self.t2i.text_tokens} must equal world.parauni.num_queries="
                f"{self.parauni.num_queries} (the DiT is pretrained on as many condition tokens as ParaUni gives), "
                "or be 0 (masked captions)"
            )
        for stage in (self.parauni.stage1, self.parauni.stage2):
            if stage.image_size != self.image_size:
                raise ConfigError(
                    f"world.parauni.stage{stage.stage}.image_size={stage.image_size} differs from world.image_size="
                    f"{self.image_size}: the world draws its examples at world.image_size; leave the stage's "
                    "image_size out (it follows world.image_size)"
                )
        if self.image_size % self.reward.patch:
            raise ConfigError(
                f"world.image_size={self.image_size} must be a multiple of reward.patch ({self.reward.patch})"
            )

    def quick(self) -> WorldConfig:
        """A copy with every stage shortened to a few steps and smaller models (CI smoke runs)."""
        q = copy.deepcopy(self)
        q.vlm.steps, q.vlm.warmup, q.vlm.batch_size = 4, 1, 8
        q.vlm.hidden, q.vlm.intermediate, q.vlm.layers = 64, 128, 4
        q.ae.steps, q.ae.batch_size = 3, 8
        q.t2i.steps, q.t2i.warmup, q.t2i.batch_size = 4, 1, 8
        q.t2i.text_steps, q.t2i.text_batch_size = 3, 8
        q.t2i.dit_layers, q.t2i.text_layers, q.t2i.text_hidden = 2, 1, 64
        q.parauni.connector_intermediate = 128
        q.t2i.text_tokens = q.parauni.num_queries = 16
        for stage in (q.parauni.stage1, q.parauni.stage2):
            stage.steps, stage.warmup, stage.batch_size, stage.save_every = 3, 1, 8, 3
        q.eval.per_tag, q.eval.images_per_prompt, q.eval.steps = 1, 2, 4
        q.reward.vision_hidden = q.reward.text_hidden = 32
        q.reward.vision_layers = q.reward.text_layers = 1
        q.reward.steps, q.reward.warmup, q.reward.batch_size = 3, 1, 8
        q.reward.aesthetic_steps, q.reward.aesthetic_batch_size = 3, 8
        for phase in q.rl.phases:
            phase.epochs = 1
        q.rl.prompts_per_epoch, q.rl.group_size, q.rl.steps, q.rl.micro_batch = 2, 2, 3, 4
        return q


def world_config(
    overrides: list[str] | None = None, quick: bool = False, base: dict | None = None
) -> WorldConfig:
    """The world config with ``section.key=value`` overrides (``--`` and ``world.`` prefixes optional), applied
    on ``base`` (a dict of some of its fields, e.g. a Stage-0 release's ``world.json``) over the defaults."""
    items = [o[2:] if o.startswith("--") else o for o in overrides or []]
    items = [o.removeprefix("world.") for o in items]
    data = dataclasses.asdict(WorldConfig())
    for key, value in (base or {}).items():
        if isinstance(value, dict):
            data[key].update(value)
        elif key in data:
            data[key] = value
    data = apply_overrides(data, items, schema=WorldConfig)
    given = {item.split("=", 1)[0] for item in items}
    for n in (1, 2):  # a stage's image size and seed follow the world's unless given
        stage = data["parauni"][f"stage{n}"]
        if f"parauni.stage{n}.image_size" not in given:
            stage["image_size"] = data["image_size"]
        if f"parauni.stage{n}.seed" not in given:
            stage["seed"] = data["seed"] + n
    cfg = from_dict(WorldConfig, data, prefix="world.")
    return cfg.quick() if quick else cfg


def default_cache_dir() -> Path:
    """Where the quick from-scratch Stage 0 is cached: ``$PARAUNI_CACHE`` or ``~/.cache/parauni/world``."""
    return Path(os.environ.get("PARAUNI_CACHE", Path.home() / ".cache" / "parauni" / "world"))
