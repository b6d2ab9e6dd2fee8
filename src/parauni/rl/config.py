"""Configuration of Stage III: Flow-GRPO (docs/how-it-works.md, "Stage III"), the reward curriculum and LDAM."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, TrainableConfig, check_choice
from ..scoring.geneval_rules import GENEVAL_TAGS
from .ldam import LDAMConfig

ZONE_CHOICES = ("shallow", "middle", "deep", "all")


@dataclass
class PhaseConfig:
    """One phase of the reward curriculum: which rewards are optimised (by weight), for how long, and the
    layer zone LDAM perturbs while they are."""

    name: str = field(default="phase", metadata={"help": "label in logs and plots"})
    rewards: dict[str, float] = field(
        default_factory=lambda: {"clip": 1.0}, metadata={"help": "reward name -> weight"}
    )
    epochs: int = field(default=100, metadata={"help": "RL epochs (rollout + update) of this phase"})
    zone: str = field(
        default="deep",
        metadata={
            "help": f"LDAM's zone, one of {ZONE_CHOICES}: the phase LDAM's (rl.ldam.monitor=phase), and that of "
            "a reward not in rl.ldam.reward_zones"
        },
    )
    beta: float = field(default=0.02, metadata={"help": "KL weight against the reference policy"})
    tags: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"draw the phase's prompts only from these GenEval tags, any of {GENEVAL_TAGS} (empty: every "
            "prompt); needs prompts with GenEval metadata (a .jsonl file, or the shapes world's)"
        },
    )

    def __post_init__(self) -> None:
        check_choice("rl.phases[].zone", self.zone, ZONE_CHOICES)
        for tag in self.tags:
            check_choice(f"rl phase {self.name!r}: tags", tag, GENEVAL_TAGS)
        if not self.rewards:
            raise ConfigError(f"rl phase {self.name!r} optimises no reward; give rewards: {{name: weight}}")
        if self.epochs < 1:
            raise ConfigError(f"rl phase {self.name!r}: epochs={self.epochs} must be >= 1")
        if self.beta < 0:
            raise ConfigError(f"rl phase {self.name!r}: beta={self.beta} must be >= 0")


def paper_phases() -> list[PhaseConfig]:
    """The paper's curriculum: Aesthetic and PickScore on the middle zone, then CLIP score on the deep zone.

    500 + 500 epochs of 2 optimizer steps (``rl.updates_per_epoch``, Flow-GRPO's) are the paper's 2,000 Stage III
    steps (supplementary table 1). The betas are Flow-GRPO's configs' for the rewards: PickScore 0.01
    (``pickscore_sd3``), CLIP score 0.02 (``clipscore_sd3``).
    """
    return [
        PhaseConfig("aesthetic+pickscore", {"aesthetic": 1.0, "pickscore": 1.0}, 500, "middle", 0.01),
        PhaseConfig("clip", {"clip": 1.0}, 500, "deep", 0.02),
    ]


@dataclass
class RLConfig:
    """Stage III on a Stage-II model. Defaults follow the paper and Flow-GRPO at a single-GPU scale.

    Where the paper and Flow-GRPO's code differ, the default is the paper's (the optimiser: AdamW betas 0.9 /
    0.95, weight decay 0.05, cosine, no warm-up) and Flow-GRPO's is an option; where the paper is silent the
    default is Flow-GRPO's (rollout schedule, KL scale, groups by prompt text, zero advantages dropped).
    """

    phases: list[PhaseConfig] = field(
        default_factory=paper_phases, metadata={"help": "the reward curriculum"}
    )
    prompts_per_epoch: int = field(default=8, metadata={"help": "distinct prompts per epoch (all processes)"})
    group_size: int = field(default=4, metadata={"help": "images per prompt, k (the reference: 24)"})
    steps: int = field(default=10, metadata={"help": "sampling steps of the SDE rollout"})
    schedule: str = field(
        default="flow_match",
        metadata={
            "help": "rollout sigmas: 'flow_match' (diffusers' FlowMatchEulerDiscreteScheduler, as Flow-GRPO "
            "samples: last sigma before 0 is 0.0089 at 10 steps and shift 3, so the rewarded image keeps "
            "noise of std 0.006) or 'uniform' (the Euler sampler's flow_sigmas: last sigma 0.25, noise 0.2)"
        },
    )
    eta: float = field(
        default=0.7,
        metadata={"help": "SDE noise level (0, with rl.objective=nft only: the deterministic ODE sampler)"},
    )
    sampler: str = field(
        default="sde",
        metadata={
            "help": "rollout sampler: 'sde' (Flow-GRPO's SDE steps on rl.schedule's sigmas; at rl.eta=0 Euler ODE "
            "steps) or 'dpm' (DPM-Solver++ at rl.steps and rl.shift, the sampler SANA and ShapesEval draw with; "
            "rl.objective=nft only, since it has no log-probabilities)"
        },
    )
    same_latent: bool = field(
        default=False,
        metadata={
            "help": "start every image of a prompt's group from the same initial noise (Flow-GRPO's "
            "sample.same_latent, off in its GenEval and PickScore configs): the group then differs only by the "
            "SDE noise its log-probabilities score"
        },
    )
    cfg: float = field(default=4.5, metadata={"help": "CFG scale of rollout and update"})
    shift: float = field(default=3.0, metadata={"help": "flow shift of the sigmas"})
    height: int | None = field(
        default=None, metadata={"help": "image height (default: the model's sampling)"}
    )
    width: int | None = field(default=None, metadata={"help": "image width (default: the model's sampling)"})
    timestep_fraction: float = field(default=0.99, metadata={"help": "fraction of the steps trained on"})
    sde_window: int = field(
        default=0,
        metadata={
            "help": "steps of the rollout that are stochastic and trained (0 = every step, Flow-GRPO's): the "
            "others are deterministic Euler steps, so each group's reward spread comes from the window's noise "
            "alone (Flow-GRPO-Fast's and MixGRPO's SDE window)"
        },
    )
    sde_window_start: int = field(
        default=0, metadata={"help": "the first step of the SDE window (0 = the first sampling step)"}
    )
    objective: str = field(
        default="grpo",
        metadata={
            "help": "'grpo' (Flow-GRPO's clipped policy gradient on the SDE steps' log-probabilities, the "
            "paper's) or 'nft' (DiffusionNFT's flow matching on the rollout's clean images, weighted by the "
            "advantage; not in the paper: parauni.rl.nft). With nft, rl.steps x rl.timestep_fraction is the "
            "number of random times each image is trained at, and rl.clip_range and rl.kl_std are unused"
        },
    )
    nft_time_range: float = field(
        default=1.0,
        metadata={
            "help": "with rl.objective=nft: the fraction of the rollout's times, from the noisiest, that the "
            "training times are drawn from (1 = all of them, DiffusionNFT's; 0.5 = the first half, where the "
            "layout is set)"
        },
    )
    nft_beta: float = field(
        default=1.0,
        metadata={
            "help": "with rl.objective=nft: DiffusionNFT's beta, how far the implicit +/- policies step"
        },
    )
    adv_std: str = field(default="global", metadata={"help": "advantage std: 'global' (batch) or 'group'"})
    group_by: str = field(
        default="prompt",
        metadata={
            "help": "advantage groups: 'prompt' (samples with the same prompt text, Flow-GRPO's per-prompt "
            "tracker; a prompt drawn twice in an epoch forms one group) or 'index' (each draw its own group)"
        },
    )
    drop_zero_advantage: bool = field(
        default=True,
        metadata={
            "help": "leave samples whose advantage is 0 (a group with one reward) out of the update, as "
            "Flow-GRPO does; processes keep equal counts by keeping some of them back in"
        },
    )
    kl_std: str = field(
        default="flow_grpo",
        metadata={
            "help": "the std the KL term divides by: 'flow_grpo' (eta sqrt(sigma / (1 - sigma)), Flow-GRPO's "
            "code, which its betas were tuned with) or 'step' (that times sqrt(-dt), the exact KL between the "
            "two step Gaussians, 1/|dt| times stronger)"
        },
    )
    adv_clip: float = field(default=5.0, metadata={"help": "advantages clipped to +-adv_clip"})
    clip_range: float = field(default=1e-4, metadata={"help": "PPO ratio clip epsilon"})
    inner_epochs: int = field(default=1, metadata={"help": "policy-update passes over each rollout"})
    updates_per_epoch: int = field(default=2, metadata={"help": "optimizer steps per inner epoch"})
    micro_batch: int = field(default=8, metadata={"help": "samples per forward/backward (per process)"})
    rollout_batch: int = field(default=16, metadata={"help": "samples per rollout forward (per process)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW peak learning rate (no warm-up, the paper's)"})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            "help": "'cosine' (the paper's table: from lr to 0 over the run's optimizer steps) or "
            "'constant' (Flow-GRPO's code)"
        },
    )
    weight_decay: float = field(
        default=0.05,
        metadata={"help": "AdamW weight decay (the paper's 0.05; Flow-GRPO's code: 1e-4)"},
    )
    decay_1d: bool = field(
        default=True,
        metadata={
            "help": "weight decay on 1-D tensors (norms, biases) too, as the paper's AdamW and Flow-GRPO's code "
            "(neither excludes them); false: matrices only, as Stages I-II (a LoRA has no 1-D tensors)"
        },
    )
    betas: list[float] = field(
        default_factory=lambda: [0.9, 0.95],
        metadata={"help": "AdamW betas (the paper's 0.9, 0.95; Flow-GRPO's code: 0.9, 0.999)"},
    )
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    ema: float = field(
        default=0.9,
        metadata={
            "help": "EMA decay of the trained weights (0 = off), saved and written as the final model: Flow-GRPO's "
            "0.9, ramped as min(ema, (1 + s) / (10 + s)) over optimizer steps s"
        },
    )
    ema_every: int = field(
        default=8,
        metadata={"help": "update the EMA every N optimizer steps (Flow-GRPO's 8: about the last 160 steps)"},
    )
    trainable: TrainableConfig = field(
        default_factory=lambda: TrainableConfig(
            queries=False, lim=False, dit=False, dit_lora_rank=32, dit_lora_alpha=64.0
        ),
        metadata={"help": "what RL trains: the DiT (full or LoRA) and/or queries + LIM"},
    )
    ldam: LDAMConfig = field(default_factory=LDAMConfig)
    cache_conditions: bool = field(
        default=True,
        metadata={
            "help": "run the frozen VLM once per prompt and epoch (the query states; with the LIM frozen too, "
            "its per-layer outputs) instead of at every rollout batch, trained step and reference call"
        },
    )
    log_all_rewards: bool = field(
        default=True,
        metadata={"help": "score and log every configured reward each epoch, not only the phase's"},
    )
    eval_prompts: int = field(
        default=0,
        metadata={
            "help": "held-out prompts (a seeded draw no epoch makes), sampled deterministically from fixed noise and "
            "scored with every phase's rewards before the first epoch, at each phase's end and every "
            "rl.eval_every epochs: the same prompts and noise each time, so two evaluations differ by the training "
            "alone (Flow-GRPO evaluates a test set this way); 0 = off"
        },
    )
    eval_images: int = field(default=4, metadata={"help": "images per held-out prompt (rl.eval_prompts)"})
    eval_every: int = field(
        default=0,
        metadata={
            "help": "evaluate the held-out prompts every N epochs as well (0: at the start and phase ends only)"
        },
    )
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' (accelerate)"})
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the DiT's and the connector's activations in the backward pass"},
    )
    save_every: int = field(default=10, metadata={"help": "checkpoint every N epochs (0 = only at the end)"})
    keep_last: int = field(default=2, metadata={"help": "step checkpoints kept"})
    seed: int = field(
        default=0, metadata={"help": "seed of prompts, initial noise, SDE noise and LDAM noise"}
    )

    def __post_init__(self) -> None:
        check_choice("rl.adv_std", self.adv_std, ("global", "group"))
        check_choice("rl.schedule", self.schedule, ("flow_match", "uniform"))
        check_choice("rl.group_by", self.group_by, ("prompt", "index"))
        check_choice("rl.kl_std", self.kl_std, ("flow_grpo", "step"))
        check_choice("rl.objective", self.objective, ("grpo", "nft"))
        check_choice("rl.sampler", self.sampler, ("sde", "dpm"))
        check_choice("rl.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        check_choice("rl.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in (
            "prompts_per_epoch",
            "steps",
            "inner_epochs",
            "updates_per_epoch",
            "ema_every",
            "micro_batch",
            "rollout_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"rl.{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            raise ConfigError(
                f"rl.group_size={self.group_size} must be >= 2 (advantages compare within a group)"
            )
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"rl.timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.sde_window < 0 or self.sde_window_start < 0:
            raise ConfigError(
                f"rl.sde_window={self.sde_window} and rl.sde_window_start={self.sde_window_start} must be >= 0"
            )
        if self.sde_window and self.sde_window_start + self.sde_window > self.train_steps:
            raise ConfigError(
                f"rl.sde_window_start + rl.sde_window = {self.sde_window_start + self.sde_window} must be at most "
                f"the {self.train_steps} trained steps (rl.steps x rl.timestep_fraction)"
            )
        if self.eta < 0 or (self.eta == 0 and self.objective == "grpo"):
            raise ConfigError(
                f"rl.eta={self.eta} must be > 0: Flow-GRPO's policy needs a stochastic step (rl.eta=0 samples "
                "with the ODE, for rl.objective=nft only)"
            )
        if self.sampler == "dpm" and self.objective != "nft":
            raise ConfigError(
                "rl.sampler=dpm gives no log-probabilities, which Flow-GRPO's policy gradient needs; use it "
                "with rl.objective=nft, or rl.sampler=sde"
            )
        if not 0 < self.nft_time_range <= 1 or self.nft_time_steps < self.train_steps:
            raise ConfigError(
                f"rl.nft_time_range={self.nft_time_range} must be in (0, 1] and cover at least the "
                f"{self.train_steps} times each image is trained at (rl.steps x rl.timestep_fraction); its "
                f"{self.nft_time_steps} of rl.steps={self.steps} do not"
            )
        if self.nft_beta <= 0:
            raise ConfigError(f"rl.nft_beta={self.nft_beta} must be > 0")
        if not self.phases:
            raise ConfigError("rl.phases is empty; give at least one reward phase")
        if self.eval_prompts < 0 or self.eval_images < 1 or self.eval_every < 0:
            raise ConfigError(
                f"rl.eval_prompts={self.eval_prompts}, rl.eval_images={self.eval_images} and rl.eval_every="
                f"{self.eval_every}: the prompts and every must be >= 0 (0 = off), the images >= 1"
            )
        if not 0 <= self.ema < 1:
            raise ConfigError(f"rl.ema={self.ema} must be in [0, 1)")
        for reward, zone in self.ldam.reward_zones.items():
            check_choice(f"rl.ldam.reward_zones.{reward}", zone, ZONE_CHOICES)
        t = self.trainable
        if not (t.queries or t.lim or t.dit or t.dit_lora_rank > 0):
            raise ConfigError("rl.trainable trains nothing; enable dit, dit_lora_rank, lim or queries")

    @property
    def nft_time_steps(self) -> int:
        """How many of the rollout's times, from the noisiest, rl.objective=nft draws its training times from."""
        return round(self.steps * self.nft_time_range)

    @property
    def train_steps(self) -> int:
        """How many of the sampling steps are trained on (the last is skipped at fraction 0.99)."""
        return max(1, int(self.steps * self.timestep_fraction))

    @property
    def trained_steps(self) -> list[int]:
        """The indices of the sampling steps the update trains on: the SDE window, or the first train_steps."""
        if self.sde_window:
            return list(range(self.sde_window_start, self.sde_window_start + self.sde_window))
        return list(range(self.train_steps))

    @property
    def stochastic_steps(self) -> list[bool] | None:
        """Per sampling step, whether the rollout samples it stochastically (None: every step)."""
        if self.eta == 0:
            return [False] * self.steps
        if not self.sde_window:
            return None
        window = set(self.trained_steps)
        return [i in window for i in range(self.steps)]

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    @property
    def samples_per_epoch(self) -> int:
        return self.prompts_per_epoch * self.group_size


@dataclass
class RewardsConfig:
    """Where the reward models' weights are: local folders or Hugging Face ids (nothing is fetched here).

    A reward is available when its weights are given; the phases may only use available rewards.
    """

    pickscore: str | None = field(
        default=None, metadata={"help": "PickScore model, e.g. yuvalkirstain/PickScore_v1"}
    )
    pickscore_processor: str = field(
        default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        metadata={"help": "PickScore's processor / tokenizer"},
    )
    aesthetic_mlp: str | None = field(
        default=None,
        metadata={"help": "LAION aesthetic MLP weights (.safetensors, or .pth read weights-only)"},
    )
    aesthetic_clip: str = field(
        default="openai/clip-vit-large-patch14", metadata={"help": "CLIP ViT-L/14 under the aesthetic MLP"}
    )
    clip: str | None = field(
        default=None, metadata={"help": "CLIP score model, e.g. openai/clip-vit-large-patch14"}
    )
    world: str | None = field(
        default=None,
        metadata={
            "help": "a shapes-world Stage-0 folder: its aesthetic, clip and geneval (ShapesEval) rewards"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "images per reward-model forward"})
