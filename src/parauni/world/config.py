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


@dataclass
class WorldRLConfig:
    """Stage III on the world (the paper's recipe scaled down; see :class:`parauni.rl.config.RLConfig`)."""

    enabled: bool = field(default=True, metadata={"help": "run Stage III in the demo"})
    aesthetic_epochs: int = field(default=8, metadata={"help": "epochs of phase 1 (world aesthetic)"})
    clip_epochs: int = field(
        default=8, metadata={"help": "epochs of phase 2 (world CLIP + ShapesEval credit)"}
    )
    geneval_weight: float = field(
        default=1.0, metadata={"help": "weight of ShapesEval partial credit in phase 2"}
    )
    prompts_per_epoch: int = 16
    group_size: int = 4
    steps: int = field(default=10, metadata={"help": "SDE sampling steps"})
    cfg: float = field(default=2.0, metadata={"help": "CFG of rollouts (the world's sampling CFG)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW peak lr of the LoRA"})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "'cosine' (the paper's, to 0 over the run) or 'constant'"}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank on the DiT (0: train queries + LIM)"})
    beta: float = field(default=0.02, metadata={"help": "KL weight"})
    updates_per_epoch: int = field(default=1, metadata={"help": "1: every update on-policy"})
    micro_batch: int = 16
    ldam: bool = field(default=True, metadata={"help": "LDAM on (off: plain Flow-GRPO)"})
    ldam_window: int = field(default=3, metadata={"help": "LDAM window W (paper: 5)"})
    ldam_drop_epochs: int = field(
        default=1,
        metadata={
            "help": "reward-drop gate: consecutive drops r_s (paper: 5, which never fires in 12 epochs)"
        },
    )
    ldam_grad_sigmas: float = field(
        default=0.0,
        metadata={"help": "grad-norm gate: above the window's mean + this many stds (paper's reading: 2)"},
    )
    ldam_reward_gate: bool = field(
        default=True, metadata={"help": "require the reward-drop gate (off: paper ablation 7)"}
    )
    ldam_grad_gate: bool = field(
        default=True, metadata={"help": "require the grad-norm gate (off: paper ablation 6)"}
    )
    cache_conditions: bool = field(
        default=True,
        metadata={"help": "run the frozen VLM once per prompt and epoch (see rl.cache_conditions)"},
    )
    seed: int = 0


def world_rl_config(w: WorldRLConfig, image_size: int) -> RLConfig:
    """The :class:`RLConfig` of a world run."""
    phase2 = {"clip": 1.0}
    if w.geneval_weight > 0:
        phase2["geneval"] = w.geneval_weight
    trainable = (
        TrainableConfig(
            queries=False, lim=False, dit=False, dit_lora_rank=w.lora_rank, dit_lora_alpha=w.lora_rank
        )
        if w.lora_rank > 0
        else TrainableConfig(queries=True, lim=True, dit=False)
    )
    return RLConfig(
        phases=[
            PhaseConfig("aesthetic", {"aesthetic": 1.0}, w.aesthetic_epochs, "middle", w.beta),
            PhaseConfig("clip+geneval", phase2, w.clip_epochs, "deep", w.beta),
        ],
        prompts_per_epoch=w.prompts_per_epoch,
        group_size=w.group_size,
        steps=w.steps,
        cfg=w.cfg,
        height=image_size,
        width=image_size,
        lr=w.lr,
        lr_schedule=w.lr_schedule,
        updates_per_epoch=w.updates_per_epoch,
        micro_batch=w.micro_batch,
        rollout_batch=w.prompts_per_epoch * w.group_size,
        trainable=trainable,
        ldam=LDAMConfig(
            enabled=w.ldam,
            window=w.ldam_window,
            drop_epochs=w.ldam_drop_epochs,
            grad_sigmas=w.ldam_grad_sigmas,
            reward_gate=w.ldam_reward_gate,
            grad_gate=w.ldam_grad_gate,
        ),
        cache_conditions=w.cache_conditions,
        save_every=5,
        keep_last=1,
        seed=w.seed,
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
    """ParaUni on the world: queries + LIM sizes and Stages I and II."""

    num_queries: int = field(default=32, metadata={"help": "learnable queries = condition tokens"})
    connector_layers: int = 2
    connector_heads: int = 4
    connector_intermediate: int = 384
    stage1_steps: int = field(
        default=1200,
        metadata={
            "help": "Stage-I steps (on the shipped Stage 0, 1200 at batch 16 and lr 3e-3 scored 0.433 on ShapesEval; "
            "600 at batch 32 and lr 1e-3 scored 0.281; docs/world.md)"
        },
    )
    stage1_lr: float = field(
        default=3e-3, metadata={"help": "Stage-I peak learning rate (warm-up then cosine)"}
    )
    stage1_warmup: int = 20
    stage2_steps: int = 150
    stage2_lr: float = 1e-4
    stage2_warmup: int = 10
    batch_size: int = field(
        default=16,
        metadata={"help": "Stages I and II (16 learnt faster per CPU-second than 32; docs/world.md)"},
    )
    timestep_sampling: str = field(
        default="logit_normal", metadata={"help": "as in Stage 0 (the paper: uniform)"}
    )
    stage1_distill: float = field(
        default=1.0,
        metadata={
            "help": "train.condition_distill of Stage I: the condition is also pulled to the Stage-0 DiT's own "
            "text-encoder states (not in the paper; 0 = its flow loss alone, which collapses here, docs/world.md)"
        },
    )
    stage2_distill: float = field(default=1.0, metadata={"help": "train.condition_distill of Stage II"})


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
    seed: int = 0
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
    rl: WorldRLConfig = field(default_factory=WorldRLConfig)

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
        q.parauni.stage1_steps = q.parauni.stage2_steps = 3
        q.parauni.stage1_warmup = q.parauni.stage2_warmup = 1
        q.parauni.batch_size = 8
        q.eval.per_tag, q.eval.images_per_prompt, q.eval.steps = 1, 2, 4
        q.reward.vision_hidden = q.reward.text_hidden = 32
        q.reward.vision_layers = q.reward.text_layers = 1
        q.reward.steps, q.reward.warmup, q.reward.batch_size = 3, 1, 8
        q.reward.aesthetic_steps, q.reward.aesthetic_batch_size = 3, 8
        q.rl.aesthetic_epochs = q.rl.clip_epochs = 1
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
    cfg = from_dict(WorldConfig, apply_overrides(data, items), prefix="world.")
    return cfg.quick() if quick else cfg


def default_cache_dir() -> Path:
    """Where the quick from-scratch Stage 0 is cached: ``$PARAUNI_CACHE`` or ``~/.cache/parauni/world``."""
    return Path(os.environ.get("PARAUNI_CACHE", Path.home() / ".cache" / "parauni" / "world"))
