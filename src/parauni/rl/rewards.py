"""Stage III's reward models (the paper's RL stage with LDAM; docs/how-it-works.md, "Stage III").

Every reward is a callable ``(images, prompts, metadata) -> list[float]``, one float per image:

* images: float tensor (N, 3, H, W) in [-1, 1], on any device;
* prompts: N strings;
* metadata: N GenEval metadata rows (dicts), or None where a reward does not need them.

Contents:

* `Reward`: the interface: input validation, internal batching, ``torch.no_grad``.
* The paper's rewards: `PickScore` (CLIP-H), `Aesthetic` (LAION's improved aesthetic predictor on CLIP
  ViT-L/14) and `CLIPScore` (CLIP ViT-L/14), loaded from a local folder or a Hugging Face id.
* `GenEvalReward`: Flow-GRPO's partial-credit GenEval reward through a detector
  (`parauni.scoring.geneval_rules.partial_credit`).
* `CombinedReward`: the weighted sum of several rewards, with each reward's scores kept for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..scoring.clip import CLIP_L14, CLIPEmbedder, RewardModelError
from ..scoring.geneval_rules import (
    ColorClassifier,
    Detection,
    evaluate_image,
    filter_detections,
    partial_credit,
    validate_metadata,
)
from ..utils.images import tensor_to_uint8
from .config import RewardsConfig

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
LAION_AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
LAION_AESTHETIC_REPO = "https://github.com/christophschuhmann/improved-aesthetic-predictor"

# detector(uint8 image (H, W, 3)) -> detections of every class it knows
Detector = Callable[[np.ndarray], list[Detection]]


# ----------------------------------------------------------------------------------------------- interface
class Reward:
    """A reward: ``reward(images, prompts, metadata) -> list[float]``, one float per image.

    Subclasses implement `score` on one batch of at most `batch_size` images; `__call__` validates the
    inputs, splits them into batches and runs `score` under ``torch.no_grad()``.
    """

    name: str = "reward"

    def __init__(self, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ConfigError(f"reward batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict | None]
    ) -> torch.Tensor | list[float]:
        """Scores of one batch: images (B, 3, H, W) in [-1, 1] -> (B,) tensor or B floats."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Reward:
        """Move the reward's models to `device` (rewards without models stay where they are)."""
        return self

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: Sequence[dict | None] | None = None
    ) -> list[float]:
        n = check_reward_inputs(images, prompts, metadata)
        rows = list(metadata) if metadata is not None else [None] * n
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                end = start + self.batch_size
                batch = self.score(images[start:end], list(prompts[start:end]), rows[start:end])
                values = batch.detach().float().cpu().tolist() if torch.is_tensor(batch) else list(batch)
                if len(values) != min(end, n) - start:
                    raise RuntimeError(
                        f"reward {self.name!r} returned {len(values)} scores for {min(end, n) - start} images"
                    )
                scores += [float(v) for v in values]
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


def check_reward_inputs(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict | None] | None
) -> int:
    """Validate a reward call's inputs and return N; ValueError naming the mismatch otherwise."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"rewards take images as a float tensor (N, 3, H, W) in [-1, 1], got {shape}")
    n = images.shape[0]
    if isinstance(prompts, str) or len(prompts) != n:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"rewards need one prompt per image: {n} images but {got}")
    if metadata is not None and len(metadata) != n:
        raise ValueError(
            f"rewards need one metadata row (or None) per image: {n} images but {len(metadata)} rows"
        )
    return n


class CombinedReward:
    """Weighted sum of named rewards; every reward's own scores are returned too, for logging.

    ``CombinedReward(rewards, weights)(images, prompts, metadata) -> (total, per_reward)`` with
    ``total[i] = sum_k weights[k] * per_reward[k][i]``. A reward absent from `weights` has weight 0: it is
    still computed and reported (log it while optimising others). Weights naming no reward are an error.
    """

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]) -> None:
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ConfigError(f"reward weights name unknown rewards {unknown}; available: {sorted(rewards)}")
        self.rewards = dict(rewards)
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.rewards}

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: Sequence[dict | None] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        n = check_reward_inputs(images, prompts, metadata)
        per_reward = {name: reward(images, prompts, metadata) for name, reward in self.rewards.items()}
        total = [sum(self.weights[k] * per_reward[k][i] for k in per_reward) for i in range(n)]
        return total, per_reward

    def to(self, device: torch.device | str) -> CombinedReward:
        for reward in self.rewards.values():
            reward.to(device)
        return self


class _CLIPReward(Reward):
    """A reward computed from a `CLIPEmbedder`."""

    def __init__(self, embedder: CLIPEmbedder, batch_size: int = 32) -> None:
        super().__init__(batch_size)
        embedder.model.eval().requires_grad_(False)
        self.embedder = embedder

    def to(self, device: torch.device | str) -> Reward:
        self.embedder.to(device)
        return self


# ----------------------------------------------------------------------------------------------- the paper's rewards
class PickScore(_CLIPReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, prompt) / 26``, about 0.8-0.9 for
    good images, as Flow-GRPO scales it. CLIP-H weights of `yuvalkirstain/PickScore_v1` with the processor of
    `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`."""

    name = "pickscore"

    def score(self, images, prompts, metadata):
        e = self.embedder
        cos = (e.embed_images(images) * e.embed_texts(prompts)).sum(-1)  # (B,)
        return e.model.logit_scale.exp().float() * cos / 26.0

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = PICKSCORE_MODEL,
        processor: str | Path = PICKSCORE_PROCESSOR,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
    ) -> PickScore:
        embedder = CLIPEmbedder.from_pretrained(
            model,
            processor,
            what="PickScore model",
            model_repo=PICKSCORE_MODEL,
            processor_repo=PICKSCORE_PROCESSOR,
            dtype=dtype,
        )
        return cls(embedder, batch_size)


class CLIPScore(_CLIPReward):
    """CLIP score: ``100 * cos(image, prompt) / 30`` (about 1 for a well-matched pair with CLIP ViT-L/14;
    Flow-GRPO's scaling), with `openai/clip-vit-large-patch14`."""

    name = "clip"

    def score(self, images, prompts, metadata):
        e = self.embedder
        return 100.0 * (e.embed_images(images) * e.embed_texts(prompts)).sum(-1) / 30.0

    @classmethod
    def from_pretrained(
        cls, model: str | Path = CLIP_L14, batch_size: int = 32, dtype: torch.dtype = torch.float32
    ) -> CLIPScore:
        return cls(CLIPEmbedder.from_pretrained(model, what="CLIP ViT-L/14", dtype=dtype), batch_size)


class AestheticMLP(nn.Module):
    """LAION's aesthetic head: Linear layers without activations, Dropout after the first ``len(dropouts)``.

    The improved aesthetic predictor is ``AestheticMLP((768, 1024, 128, 64, 16, 1), (0.2, 0.2, 0.1))``, whose
    ``layers`` Sequential has Linear layers at indices 0, 2, 4, 6, 7 (the keys of
    ``sac+logos+ava1-l14-linearMSE.pth``). Input (N, dims[0]) L2-normalised CLIP image embeddings -> (N,).
    """

    def __init__(self, dims: Sequence[int], dropouts: Sequence[float] = ()) -> None:
        super().__init__()
        if len(dims) < 2 or dims[-1] != 1:
            raise ValueError(f"AestheticMLP dims {list(dims)} must go from the embedding width to 1")
        if len(dropouts) > len(dims) - 2:
            raise ValueError(
                f"{len(dropouts)} dropouts for {len(dims) - 1} Linear layers; at most one per hidden layer"
            )
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dropouts):
                layers.append(nn.Dropout(dropouts[i]))
        self.layers = nn.Sequential(*layers)
        self.dims = [int(d) for d in dims]

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "state dict") -> AestheticMLP:
        """Rebuild the layout from the keys (``layers.<i>.weight``; a gap of 2 between Linear indices is a
        Dropout) and load strictly. Dropout rates are not stored in weights: the result is for inference."""
        try:
            indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
            weights = [state[f"layers.{i}.weight"] for i in indices]
        except (ValueError, IndexError, KeyError) as err:
            raise DataError(
                f"{source} is not an aesthetic MLP state dict (keys layers.<i>.weight / .bias): {sorted(state)[:6]}"
            ) from err
        gaps = [b - a for a, b in zip(indices, indices[1:], strict=False)]
        n_dropout = next((i for i, g in enumerate(gaps) if g != 2), len(gaps))
        if not weights or indices[0] != 0 or any(g != 1 for g in gaps[n_dropout:]):
            raise DataError(f"{source}: unsupported aesthetic MLP layout, Linear layers at indices {indices}")
        dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        mlp = cls(dims, [0.0] * n_dropout)
        mlp.load_state_dict(dict(state), strict=True)
        return mlp.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> AestheticMLP:
        """Load from ``.safetensors`` or from a ``.pth`` / ``.pt`` state dict (``torch.load(weights_only=True)``)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise RewardModelError(
                f"aesthetic MLP weights {path} do not exist; download {LAION_AESTHETIC_FILE} from "
                f"{LAION_AESTHETIC_REPO} (or convert it to .safetensors) and pass its path"
            )
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DataError(f"aesthetic MLP weights {path}: expected a .safetensors or .pth file")
        return cls.from_state_dict(state, str(path))


class Aesthetic(_CLIPReward):
    """LAION's improved aesthetic predictor: an `AestheticMLP` on the L2-normalised CLIP ViT-L/14 image
    embedding; raw output about 1..10 (the scale of the paper's curves).

    Returned scores are the raw output divided by `scale`, default 1.0: raw, comparable with LAION's and the
    paper's numbers; GRPO normalises advantages per group, so only a weighted sum with other rewards is
    affected by the scale (pass ``scale=10`` to bring it near PickScore's and CLIP score's range).
    """

    name = "aesthetic"

    def __init__(
        self, embedder: CLIPEmbedder, mlp: AestheticMLP, scale: float = 1.0, batch_size: int = 32
    ) -> None:
        super().__init__(embedder, batch_size)
        if not scale > 0:
            raise ValueError(f"aesthetic scale must be positive, got {scale}")
        self.mlp = mlp.eval().requires_grad_(False).to(embedder.device)
        self.scale = float(scale)

    def score(self, images, prompts, metadata):
        embeds = self.embedder.embed_images(images)  # (B, D), L2-normalised
        return self.mlp(embeds.to(next(self.mlp.parameters()).dtype)).float() / self.scale

    def to(self, device: torch.device | str) -> Reward:
        self.embedder.to(device)
        self.mlp.to(device)
        return self

    @classmethod
    def from_pretrained(
        cls,
        weights: str | Path,
        clip: str | Path = CLIP_L14,
        scale: float = 1.0,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float32,
    ) -> Aesthetic:
        """`weights`: the MLP file (``sac+logos+ava1-l14-linearMSE.pth`` or a .safetensors conversion);
        `clip`: CLIP ViT-L/14, a local folder or its Hugging Face id."""
        mlp = AestheticMLP.from_file(weights)
        embedder = CLIPEmbedder.from_pretrained(clip, what="aesthetic CLIP ViT-L/14", text=False, dtype=dtype)
        if mlp.dims[0] != embedder.model.config.projection_dim:
            raise ConfigError(
                f"aesthetic MLP {weights} takes {mlp.dims[0]}-d embeddings but the CLIP model {clip} projects to "
                f"{embedder.model.config.projection_dim}; use CLIP ViT-L/14 ({CLIP_L14})"
            )
        return cls(embedder, mlp, scale, batch_size)


# ----------------------------------------------------------------------------------------------- GenEval
class GenEvalReward(Reward):
    """Flow-GRPO's GenEval reward: per image, detect objects, keep them by GenEval's thresholds and give
    partial credit per clause of its metadata row (`parauni.scoring.geneval_rules.partial_credit`); with
    ``strict=True``, 1.0 if GenEval's own rule accepts the image and 0.0 otherwise.

    `detector(uint8 image (H, W, 3)) -> list[Detection]`; `classify_colors(detections, class) -> colours`
    (CLIP on masked crops for real images, the detector's own colours in the shapes world).
    """

    name = "geneval"

    def __init__(
        self, detector: Detector, classify_colors: ColorClassifier, strict: bool = False, batch_size: int = 64
    ) -> None:
        super().__init__(batch_size)
        self.detector = detector
        self.classify_colors = classify_colors
        self.strict = strict

    def score(self, images, prompts, metadata):
        scores = []
        for i, (image, row) in enumerate(zip(tensor_to_uint8(images), metadata, strict=True)):
            if row is None:
                raise DataError(
                    f"the GenEval reward needs the metadata row of every image; image {i} (prompt "
                    f"{prompts[i]!r}) has none"
                )
            validate_metadata(row)
            kept = filter_detections(self.detector(image), row["tag"])
            if self.strict:
                scores.append(float(evaluate_image(kept, row, self.classify_colors)[0]))
            else:
                scores.append(partial_credit(kept, row, self.classify_colors))
        return scores


def build_rewards(cfg: RewardsConfig, extra: Mapping[str, Reward] | None = None) -> dict[str, Reward]:
    """The reward models ``cfg`` names (PickScore, Aesthetic, CLIP score), by reward name, after ``extra``
    ones built elsewhere (the shapes world's, from ``cfg.world``: :func:`parauni.world.reward_models.world_rewards`,
    which sits above this package)."""
    out = dict(extra or {})
    if cfg.pickscore:
        out["pickscore"] = PickScore.from_pretrained(cfg.pickscore, cfg.pickscore_processor, cfg.batch_size)
    if cfg.aesthetic_mlp:
        out["aesthetic"] = Aesthetic.from_pretrained(
            cfg.aesthetic_mlp, cfg.aesthetic_clip, batch_size=cfg.batch_size
        )
    if cfg.clip:
        out["clip"] = CLIPScore.from_pretrained(cfg.clip, cfg.batch_size)
    if not out:
        raise ConfigError(
            "no reward model is configured: give --rewards.pickscore / --rewards.aesthetic_mlp / --rewards.clip "
            "(local folders or Hugging Face ids), or --world for the shapes world's rewards"
        )
    return out
