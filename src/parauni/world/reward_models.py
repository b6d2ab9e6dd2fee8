"""The shapes world's reward models for Stage III (docs/world.md), trained in Stage 0.

The paper's rewards need models trained on natural images; the world trains its own stand-ins:

* "clip": a small ``transformers.CLIPModel`` trained contrastively on world captions of every kind
  (GenEval-style and dense), with hard-negative captions (a swapped colour, relation, count or shape) so that
  it binds attributes to objects; scored like CLIP score, ``100 * cos / 30`` (`WorldCLIPScore`).
* "aesthetic": LAION's recipe scaled down, an `AestheticMLP` (no activations, D-64-16-1) on the world CLIP's
  L2-normalised image embeddings, trained to rank clean renders above degraded ones (blur, Gaussian noise,
  pixel jitter; and milder above stronger), so its score falls as an image degrades (`WorldAesthetic`).
* "geneval": ShapesEval's partial credit, Flow-GRPO's GenEval reward with the world's detector
  (`ShapesEvalReward`); "geneval_strict": the same detector under ShapesEval's own all-or-nothing rule.

Scoring reuses `parauni.scoring.clip.CLIPEmbedder` and `parauni.rl.rewards` (`CLIPScore`, `Aesthetic`,
`GenEvalReward`); Stage 0 (`parauni.world.pretrain.run_stage0`) trains and saves the models with `save_world_reward_models`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..rl.rewards import (
    Aesthetic,
    AestheticMLP,
    CLIPScore,
    GenEvalReward,
    Reward,
    RewardModelError,
)
from ..scoring.clip import CLIPEmbedder
from ..utils.images import pil_to_tensor
from ..utils.seeds import stream_seed
from .captions import (
    COUNTS,
    WorldStream,
    color_attr_row,
    colors_row,
    counting_row,
    position_row,
    single_object_row,
    two_object_row,
)
from .config import STREAM_OFFSETS, WorldConfig, transformer_sizes
from .detector import ShapesDetector
from .fit import fit
from .scene import COLORS, SHAPES

CLIP_DIR = "clip"
AESTHETIC_FILE = "aesthetic.safetensors"
AESTHETIC_INFO = "aesthetic.json"
DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "jitter")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
HELDOUT_EXAMPLES = 256
RETRIEVAL_BATCH = 64
MAX_BLUR_SIGMA = 1.5
MAX_NOISE_STD = 0.5
MAX_JITTER = 2


# ----------------------------------------------------------------------------------------------- the world CLIP
def world_clip(cfg: WorldConfig, tokenizer):
    """A randomly initialised ``CLIPModel`` sized by ``cfg.reward`` for the world's images and tokenizer.

    CLIP pools the text at the first token equal to ``text_config.eos_token_id`` (unless that id is 2, a
    legacy config for which transformers takes the argmax of the ids instead); the world tokenizer pads with
    its end-of-text token, so eos = pad = that id and `CLIPEmbedder` appends it to every caption: the pooled
    token is the true end of the caption.
    """
    from transformers import CLIPConfig, CLIPModel

    r, eos = cfg.reward, tokenizer.eos_token_id
    if eos is None or eos == 2 or tokenizer.pad_token_id != eos:
        raise ValueError(
            f"the world CLIP needs a tokenizer whose pad token is its eos token and whose eos id is not 2 "
            f"(transformers' legacy CLIP pooling); got eos={eos}, pad={tokenizer.pad_token_id}"
        )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            **transformer_sizes(r.text_hidden, r.text_layers, r.text_heads, 4 * r.text_hidden),
            max_position_embeddings=r.max_text_length,
            projection_dim=r.projection_dim,
            pad_token_id=eos,
            bos_token_id=eos,
            eos_token_id=eos,
        ),
        vision_config=dict(
            **transformer_sizes(r.vision_hidden, r.vision_layers, r.vision_heads, 4 * r.vision_hidden),
            image_size=cfg.image_size,
            patch_size=r.patch,
            projection_dim=r.projection_dim,
        ),
        projection_dim=r.projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 3)
        return CLIPModel(config)


def world_image_processor(cfg: WorldConfig):
    """The world CLIP's image processor: no resize, no crop (world images are already image_size), CLIP's
    mean / std; saved with the model so the reward loads it like any CLIP."""
    from transformers import CLIPImageProcessorPil

    size = cfg.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def world_clip_embedder(clip, tokenizer, cfg: WorldConfig) -> CLIPEmbedder:
    """The `CLIPEmbedder` of a world CLIP in training (same preprocessing and tokenisation as the reward)."""
    return CLIPEmbedder.from_image_processor(clip, tokenizer, world_image_processor(cfg))


def hard_negative(metadata: dict, rng: np.random.Generator) -> str | None:
    """A caption that is wrong for the example in one detail, or None for dense captions.

    color_attr swaps the two colours (attribute binding), position flips the relation, counting changes
    the count, colors the colour, single / two objects one shape.
    """
    tag, include = metadata["tag"], metadata.get("include", [])

    def other(options, *taken):
        rest = [o for o in options if o not in taken]
        return rest[int(rng.integers(len(rest)))]

    if tag == "single_object":
        return single_object_row(other(SHAPES, include[0]["class"]))["prompt"]
    if tag == "two_object":
        a, b = include[0]["class"], include[1]["class"]
        if rng.random() < 0.5:
            return two_object_row(other(SHAPES, a, b), b)["prompt"]
        return two_object_row(a, other(SHAPES, a, b))["prompt"]
    if tag == "counting":
        return counting_row(include[0]["class"], other(COUNTS, include[0]["count"]))["prompt"]
    if tag == "colors":
        return colors_row(include[0]["class"], other(list(COLORS), include[0]["color"]))["prompt"]
    if tag == "position":
        target, subject = include[0]["class"], include[1]["class"]
        return position_row(subject, OPPOSITE[include[1]["position"][0]], target)["prompt"]
    if tag == "color_attr":
        first, second = include
        return color_attr_row(first["class"], second["color"], second["class"], first["color"])["prompt"]
    return None


def _images(items: list[dict]) -> torch.Tensor:
    return torch.stack([pil_to_tensor(e["image"]) for e in items])  # (B, 3, H, W) in [-1, 1]


def clip_loss(
    embedder: CLIPEmbedder, items: list[dict], rng: np.random.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over a batch of world examples -> (loss, image->text top-1 accuracy).

    Identical captions in a batch (frequent: "a photo of a circle") are all positives of each other's images
    (the log of the summed softmax over them). With `rng`, each GenEval-style example adds a hard-negative
    caption to the image->text side.
    """
    captions = [e["caption"] for e in items]
    negatives = [hard_negative(e["metadata"], rng) for e in items] if rng is not None else []
    texts = captions + [c for c in negatives if c is not None]
    image_embeds = embedder.embed_images(_images(items))  # (B, D)
    text_embeds = embedder.embed_texts(texts)  # (B + H, D)
    logits = embedder.model.logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B + H)
    same = torch.tensor([[t == c for t in texts] for c in captions], device=logits.device)  # (B, B + H)

    def multi_positive_nll(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        return (scores.logsumexp(-1) - scores.masked_fill(~positive, -torch.inf).logsumexp(-1)).mean()

    b = len(items)
    loss = (multi_positive_nll(logits, same) + multi_positive_nll(logits[:, :b].T, same[:, :b].T)) / 2
    accuracy = same[torch.arange(b), logits.argmax(-1)].float().mean()
    return loss, accuracy


def train_world_clip(
    clip, tokenizer, cfg: WorldConfig, progress: bool = True, work: str | Path | None = None
) -> dict:
    """Train the world CLIP contrastively (`clip_loss`) on the world stream (resumable from ``work``); returns
    its loss curve and held-out metrics: image->text top-1 retrieval within batches of 64 and hard-negative
    accuracy (own caption scored above its one-detail-wrong twin), overall and per tag."""
    r = cfg.reward
    embedder = world_clip_embedder(clip, tokenizer, cfg)
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["clip"], cfg.image_size)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        rng = np.random.default_rng([cfg.seed, step]) if r.hard_negatives else None
        loss, acc = clip_loss(embedder, stream.batch(step * r.train.batch_size, r.train.batch_size), rng)
        return loss, {"accuracy": acc}

    def cap_temperature() -> None:
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))  # CLIP's temperature cap

    result = fit(
        "world CLIP",
        clip,
        step_loss,
        r.train,
        work,
        cfg.seed,
        cfg.save_every,
        after_step=cap_temperature,
        progress=progress,
    )
    return {**result, **evaluate_world_clip(embedder, cfg)}


@torch.no_grad()
def evaluate_world_clip(embedder: CLIPEmbedder, cfg: WorldConfig) -> dict:
    """Held-out image->text top-1 retrieval (batches of 64; a caption equal to the image's own counts) and
    hard-negative accuracy (cos(image, caption) > cos(image, hard negative)), overall and per tag."""
    items = WorldStream(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).batch(0, HELDOUT_EXAMPLES)
    hits = []
    for start in range(0, len(items), RETRIEVAL_BATCH):
        chunk = items[start : start + RETRIEVAL_BATCH]
        captions = [e["caption"] for e in chunk]
        sims = embedder.embed_images(_images(chunk)) @ embedder.embed_texts(captions).T  # (b, b)
        hits += [captions[j] == c for c, j in zip(captions, sims.argmax(-1).tolist(), strict=True)]
    rng = np.random.default_rng([cfg.seed, STREAM_OFFSETS["heldout"]])
    pairs = [(e, n) for e in items if (n := hard_negative(e["metadata"], rng)) is not None]
    own = embedder.embed_texts([e["caption"] for e, _ in pairs])  # (P, D)
    wrong = embedder.embed_texts([n for _, n in pairs])  # (P, D)
    image_embeds = embedder.embed_images(_images([e for e, _ in pairs]))  # (P, D)
    wins = ((image_embeds * own).sum(-1) > (image_embeds * wrong).sum(-1)).tolist()
    by_tag: dict[str, list[bool]] = {}
    for (e, _), win in zip(pairs, wins, strict=True):
        by_tag.setdefault(e["metadata"]["tag"], []).append(win)
    return {
        "heldout_retrieval_top1": float(np.mean(hits)),
        "heldout_hard_negative_accuracy": float(np.mean(wins)),
        "heldout_hard_negative_accuracy_by_tag": {t: float(np.mean(v)) for t, v in sorted(by_tag.items())},
    }


# ----------------------------------------------------------------------------------------------- degradations
def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of x (N, 3, H, W) with a standard deviation per image, sigma (N,) in pixels."""
    n, c, h, w = x.shape
    radius = math.ceil(3 * MAX_BLUR_SIGMA)
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # (K,)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # (N, K)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (N * 3, K)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel[:, None, None, :], groups=n * c)  # along x
    y = F.conv2d(y, kernel[:, None, :, None], groups=n * c)  # along y
    return y.reshape(n, c, h, w)


def _jitter(x: torch.Tensor, strength: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each pixel, with probability `strength` (N,), takes the value of a neighbour up to MAX_JITTER away."""
    n, c, h, w = x.shape
    moved = torch.rand(n, 1, h, w, generator=generator) < strength.view(n, 1, 1, 1)
    dy, dx = (
        torch.randint(-MAX_JITTER, MAX_JITTER + 1, (n, 1, h, w), generator=generator) * moved for _ in "yx"
    )
    rows = (torch.arange(h).view(1, 1, h, 1) + dy).clamp(0, h - 1)
    cols = (torch.arange(w).view(1, 1, 1, w) + dx).clamp(0, w - 1)
    index = (rows * w + cols).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index.to(x.device)).reshape(n, c, h, w)


def degrade(
    images: torch.Tensor, kinds: list[str], strength: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Degrade images (N, 3, H, W) in [-1, 1]: image i by kinds[i] in DEGRADATIONS at strength[i] in [0, 1]
    (0 leaves it unchanged, 1 is the strongest: blur sigma 1.5 px, noise std 0.5, every pixel jittered)."""
    if len(kinds) != len(images) or strength.shape != (len(images),):
        raise ValueError(
            f"degrade needs one kind and one strength per image: {len(images)} images, "
            f"{len(kinds)} kinds, strength {tuple(strength.shape)}"
        )
    unknown = sorted(set(kinds) - set(DEGRADATIONS))
    if unknown:
        raise ValueError(f"unknown degradations {unknown}; expected some of {DEGRADATIONS}")
    out = images.clone()
    strength = strength.to(images.dtype)
    for kind in DEGRADATIONS:
        idx = torch.tensor([i for i, k in enumerate(kinds) if k == kind], dtype=torch.long)
        if len(idx) == 0:
            continue
        x, s = images[idx], strength[idx]
        if kind == "blur":
            y = _blur(x, MAX_BLUR_SIGMA * s)
        elif kind == "noise":
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            y = x + MAX_NOISE_STD * s.view(-1, 1, 1, 1) * noise
        else:
            y = _jitter(x, s, generator)
        out[idx] = torch.where(s.view(-1, 1, 1, 1) > 0, y, x).clamp(-1, 1)
    return out


# ----------------------------------------------------------------------------------------------- the aesthetic MLP
def world_aesthetic_mlp(cfg: WorldConfig) -> AestheticMLP:
    """LAION's layout scaled down: projection_dim -> aesthetic_hidden... -> 1, dropout after every Linear
    layer but the last two (LAION: after 768->1024, 1024->128, 128->64)."""
    r = cfg.reward
    dims = [r.projection_dim, *r.aesthetic_hidden, 1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 4)
        return AestheticMLP(dims, [r.aesthetic_dropout] * (len(dims) - 3))


def _ranking_pairs(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(better, worse) versions of each image: one degradation kind per image; the worse one at strength in
    [0.15, 1], the better one clean half of the time, else at most 70% of the worse one's strength."""
    n = len(images)
    kinds = [DEGRADATIONS[i] for i in torch.randint(len(DEGRADATIONS), (n,), generator=generator).tolist()]
    worse = 0.15 + 0.85 * torch.rand(n, generator=generator)
    better = torch.where(
        torch.rand(n, generator=generator) < 0.5, 0.0, 0.7 * worse * torch.rand(n, generator=generator)
    )
    return degrade(images, kinds, better, generator), degrade(images, kinds, worse, generator)


def train_world_aesthetic(
    clip, cfg: WorldConfig, progress: bool = True, work: str | Path | None = None
) -> tuple[AestheticMLP, dict]:
    """Train the aesthetic MLP on the frozen world CLIP's image embeddings with a pairwise logistic ranking
    loss, ``softplus(-(s_better - s_worse))`` (resumable from ``work``); returns the MLP (eval mode) and its
    curve + held-out ranking accuracy (clean above degraded at strength 0.3-1, overall and per degradation)."""
    r = cfg.reward
    embedder = CLIPEmbedder.from_image_processor(clip.eval(), None, world_image_processor(cfg))
    mlp = world_aesthetic_mlp(cfg).to(embedder.device)
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["aesthetic"], cfg.image_size)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step))
        images = _images(stream.batch(step * r.aesthetic_train.batch_size, r.aesthetic_train.batch_size))
        better, worse = _ranking_pairs(images, gen)
        with torch.no_grad():
            e_better, e_worse = embedder.embed_images(better), embedder.embed_images(worse)  # (B, D)
        margin = mlp(e_better) - mlp(e_worse)  # (B,)
        return F.softplus(-margin).mean(), {"accuracy": (margin > 0).float().mean()}

    result = fit(
        "world aesthetic",
        mlp,
        step_loss,
        r.aesthetic_train,
        work,
        cfg.seed,
        cfg.save_every,
        progress=progress,
    )
    return mlp, {**result, **evaluate_world_aesthetic(embedder, mlp, cfg)}


@torch.no_grad()
def evaluate_world_aesthetic(embedder: CLIPEmbedder, mlp: AestheticMLP, cfg: WorldConfig) -> dict:
    """Held-out ranking accuracy: score(clean) > score(degraded at strength in [0.3, 1]), per kind and overall."""
    images = _images(
        WorldStream(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).batch(0, HELDOUT_EXAMPLES)
    )
    gen = torch.Generator().manual_seed(cfg.seed + STREAM_OFFSETS["heldout"])
    clean = mlp(embedder.embed_images(images))  # (N,)
    by_kind = {}
    for kind in DEGRADATIONS:
        strength = 0.3 + 0.7 * torch.rand(len(images), generator=gen)
        degraded = mlp(embedder.embed_images(degrade(images, [kind] * len(images), strength, gen)))
        by_kind[kind] = float((clean > degraded).float().mean())
    return {
        "heldout_ranking_accuracy": float(np.mean(list(by_kind.values()))),
        "heldout_ranking_accuracy_by_kind": by_kind,
        "heldout_clean_score_mean": float(clean.mean()),
    }


# ----------------------------------------------------------------------------------------------- saving / loading
def save_world_reward_models(
    folder: str | Path, clip, tokenizer, mlp: AestheticMLP, cfg: WorldConfig
) -> None:
    """Write ``clip/`` (CLIPModel + tokenizer + image processor), ``aesthetic.safetensors`` and
    ``aesthetic.json`` (its layout) into the Stage-0 folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    clip.save_pretrained(folder / CLIP_DIR)
    tokenizer.save_pretrained(folder / CLIP_DIR)
    world_image_processor(cfg).save_pretrained(folder / CLIP_DIR)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(folder / AESTHETIC_FILE))
    info = {
        "dims": mlp.dims,
        "dropout": cfg.reward.aesthetic_dropout,
        "input": f"L2-normalised image embedding of {CLIP_DIR}/ (CLIPModel.visual_projection)",
    }
    (folder / AESTHETIC_INFO).write_text(json.dumps(info, indent=2))


def load_world_clip(stage0_dir: str | Path, text: bool = True) -> CLIPEmbedder:
    """The world CLIP of a Stage-0 folder as a `CLIPEmbedder` (eval mode, frozen)."""
    folder = Path(stage0_dir) / CLIP_DIR
    if not (folder / "config.json").is_file():
        raise RewardModelError(
            f"{folder} holds no world CLIP; Stage 0 (parauni.world.pretrain.run_stage0, run by `parauni demo`) "
            "writes it: rerun Stage 0 (Stage-0 caches from before the reward models have none)"
        )
    return CLIPEmbedder.from_pretrained(folder, what="world CLIP", model_repo=str(folder), text=text)


class WorldCLIPScore(CLIPScore):
    """The world's CLIP score: ``100 * cos(image, prompt) / 30`` with the Stage-0 world CLIP (CLIP score's
    formula; a matched pair's cosine is higher than with CLIP ViT-L/14, so values reach about 2-3)."""

    @classmethod
    def from_folder(cls, stage0_dir: str | Path, batch_size: int = 64) -> WorldCLIPScore:
        return cls(load_world_clip(stage0_dir), batch_size)


class WorldAesthetic(Aesthetic):
    """The world's aesthetic score: the Stage-0 aesthetic MLP on the world CLIP's normalised image embedding;
    raw ranking scores (unbounded; higher is cleaner), ``scale`` 1."""

    @classmethod
    def from_folder(
        cls, stage0_dir: str | Path, batch_size: int = 64, embedder: CLIPEmbedder | None = None
    ) -> WorldAesthetic:
        """`embedder`: an already loaded world CLIP to share (e.g. with `WorldCLIPScore`)."""
        mlp = AestheticMLP.from_file(Path(stage0_dir) / AESTHETIC_FILE)
        return cls(embedder or load_world_clip(stage0_dir, text=False), mlp, 1.0, batch_size)


class ShapesEvalReward(GenEvalReward):
    """ShapesEval's partial credit: `GenEvalReward` with the world's `ShapesDetector` and its colours."""

    def __init__(self, strict: bool = False, batch_size: int = 64) -> None:
        detector = ShapesDetector()
        super().__init__(detector, detector.classify_colors, strict, batch_size)


def world_rewards(stage0_dir: str | Path, batch_size: int = 64) -> dict[str, Reward]:
    """The world's rewards by name: "aesthetic", "clip" (sharing one world CLIP), "geneval" (ShapesEval's
    partial credit) and "geneval_strict" (1 when ShapesEval's own rule accepts the image, else 0)."""
    embedder = load_world_clip(stage0_dir)
    return {
        "aesthetic": WorldAesthetic.from_folder(stage0_dir, batch_size, embedder=embedder),
        "clip": WorldCLIPScore(embedder, batch_size),
        "geneval": ShapesEvalReward(batch_size=batch_size),
        "geneval_strict": ShapesEvalReward(strict=True, batch_size=batch_size),
    }
