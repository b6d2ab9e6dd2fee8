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

from ..config import LIMConfig, SamplingConfig, TrainableConfig, apply_overrides, from_dict
from ..errors import ConfigError
from ..rl.config import PhaseConfig, RLConfig
from ..rl.ldam import LDAMConfig
from ..training.config import TrainConfig
from .captions import TWIN_KINDS

IMAGE_SIZE = 32  # the world's default image side (world.image_size)
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


def transformer_sizes(hidden: int, layers: int, heads: int, intermediate: int) -> dict[str, int]:
    """The size keys that the Hugging Face configs of the world's transformers share (its VLM's two towers,
    the DiT's text encoder, both CLIP towers)."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
    }


def world_paper_rl() -> RLConfig:
    """Stage III on the world as the paper runs it (``world.rl_recipe=paper``): its curriculum (aesthetic on the
    middle zone, then CLIP with ShapesEval partial credit on the deep zone) with Flow-GRPO at a CPU's scale, a
    rank-8 LoRA on the DiT and LDAM's looser world gates (``parauni.world.rl``'s docstring measures them)."""
    return RLConfig(
        phases=[
            PhaseConfig("aesthetic", {"aesthetic": 1.0}, epochs=8, zone="middle", beta=0.02),
            PhaseConfig("clip+geneval", {"clip": 1.0, "geneval": 1.0}, epochs=8, zone="deep", beta=0.02),
        ],
        prompts_per_epoch=16,
        group_size=4,
        steps=10,
        cfg=2.0,
        lr=1e-3,
        updates_per_epoch=1,
        micro_batch=16,
        rollout_batch=64,
        trainable=TrainableConfig(queries=False, lim=False, dit=False, dit_lora_rank=8, dit_lora_alpha=8),
        ldam=LDAMConfig(window=3, drop_epochs=1, grad_sigmas=0.0),
        ema=0.0,  # runs of a few dozen steps: Flow-GRPO's EMA (0.9 every 8 steps) would keep the Stage-II model
        eval_prompts=32,  # held-out prompts at the start and each phase's end: a phase's rise, paired by prompt
        eval_images=4,
        save_every=5,
        keep_last=1,
    )


def world_rl_defaults() -> RLConfig:
    """Stage III on the world (``world.rl_recipe=nft``, the demo's): the paper's curriculum and LDAM as
    :func:`world_paper_rl`, with DiffusionNFT's objective in place of Flow-GRPO's (not in the paper): the whole
    DiT at lr 3e-4, deterministic rollouts of 32 prompts x 8 images an epoch, aesthetic for 2 epochs, then CLIP
    at half the weight of the ShapesEval credit for 16, no KL. Measured against the paper's recipe in
    docs/world.md ("Stage III on the world", ninth pass): it raises ShapesEval (+0.017 +- 0.007 over four whole
    demos) where the paper's recipe did not (-0.004 +- 0.008)."""
    paper = world_paper_rl()
    return dataclasses.replace(
        paper,
        phases=[
            PhaseConfig("aesthetic", {"aesthetic": 1.0}, epochs=2, zone="middle", beta=0.0),
            PhaseConfig("clip+geneval", {"clip": 0.5, "geneval": 1.0}, epochs=16, zone="deep", beta=0.0),
        ],
        objective="nft",
        eta=0.0,
        prompts_per_epoch=32,
        group_size=8,
        micro_batch=32,
        timestep_fraction=0.4,
        lr=3e-4,
        lr_schedule="constant",
        trainable=TrainableConfig(queries=False, lim=False, dit=True, dit_lora_rank=0),
    )


RL_RECIPES = {"nft": world_rl_defaults, "paper": world_paper_rl}
"""``world.rl_recipe``: the Stage-III config that ``--world.rl.*`` overrides apply to."""


def rl_recipe(name: str) -> RLConfig:
    """The Stage-III config of ``world.rl_recipe=name`` (an error naming the choices for another name)."""
    if name not in RL_RECIPES:
        raise ConfigError(f"world.rl_recipe={name!r}: choose one of {list(RL_RECIPES)}")
    return RL_RECIPES[name]()


def world_stage_defaults(stage: int) -> TrainConfig:
    """Stage I or II on the world: the paper's recipe (AdamW 0.9/0.95, wd 0.05, warm-up + cosine, clip 1.0,
    10% caption dropout) at the world's scale, with logit-normal times as in Stage 0, and condition distillation
    against the Stage-0 DiT's own text encoder with its tokens matched one to one (not in the paper;
    docs/world.md). Stage I learns from the distillation alone (``flow_weight=0``: the DiT is frozen there and
    the flow loss added nothing measurable), with each caption's twin (``world.parauni.twins``) at weight 0.3;
    ``flow_weight=1 distill_match=position distill_twins=0`` is the earlier recipe."""
    steps, lr, warmup = (1200, 3e-3, 20) if stage == 1 else (150, 1e-4, 10)
    return TrainConfig(
        stage=stage,
        steps=steps,
        batch_size=16,
        lr=lr,
        warmup=warmup,
        timestep_sampling="logit_normal",
        condition_distill=1.0,
        distill_match="assignment",
        flow_weight=0.0 if stage == 1 else 1.0,
        distill_twins=0.3 if stage == 1 else 0.0,
        image_size=IMAGE_SIZE,  # derived from world.image_size (WorldConfig.derive)
        save_every=steps // 4,
        keep_last=1,
        log_every=5,
        seed=stage,
    )


@dataclass
class FitConfig:
    """How one Stage-0 model is trained (:func:`parauni.world.fit.fit`): AdamW with weight decay on matrices only,
    linear warm-up then cosine to 0, gradient-norm clipping."""

    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup: int = field(default=20, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"a Stage-0 train section's {name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.warmup < 0 or len(self.betas) != 2:
            raise ConfigError(
                f"a Stage-0 train section needs lr > 0, warmup >= 0 and two betas; got lr={self.lr}, "
                f"warmup={self.warmup}, betas={self.betas}"
            )


def world_t2i_train_defaults() -> TrainConfig:
    """The DiT stage of Stage 0 (the trainer's stage 0): SANA's recipe at the world's scale, logit-normal times."""
    return TrainConfig(
        stage=0,
        steps=1200,
        batch_size=64,
        lr=2e-3,
        warmup=50,
        weight_decay=0.01,
        timestep_sampling="logit_normal",
        image_size=IMAGE_SIZE,  # derived from world.image_size (WorldConfig.derive)
        save_every=100,
        keep_last=1,
        log_every=10,
        seed=0,
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
    train: FitConfig = field(
        default_factory=lambda: FitConfig(steps=100, warmup=30),
        metadata={"help": "its pretraining: captioning world images and a language model on world captions"},
    )
    restate: bool = field(
        default=False,
        metadata={
            "help": "text rows continue the generation prompt with the caption, so that the positions of the "
            "queries carry the prompt (docs/world.md; not the demo default)"
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
    train: FitConfig = field(
        default_factory=lambda: FitConfig(steps=400, weight_decay=0.0),
        metadata={"help": "its training: reconstruction of world images"},
    )
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
    text_train: FitConfig = field(
        default_factory=FitConfig,
        metadata={"help": "the text encoder's language-model pretraining on world captions"},
    )
    text_tokens: int = field(
        default=32,
        metadata={
            "help": "captions padded (or cut) to parauni.num_queries tokens, all read by the DiT, padding "
            "states included, so that every condition token ParaUni gives was seen in Stage 0 (any value but 0 "
            "means that; a different one is an error); 0 = padded to the batch's longest and masked"
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
            "help": "DiT patch size on its input (latents, or pixels); 2 is faster and draws the requested shape "
            "less often (docs/world.md)"
        },
    )
    mlp_ratio: float = 2.5
    train: TrainConfig = field(
        default_factory=world_t2i_train_defaults,
        metadata={
            "help": "the DiT stage, run by the library's trainer as its stage 0; image_size is world.image_size; "
            "seed and save_every follow world.seed and world.save_every unless given"
        },
    )


def world_default(cls: type, name: str, value, help: str | None = None):
    """The field ``name`` of the library config ``cls`` with the world's default ``value`` (and its help, or
    ``help``): a world section that extends a library config states only the defaults it changes."""
    metadata = next(f for f in dataclasses.fields(cls) if f.name == name).metadata
    return field(default=value, metadata={**metadata, **({"help": help} if help else {})})


@dataclass
class WorldParaUniConfig(LIMConfig):
    """ParaUni on the world: the library's LIMConfig (queries and LIM) at the world's widths, and Stages I and
    II as whole training configs."""

    num_queries: int = world_default(LIMConfig, "num_queries", 32, "learnable queries = condition tokens")
    connector_layers: int = world_default(LIMConfig, "connector_layers", 2)
    connector_heads: int = world_default(LIMConfig, "connector_heads", 4)
    connector_intermediate: int = world_default(LIMConfig, "connector_intermediate", 384)
    use_layernorm: bool = world_default(
        LIMConfig,
        "use_layernorm",
        False,
        "the LIM's shared LayerNorm before the mean, which the paper has; off on the world, where it makes "
        "every layer carry the whole condition (docs/world.md); true = the paper's LIM",
    )
    whiten: bool = world_default(
        LIMConfig,
        "whiten",
        True,
        "whiten each layer's query states before the connector (not in the paper): the world VLM holds the "
        "shape words in directions of tiny variance, which the connector otherwise hardly learns "
        "(docs/world.md); false = the paper's LIM input",
    )
    twins: str = field(
        default="shape",
        metadata={
            "help": "the twin each caption gets when a stage's distill_twins > 0: 'shape' (its last shape word "
            "replaced, the world's default), 'binding' (its colours exchanged or its relation turned round) or "
            "'both' (one of the two per caption); the condition's difference between the two is pulled to the "
            "teacher's (docs/world.md)"
        },
    )
    stage1: TrainConfig = field(
        default_factory=lambda: world_stage_defaults(1),
        metadata={
            "help": "Stage I (queries + LIM): condition distillation towards the Stage-0 DiT's own text encoder, "
            "tokens matched one to one, with shape twins at 0.3 (distill_twins), without the flow loss (not in "
            "the paper; flow_weight=1 distill_twins=0 restores it). "
            "image_size is world.image_size; seed follows world.seed + 1 unless given (docs/world.md)"
        },
    )
    stage2: TrainConfig = field(
        default_factory=lambda: world_stage_defaults(2),
        metadata={
            "help": "Stage II (+ the DiT), on Stage I's model; image_size is world.image_size; seed follows "
            "world.seed + 2 unless given"
        },
    )

    def stage(self, n: int) -> TrainConfig:
        """The training config of Stage ``n`` (1 or 2)."""
        if n not in (1, 2):
            raise ConfigError(f"the world trains ParaUni's Stages 1 and 2 with a TrainConfig, not stage {n}")
        return self.stage1 if n == 1 else self.stage2


@dataclass
class WorldEvalConfig(SamplingConfig):
    """ShapesEval: prompts per GenEval tag and images per prompt, and the sampler of the world's models (the
    library's SamplingConfig)."""

    steps: int = world_default(SamplingConfig, "steps", 10)
    cfg: float = world_default(SamplingConfig, "cfg", 2.0)
    height: int = world_default(SamplingConfig, "height", IMAGE_SIZE, "always world.image_size")
    width: int = world_default(SamplingConfig, "width", IMAGE_SIZE, "always world.image_size")
    per_tag: int = field(default=40, metadata={"help": "ShapesEval prompts per GenEval tag"})
    images_per_prompt: int = field(default=4, metadata={"help": "ShapesEval images per prompt"})
    batch_size: int = field(default=64, metadata={"help": "ShapesEval images per model call"})


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
    train: FitConfig = field(
        default_factory=lambda: FitConfig(steps=300, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.98]),
        metadata={"help": "the CLIP's contrastive training on world captions"},
    )
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
    aesthetic_train: FitConfig = field(
        default_factory=lambda: FitConfig(steps=100, lr=1e-3, warmup=10, betas=[0.9, 0.98], grad_clip=0.0),
        metadata={"help": "the aesthetic MLP's ranking training on the frozen CLIP's embeddings"},
    )


@dataclass
class WorldConfig:
    """Everything about the embedded default world."""

    image_size: int = field(default=IMAGE_SIZE, metadata={"help": "side of the world's square images"})
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
    rl_recipe: str = field(
        default="nft",
        metadata={
            "help": "Stage III's starting point, before any --world.rl.* override: 'nft' (the demo's: the paper's "
            "curriculum with DiffusionNFT's objective on the whole DiT, not in the paper) or 'paper' (the paper's "
            "Flow-GRPO on a rank-8 LoRA); docs/world.md measures both"
        },
    )
    rl: RLConfig = field(
        default_factory=world_rl_defaults,
        metadata={
            "help": "Stage III, the library's RLConfig with the world's defaults (world.rl_recipe's): override as "
            "--world.rl.key=value, a phase as --world.rl.phases.0.epochs=4 (parauni.world.rl)"
        },
    )

    def __post_init__(self) -> None:
        dit_multiple = self.t2i.dit_patch * (2 ** (len(self.ae.channels) - 1) if self.ae.enabled else 1)
        if self.image_size % (4 * self.vlm.patch) or self.image_size % dit_multiple:
            raise ConfigError(
                f"world.image_size={self.image_size} must be a multiple of 4 x vlm.patch ({4 * self.vlm.patch}) "
                f"and of the autoencoder factor x t2i.dit_patch ({dit_multiple})"
            )
        for key, train, stage in (
            ("t2i.train", self.t2i.train, 0),
            ("parauni.stage1", self.parauni.stage1, 1),
            ("parauni.stage2", self.parauni.stage2, 2),
        ):
            if train.stage != stage:
                raise ConfigError(f"world.{key}.stage={train.stage} must be {stage}")
        rl_recipe(self.rl_recipe)  # a known name
        if self.parauni.twins not in TWIN_KINDS:
            raise ConfigError(f"world.parauni.twins={self.parauni.twins!r}: choose one of {list(TWIN_KINDS)}")
        if self.image_size % self.reward.patch:
            raise ConfigError(
                f"world.image_size={self.image_size} must be a multiple of reward.patch ({self.reward.patch})"
            )
        self.derive()

    def derive(self) -> None:
        """Set the fields of :data:`DERIVED` from their sources (``t2i.text_tokens`` only when it is not 0)."""
        for key, source in DERIVED.items():
            if key != "t2i.text_tokens" or self.t2i.text_tokens:
                _set_path(self, key, _get_path(self, source))

    def quick(self) -> WorldConfig:
        """A copy with every stage shortened to a few steps and smaller models (CI smoke runs)."""
        q = copy.deepcopy(self)
        q.vlm.train.steps, q.vlm.train.warmup, q.vlm.train.batch_size = 4, 1, 8
        q.vlm.hidden, q.vlm.intermediate, q.vlm.layers = 64, 128, 4
        q.ae.train.steps, q.ae.train.batch_size = 3, 8
        q.t2i.train.steps, q.t2i.train.warmup, q.t2i.train.batch_size = 4, 1, 8
        q.t2i.text_train.steps, q.t2i.text_train.batch_size = 3, 8
        q.t2i.dit_layers, q.t2i.text_layers, q.t2i.text_hidden = 2, 1, 64
        q.parauni.connector_intermediate = 128
        q.t2i.text_tokens = q.parauni.num_queries = 16
        for stage in (q.parauni.stage1, q.parauni.stage2):
            stage.steps, stage.warmup, stage.batch_size, stage.save_every = 3, 1, 8, 3
        q.eval.per_tag, q.eval.images_per_prompt, q.eval.steps = 1, 2, 4
        q.reward.vision_hidden = q.reward.text_hidden = 32
        q.reward.vision_layers = q.reward.text_layers = 1
        q.reward.train.steps, q.reward.train.warmup, q.reward.train.batch_size = 3, 1, 8
        q.reward.aesthetic_train.steps, q.reward.aesthetic_train.batch_size = 3, 8
        for phase in q.rl.phases:
            phase.epochs = 1
        q.rl.prompts_per_epoch, q.rl.group_size, q.rl.steps, q.rl.micro_batch = 2, 2, 3, 4
        q.rl.eval_prompts, q.rl.eval_images = min(q.rl.eval_prompts, 2), 2
        q.derive()
        return q


# Fields that are another field of the world config, set from it (WorldConfig.derive): key -> source. A command
# line may name one only with its source's value (t2i.text_tokens: or 0, masked captions).
DERIVED: dict[str, str] = {
    "parauni.stage1.image_size": "image_size",
    "parauni.stage2.image_size": "image_size",
    "t2i.train.image_size": "image_size",
    "eval.height": "image_size",
    "eval.width": "image_size",
    "t2i.text_tokens": "parauni.num_queries",
}


def _get_path(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(obj, key: str, value) -> None:
    section, name = key.rsplit(".", 1)
    setattr(_get_path(obj, section), name, value)


# Fields of the nested training configs that follow a world-level field unless given: (key, world field, offset).
FOLLOWS: tuple[tuple[str, str, int], ...] = (
    ("parauni.stage1.seed", "seed", 1),
    ("parauni.stage2.seed", "seed", 2),
    ("t2i.train.seed", "seed", 0),
    ("t2i.train.save_every", "save_every", 0),
)
# The flat Stage-0 keys of an earlier world.json, before the train sections (e.g. the shipped release's;
# docs/world.md): section -> {flat key: (train section, key in it)}.
_FIT_KEYS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "betas", "grad_clip")
FLAT_STAGE0_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "vlm": {k: ("train", k) for k in _FIT_KEYS},
    "ae": {k: ("train", k) for k in _FIT_KEYS},
    "t2i": {
        **{f"text_{k}": ("text_train", k) for k in _FIT_KEYS},
        **{
            k: ("train", k)
            for k in ("steps", "batch_size", "lr", "warmup", "weight_decay", "caption_dropout", "ema")
        },
        "timestep_sampling": ("train", "timestep_sampling"),
    },
    "reward": {
        **{k: ("train", k) for k in _FIT_KEYS},
        **{
            f"aesthetic_{k}": ("aesthetic_train", k)
            for k in ("steps", "batch_size", "lr", "warmup", "weight_decay")
        },
    },
}


def nest_flat_stage0(data: dict) -> dict:
    """``data`` (some world-config fields) with the flat Stage-0 keys of an earlier ``world.json`` moved into
    their train sections (``vlm.steps`` -> ``vlm.train.steps``; the aesthetic MLP then shared the CLIP's betas
    and did not clip its gradients). Nested data comes back unchanged."""
    out = copy.deepcopy(data)
    for section, moves in FLAT_STAGE0_KEYS.items():
        node = out.get(section)
        if not isinstance(node, dict) or not set(node) & set(moves):
            continue
        if section == "reward" and "aesthetic_steps" in node:
            node.setdefault("aesthetic_grad_clip", 0.0)
            moves = {**moves, "aesthetic_grad_clip": ("aesthetic_train", "grad_clip")}
            if "betas" in node:
                node.setdefault("aesthetic_betas", node["betas"])
                moves["aesthetic_betas"] = ("aesthetic_train", "betas")
        for flat, (train, key) in moves.items():
            if flat in node:
                node.setdefault(train, {})[key] = node.pop(flat)
    return out


def stage0_base(data: dict) -> dict:
    """A Stage-0 folder's ``world.json`` as a ``base`` of :func:`world_config`: flat keys nested, the version
    dropped, and as many queries as condition tokens its DiT was trained on."""
    base = nest_flat_stage0(data)
    base.pop("version", None)
    if tokens := base.get("t2i", {}).get("text_tokens", 0):
        base["parauni"] = {"num_queries": tokens}
    return base


def _merge(into: dict, new: dict) -> None:
    """Deep-update the nested dict ``into`` with ``new`` (a section given in part keeps its other fields)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _node(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def _check_derived(data: dict, given: set[str]) -> None:
    """A ConfigError for a derived key (:data:`DERIVED`) given a value other than its source's."""
    for key, source in DERIVED.items():
        value, wanted = _node(data, key), _node(data, source)
        if key not in given or value == wanted or (key == "t2i.text_tokens" and value == 0):
            continue
        if key == "t2i.text_tokens":
            raise ConfigError(
                f"world.t2i.text_tokens={value} must equal world.{source}={wanted} (the DiT is pretrained on as "
                "many condition tokens as ParaUni gives), or be 0 (masked captions)"
            )
        raise ConfigError(
            f"world.{key}={value} differs from world.{source}={wanted}: it is always world.{source}; leave it out"
        )


def world_config(
    overrides: list[str] | None = None, quick: bool = False, base: dict | None = None
) -> WorldConfig:
    """The world config with ``section.key=value`` overrides (``--`` and ``world.`` prefixes optional), applied
    on ``base`` (a dict of some of its fields, e.g. a Stage-0 release's ``world.json``) over the defaults."""
    items = [o[2:] if o.startswith("--") else o for o in overrides or []]
    items = [o.removeprefix("world.") for o in items]
    data = dataclasses.asdict(WorldConfig())
    _merge(data, nest_flat_stage0(base or {}))
    recipe = [item.split("=", 1)[1] for item in items if item.split("=", 1)[0] == "rl_recipe"]
    if recipe:  # the recipe first, so that the rl.* overrides refine it whatever their order
        data["rl"] = dataclasses.asdict(rl_recipe(recipe[-1]))
    data = apply_overrides(data, items, schema=WorldConfig)
    given = {item.split("=", 1)[0] for item in items}
    _check_derived(data, given)
    for key, source, offset in FOLLOWS:
        if key not in given:
            section, name = key.rsplit(".", 1)
            _node(data, section)[name] = data[source] + offset
    cfg = from_dict(WorldConfig, data, prefix="world.")
    return cfg.quick() if quick else cfg


def default_cache_dir() -> Path:
    """Where the quick from-scratch Stage 0 is cached: ``$PARAUNI_CACHE`` or ``~/.cache/parauni/world``."""
    return Path(os.environ.get("PARAUNI_CACHE", Path.home() / ".cache" / "parauni" / "world"))
