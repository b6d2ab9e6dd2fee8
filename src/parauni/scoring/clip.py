"""CLIP embeddings for scoring, shared by Stage III's rewards (:mod:`parauni.rl.rewards`), the benchmarks'
colour classifier and reconstruction similarity (:mod:`parauni.eval`) and the shapes world's CLIP.

* `CLIPEmbedder`: the one CLIP scoring helper every CLIP-based score shares: the image processor's settings
  applied in torch (shortest side resized with bicubic, centre crop, mean / std normalisation; no
  torchvision), prompts tokenised to at most 77 tokens, L2-normalised projected embeddings.
* `load_reward_weights`: loading of any scoring model (rewards, detectors, answer models) whose failure is a
  `RewardModelError` naming the source and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import WeightsError
from ..utils.device import default_device
from ..utils.loading import load_pretrained

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_MAX_LENGTH = 77


class RewardModelError(WeightsError):
    """A reward model's weights could not be found or loaded; the message names the source and the fix."""


def load_reward_weights(loader: Callable, source: str | Path, what: str, repo: str, **kwargs):
    """`load_pretrained` for reward models, detectors and answer models: failures are `RewardModelError`."""
    return load_pretrained(loader, source, what, repo, RewardModelError, **kwargs)


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
        device: str | torch.device | None = None,
    ) -> CLIPEmbedder:
        """Load a ``CLIPModel`` from `model` and its image processor (+ tokenizer if `text`) from `processor`
        (default: `model`), each a local folder or a Hugging Face id, onto `device` (default:
        :func:`~parauni.utils.device.default_device`, which reads ``$PARAUNI_DEVICE``); `model_repo` /
        `processor_repo` are the repos named in errors."""
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
        return cls.from_image_processor(clip, tokenizer, image_processor).to(device or default_device())

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
