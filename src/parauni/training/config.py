"""Training configuration for Stages I and II (supplementary Table 1; docs/how-it-works.md, "Training")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, check_choice, from_dict
from ..diffusion.flow import CONDITION_MATCHES, TIMESTEP_SAMPLING

MAX_SEED = 2**32 - 1  # the data order's NumPy generator and the per-example torch seeds stay in range

# The paper's recipe per stage; a TrainConfig starts from these (its own defaults are Stage I's) and takes
# overrides.
STAGE_DEFAULTS: dict[int, dict] = {
    1: {"lr": 1e-4, "batch_size": 512, "steps": 100_000, "warmup": 1_000},
    2: {"lr": 1e-5, "batch_size": 512, "steps": 10_000, "warmup": 100},
}


@dataclass
class TrainConfig:
    """One training stage. Stage I trains queries + LIM (DiT frozen); Stage II also the DiT."""

    stage: int = field(
        default=1,
        metadata={"help": "1 (align: queries + LIM), 2 (fine-tune: + DiT); 0 = the world's T2I pretraining"},
    )
    steps: int = field(default=STAGE_DEFAULTS[1]["steps"], metadata={"help": "optimizer steps"})
    batch_size: int = field(
        default=STAGE_DEFAULTS[1]["batch_size"],
        metadata={"help": "global batch size (all processes, all micro-steps)"},
    )
    grad_accum: int = field(
        default=1, metadata={"help": "gradient accumulation micro-steps per optimizer step"}
    )
    lr: float = field(default=STAGE_DEFAULTS[1]["lr"], metadata={"help": "peak learning rate"})
    warmup: int = field(default=STAGE_DEFAULTS[1]["warmup"], metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine decays to lr * min_lr_ratio"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on 1-D params)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    caption_dropout: float = field(
        default=0.1, metadata={"help": "probability of the unconditional template"}
    )
    timestep_sampling: str = field(default="uniform", metadata={"help": f"one of {TIMESTEP_SAMPLING}"})
    logit_mean: float = field(default=0.0, metadata={"help": "logit-normal mean"})
    logit_std: float = field(default=1.0, metadata={"help": "logit-normal std"})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' (accelerate)"})
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the DiT's and the connector's activations in the backward pass"},
    )
    ema: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the trained weights, updated after every optimizer step (0 = off); the saved "
            "model holds the EMA weights and the run folder also keeps the last raw ones (raw_trainable.safetensors)"
        },
    )
    condition_distill: float = field(
        default=0.0,
        metadata={
            "help": "weight of an extra loss pulling the condition's first tokens to the states of the DiT's own "
            "pretraining text encoder on the same captions, and their variation across the batch to the teacher's "
            "(parauni.diffusion.flow.condition_match_loss; 0 = the paper's flow loss alone; needs a teacher)"
        },
    )
    distill_match: str = field(
        default="position",
        metadata={
            "help": "how condition tokens meet the teacher's in condition_distill: 'position' (token j to the "
            "teacher's token j) or 'assignment' (each caption's teacher tokens reordered to the condition tokens "
            "by the one-to-one matching of least squared distance; the DiT's cross-attention has no positions)"
        },
    )
    distill_twins: float = field(
        default=0.0,
        metadata={
            "help": "weight of a condition_distill term on twins: each caption the data source can rewrite into "
            "one that differs in a single thing (the shapes world: 'a red circle and a blue square' -> '... a "
            "blue cross', or '... a blue circle and a red square', world.parauni.twins) joins the step, and the "
            "condition's difference between the two is pulled to the teacher's (0 = off; needs a source with "
            "twin(), as the shapes world's)"
        },
    )
    flow_weight: float = field(
        default=1.0,
        metadata={
            "help": "weight of the paper's flow-matching loss (1 = the paper); 0 = condition distillation alone, "
            "which skips the DiT in the step (Stage I only; needs condition_distill > 0)"
        },
    )
    image_size: int = field(
        default=1024, metadata={"help": "training images are resized and centre-cropped to this"}
    )
    save_every: int = field(
        default=1_000, metadata={"help": "checkpoint every N steps (0 = only at the end)"}
    )
    keep_last: int = field(default=3, metadata={"help": "number of step checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "log every N steps"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise, times and dropout"})

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2):
            raise ConfigError(
                f"train.stage={self.stage} must be 1 or 2, or 0 for the world's T2I pretraining (Stage III is "
                "`parauni rl`)"
            )
        check_choice("train.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in ("steps", "batch_size", "grad_accum", "image_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup", "save_every", "keep_last", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"train.seed={self.seed} must be an integer from 0 to {MAX_SEED}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be > 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"train.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError(f"train.ema={self.ema} must be in [0, 1) (0 = off; 0.999 is usual)")
        if self.condition_distill < 0:
            raise ConfigError(f"train.condition_distill={self.condition_distill} must be >= 0 (0 = off)")
        check_choice("train.distill_match", self.distill_match, CONDITION_MATCHES)
        if self.distill_twins < 0 or (self.distill_twins > 0 and self.condition_distill == 0):
            raise ConfigError(
                f"train.distill_twins={self.distill_twins} must be >= 0, and > 0 only with condition_distill > 0"
            )
        if self.flow_weight < 0:
            raise ConfigError(f"train.flow_weight={self.flow_weight} must be >= 0 (1 = the paper's loss)")
        if self.flow_weight == 0 and (self.stage != 1 or self.condition_distill == 0):
            raise ConfigError(
                f"train.flow_weight=0 leaves stage {self.stage} with condition_distill={self.condition_distill} "
                "nothing to learn from: it is for Stage I with condition_distill > 0; set train.flow_weight=1"
            )
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas={self.betas} must be two numbers")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )


def stage_config(stage: int, overrides: dict | None = None) -> TrainConfig:
    """The paper's defaults for ``stage`` with ``overrides`` (a dict of TrainConfig fields) applied."""
    if stage not in STAGE_DEFAULTS:
        raise ConfigError(f"stage {stage} must be 1 or 2")
    data = {"stage": stage, **STAGE_DEFAULTS[stage], **(overrides or {})}
    return from_dict(TrainConfig, data, prefix="train.")
