"""Stage III's reward models (system.md section 4, "Rewards"; the paper's RL stage with LDAM).

Every reward is a callable ``(images, prompts, metadata) -> list[float]``, one float per image:

* images: float tensor (N, 3, H, W) in [-1, 1], on any device;
* prompts: N strings;
* metadata: N GenEval metadata rows (dicts), or None where a reward does not need them.

Contents:

* `Reward`: the interface: input validation, internal batching, ``torch.no_grad``.
* `CLIPEmbedder`: the one CLIP scoring helper every CLIP-based reward shares: the image processor's settings
  applied in torch (shortest side resized with bicubic, centre crop, mean / std normalisation; no
  torchvision), prompts tokenised to at most 77 tokens, L2-normalised projected embeddings.
* The paper's rewards: `PickScore` (CLIP-H), `Aesthetic` (LAION's improved aesthetic predictor on CLIP
  ViT-L/14) and `CLIPScore` (CLIP ViT-L/14), loaded from a local folder or a Hugging Face id.
* `GenEvalReward`: Flow-GRPO's partial-credit GenEval reward through a detector
  (`parauni.eval.geneval_rules.partial_credit`).
* `CombinedReward`: the weighted sum of several rewards, with each reward's scores kept for logging.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..eval.geneval_rules import (
    ColorClassifier,
    Detection,
    evaluate_image,
    filter_detections,
    partial_credit,
    validate_metadata,
)
from ..utils.images import tensor_to_uint8
from ..utils.loading import WeightsError, load_pretrained

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
LAION_AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
LAION_AESTHETIC_REPO = "https://github.com/christophschuhmann/improved-aesthetic-predictor"
CLIP_MAX_LENGTH = 77

# detector(uint8 image (H, W, 3)) -> detections of every class it knows
Detector = Callable[[np.ndarray], list[Detection]]


class RewardModelError(WeightsError):
    """A reward model's weights could not be found or loaded; the message names the source and the fix."""


def load_reward_weights(loader: Callable, source: str | Path, what: str, repo: str, **kwargs):
    """`load_pretrained` for reward models, detectors and answer models: failures are `RewardModelError`."""
    return load_pretrained(loader, source, what, repo, RewardModelError, **kwargs)


# ----------------------------------------------------------------------------------------------- interface
class Reward:
    """A reward: ``reward(images, prompts, metadata) -> list[float]``, one float per image.

    Subclasses implement `score` on one batch of at most `batch_size` images; `__call__` validates the
    inputs, splits them into batches and runs `score` under ``torch.no_grad()``.
    """

    name: str = "reward"

    def __init__(self, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"reward batch_size must be >= 1, got {batch_size}")
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
            raise ValueError(f"reward weights name unknown rewards {unknown}; available: {sorted(rewards)}")
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


# ----------------------------------------------------------------------------------------------- loading
# ----------------------------------------------------------------------------------------------- CLIP helper
class CLIPEmbedder:
    """A ``transformers.CLIPModel`` with its tokenizer and image preprocessing: L2-normalised embeddings.

    It does not freeze the model (the world CLIP trains through it); `from_pretrained` and the rewards do.

    Image preprocessing is the model's ``CLIPImageProcessor`` settings done in torch on (N, 3, H, W) tensors
    in [-1, 1]: to [0, 1], shortest side resized to `resize` (bicubic, antialiased, clamped to [0, 1] as a
    uint8 round trip would), centre crop to `crop`, then ``(x - mean) / std``.

    Prompts are tokenised with right padding and truncated to `max_length` (77 for real CLIP, at most the
    text model's positions). CLIP pools the text at the end-of-text token, so every row must end with it: a
    tokenizer that does not append it itself (the shapes world's BPE) gets it appended, and a truncated row's
    last token is replaced by it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        resize: int = 224,
        crop: tuple[int, int] = (224, 224),
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        max_length: int = CLIP_MAX_LENGTH,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.resize = int(resize)
        self.crop = (int(crop[0]), int(crop[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.max_length = min(max_length, model.config.text_config.max_position_embeddings)
        if max(self.crop) > self.resize:
            raise ValueError(f"CLIP crop {self.crop} is larger than the resized shortest side {self.resize}")
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)

    def _check_tokenizer(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError(
                f"the CLIP tokenizer {type(tokenizer).__name__} needs an eos and a pad token "
                f"(eos={tokenizer.eos_token!r}, pad={tokenizer.pad_token!r})"
            )
        pooled = self.model.config.text_config.eos_token_id
        # eos_token_id == 2 is the legacy CLIP config: transformers pools at the largest id (argmax) instead.
        if pooled != 2 and pooled != tokenizer.eos_token_id:
            raise ValueError(
                f"the CLIP text model pools at token id {pooled} (text_config.eos_token_id) but the tokenizer "
                f"ends text with id {tokenizer.eos_token_id} ({tokenizer.eos_token!r}); save the model with "
                "text_config.eos_token_id = tokenizer.eos_token_id"
            )
        self.tokenizer_adds_eos = tokenizer("a").input_ids[-1] == tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        processor: str | Path | None = None,
        *,
        what: str = "CLIP model",
        model_repo: str = CLIP_L14,
        processor_repo: str | None = None,
        text: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> CLIPEmbedder:
        """Load a ``CLIPModel`` from `model` and its image processor (+ tokenizer if `text`) from `processor`
        (default: `model`), each a local folder or a Hugging Face id; `model_repo` / `processor_repo` are the
        repos named in errors."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        processor = model if processor is None else processor
        processor_repo = processor_repo or model_repo
        clip = (
            load_reward_weights(CLIPModel.from_pretrained, model, what, model_repo, dtype=dtype)
            .eval()
            .requires_grad_(False)
        )
        image_processor = load_reward_weights(
            CLIPImageProcessorPil.from_pretrained, processor, f"{what} image processor", processor_repo
        )
        tokenizer = (
            load_reward_weights(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer", processor_repo)
            if text
            else None
        )
        return cls.from_image_processor(clip, tokenizer, image_processor)

    @classmethod
    def from_image_processor(cls, model: nn.Module, tokenizer, image_processor) -> CLIPEmbedder:
        """Take the resize / crop / normalisation settings of a ``CLIPImageProcessor``."""
        size, crop = image_processor.size, image_processor.crop_size
        resize = size.get("shortest_edge") or min(size["height"], size["width"])
        crop_hw = (crop["height"], crop["width"]) if image_processor.do_center_crop else (resize, resize)
        return cls(
            model,
            tokenizer,
            resize=resize,
            crop=crop_hw,
            mean=image_processor.image_mean,
            std=image_processor.image_std,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> CLIPEmbedder:
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> CLIP pixel values (N, 3, crop_h, crop_w) on the model's device."""
        x = (images.to(self.device, torch.float32) + 1) / 2  # (N, 3, H, W) in [0, 1]
        h, w = x.shape[-2:]
        if min(h, w) != self.resize:
            r = self.resize
            size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)  # the processor's rounding
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        ch, cw = self.crop
        h, w = x.shape[-2:]
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> L2-normalised projected embeddings (N, D), float32."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(images)).pooler_output  # (N, C_v)
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompts -> {"input_ids", "attention_mask"} (N, S), right padded, each row ending in end-of-text."""
        if self.tokenizer is None:
            raise ValueError(
                "this CLIPEmbedder was loaded without a tokenizer (text=False); it embeds images only"
            )
        tok = self.tokenizer
        texts = prompts if self.tokenizer_adds_eos else [p + tok.eos_token for p in prompts]
        enc = tok(
            texts,
            padding="longest",
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        ids[torch.arange(len(texts)), mask.sum(1) - 1] = tok.eos_token_id  # truncated rows end in eos too
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def embed_texts(self, prompts: list[str], chunk: int = 32) -> torch.Tensor:
        """Prompts -> L2-normalised projected embeddings (N, D), float32.

        Prompts run in chunks of `chunk` sorted by length, each cut to its longest row, so a few long
        prompts do not pad every short one (causal attention and end-of-text pooling make it exact).
        """
        enc = self.tokenize(prompts)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (N, S)
        lengths = mask.sum(1)
        order = lengths.argsort()
        pooled = []
        for idx in order.split(chunk):
            n = int(lengths[idx].max())
            out = self.model.text_model(input_ids=ids[idx, :n], attention_mask=mask[idx, :n])
            pooled.append(out.pooler_output)  # (chunk, C_t)
        pooled = torch.cat(pooled)[order.argsort()]  # back to the prompts' order
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)


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
            raise ValueError(
                f"{source} is not an aesthetic MLP state dict (keys layers.<i>.weight / .bias): {sorted(state)[:6]}"
            ) from err
        gaps = [b - a for a, b in zip(indices, indices[1:], strict=False)]
        n_dropout = next((i for i, g in enumerate(gaps) if g != 2), len(gaps))
        if not weights or indices[0] != 0 or any(g != 1 for g in gaps[n_dropout:]):
            raise ValueError(
                f"{source}: unsupported aesthetic MLP layout, Linear layers at indices {indices}"
            )
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
            raise ValueError(f"aesthetic MLP weights {path}: expected a .safetensors or .pth file")
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
            raise ValueError(
                f"aesthetic MLP {weights} takes {mlp.dims[0]}-d embeddings but the CLIP model {clip} projects to "
                f"{embedder.model.config.projection_dim}; use CLIP ViT-L/14 ({CLIP_L14})"
            )
        return cls(embedder, mlp, scale, batch_size)


# ----------------------------------------------------------------------------------------------- GenEval
class GenEvalReward(Reward):
    """Flow-GRPO's GenEval reward: per image, detect objects, keep them by GenEval's thresholds and give
    partial credit per clause of its metadata row (`parauni.eval.geneval_rules.partial_credit`); with
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
                raise ValueError(
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
