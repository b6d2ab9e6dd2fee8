"""Frozen VLM backbones that return the query states of EVERY decoder layer from one forward pass.

The learnable queries are appended after the (right-padded) prompt, the attention mask is extended with ones
and position ids continue from the last real token (``cumsum(mask) - 1``), so each row's queries follow its
own prompt; the decoder runs once with ``output_hidden_states=True`` and the query positions are read out of
``hidden_states[1:]`` (the outputs of the L decoder layers; HF applies the final norm to the last one).
While the queries train, a causal decoder runs the prompt first without a graph and the queries on its
key/value cache (the same states; the backward pass then covers only the query positions).
Paper section 3.1; docs/how-it-works.md, "The data flow".

Adapters:
* :class:`InternVLBackbone` - ``transformers.InternVLForConditionalGeneration`` (InternVL3 ``-hf``); text
  prompts, and input images through the vision tower into the ``<IMG_CONTEXT>`` placeholders.
* :class:`Qwen25VLBackbone` - ``Qwen2_5_VLForConditionalGeneration`` (the base of BLIP-3o and of OpenUni's Qwen
  variant), with 3-D rotary positions (mrope) for image prompts.
* :class:`JanusBackbone` - ``JanusForConditionalGeneration`` (Janus-Pro): its Llama decoder, and input images through
  its SigLIP understanding encoder into the ``<image_placeholder>`` slots.
* :class:`CausalLMBackbone` - any decoder-only language model loaded by ``AutoModel`` (text only); a model whose
  tokens see later tokens is refused (:func:`is_causal`).
* :class:`TextEncoderBackbone` - a bidirectional text encoder (BERT-like, e.g. a sentence-embedding model) loaded by
  ``AutoModel``: the queries read the whole prompt and the prompt's tokens also see the queries (text only).

Each kind reads prompts in its own format (``config.PROMPT_FORMATS``, overridable with ``vlm.template`` etc.):
InternVL3 chat ending in ``<img>``; Qwen's chat with its ``<|vision_start|>...<|vision_end|>`` image block and no
``<img>``; Janus-Pro's ``<|User|>: ...\\n\\n<|Assistant|>:<begin_of_image>``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import VLMConfig
from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PromptBatch:
    """Tokenised prompts. input_ids / attention_mask: (B, S), right padded; images: (B, 3, H, W) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PromptBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(
            *(move(t) for t in (self.input_ids, self.attention_mask, self.pixel_values, self.image_grid_thw))
        )


def check_prompts(prompts: object) -> list[str]:
    """Validate user prompts: a non-empty list of non-empty strings. Returns them stripped."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError("prompts must be a non-empty list of strings")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not text: {p!r}")
        if not p.strip():
            raise ConfigError(f"prompt {i} is empty; give a description of the image to generate")
        out.append(p.strip())
    return out


class VLMBackbone(nn.Module):
    """Common part of the adapters: templating, truncation, padding, queries and the one forward pass."""

    supports_images = False
    causal = True  # a prompt token's states never depend on later tokens (False for a bidirectional encoder)

    def __init__(self, model: nn.Module, tokenizer, config: VLMConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model.requires_grad_(False)
        self.model.eval()
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    # --- structure -------------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The decoder-only language model whose layers are read out."""
        raise NotImplementedError

    @property
    def text_config(self):
        return self.decoder.config

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    def train(self, mode: bool = True) -> VLMBackbone:
        # The VLM is frozen in every stage: it stays in eval mode (no dropout) whatever the parent does.
        super().train(False)
        return self

    # --- prompts -------------------------------------------------------------------------------------
    def _truncate(self, caption: str, template: str) -> str:
        def length(text: str) -> int:
            return len(self.tokenizer(template.format(caption=text), add_special_tokens=True).input_ids)

        limit = self.config.max_length
        if length(caption) <= limit:
            return caption
        ids = self.tokenizer(caption, add_special_tokens=False).input_ids
        budget = max(limit - length(""), 0)
        # A caption tokenizes differently inside the template (merges at its start) and decoding a cut inside a
        # multi-byte character adds tokens, so shorten until the whole templated prompt fits.
        n = budget
        text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        while n > 0 and length(text) > limit:
            n -= 1
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
        warnings.warn(
            f"prompt of {len(ids)} tokens is longer than vlm.max_length={limit} allows "
            f"({budget} caption tokens); it was truncated",
            stacklevel=3,
        )
        return text

    def format_prompts(self, captions: list[str | None]) -> list[str]:
        """Apply the conditional template (or the unconditional one for ``None``) with truncation."""
        cfg = self.config
        return [
            cfg.uncond_template if c is None else cfg.template.format(caption=self._truncate(c, cfg.template))
            for c in captions
        ]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def encode_prompts(self, captions: list[str | None], images: torch.Tensor | None = None) -> PromptBatch:
        """Tokenise captions (``None`` = unconditional), or images with the image instruction.

        images: (B, 3, H, W) in [-1, 1] for image-to-image; then ``captions`` is ignored except for its length.
        """
        if images is not None:
            if not self.supports_images:
                raise ConfigError(
                    f"the {self.config.kind} backbone reads text only; it cannot take an input image"
                )
            return self.encode_images(images)
        input_ids, mask = self.tokenize(self.format_prompts(captions))
        return PromptBatch(input_ids, mask)

    def encode_images(self, images: torch.Tensor) -> PromptBatch:
        raise NotImplementedError

    # --- forward ------------------------------------------------------------------------------------
    def prompt_embeds(self, batch: PromptBatch) -> torch.Tensor:
        """Input embeddings of the prompt, images scattered into their placeholders: (B, S, D)."""
        return self.decoder.get_input_embeddings()(batch.input_ids)

    def position_ids(self, batch: PromptBatch, num_queries: int) -> torch.Tensor:
        """Positions of prompt + queries: (B, S + Q); queries continue after each row's last real token."""
        mask = torch.cat(
            [batch.attention_mask, batch.attention_mask.new_ones(len(batch.attention_mask), num_queries)], 1
        )
        return (mask.long().cumsum(1) - 1).clamp(min=0)

    def query_states(self, batch: PromptBatch, queries: torch.Tensor) -> torch.Tensor:
        """Hidden states of the query positions at every decoder layer.

        Args:
            batch: tokenised prompts (B, S).
            queries: (Q, D) learnable queries (gradients flow back to them through the frozen VLM).

        Returns:
            (B, L, Q, D) in the queries' dtype.

        When the queries train and the model is causal, the prompt's states cannot depend on them: the prompt
        goes through the layers first without a graph (its keys and values kept), then the queries attend to
        it with one. The states are those of a single pass over prompt + queries (up to rounding; tested),
        and the backward pass runs over the Q query positions only (1.4x faster on the world's VLM).
        """
        embeds = self.prompt_embeds(batch)  # (B, S, D)
        b, s, q = embeds.shape[0], embeds.shape[1], queries.shape[0]
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(b, q)], dim=1)  # (B, S + Q)
        positions = self.position_ids(batch, q)  # (..., B, S + Q)
        dtype = queries.dtype  # the states come back in it (the VLM may run in bf16)
        queries = queries[None].expand(b, -1, -1).to(embeds.dtype)  # (B, Q, D)
        if not (self.causal and torch.is_grad_enabled() and queries.requires_grad):
            out = self.decoder(
                inputs_embeds=torch.cat([embeds, queries], dim=1),
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=True,
                use_cache=False,
            )
            return torch.stack([h[:, -q:] for h in out.hidden_states[1:]], dim=1).to(dtype)
        with torch.no_grad():
            prefix = self.decoder(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=positions[..., :s],
                use_cache=True,
            )
        out = self.decoder(
            inputs_embeds=queries,
            attention_mask=mask,
            position_ids=positions[..., s:],
            output_hidden_states=True,
            use_cache=True,
            **{self._cache_argument(): _cache_of(prefix)},
        )
        return torch.stack(list(out.hidden_states[1:]), dim=1).to(dtype)  # (B, L, Q, D)

    def _cache_argument(self) -> str:
        """The decoder's keyword for a key/value cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
        params = inspect.signature(self.decoder.forward).parameters
        return "cache" if "cache" in params else "past_key_values"


def _cache_of(output) -> object:
    """The key/value cache a decoder returned (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised by the ImageNet mean / std (InternVL's vision preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got shape {tuple(images.shape)}")
    return ((images.float() + 1) / 2).clamp(0, 1)


def _to_uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> B arrays (H, W, 3) uint8, the input of Hugging Face image processors."""
    return [(x.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8) for x in _to_unit_range(images)]


def scatter_image_features(
    embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int, feats: torch.Tensor
) -> torch.Tensor:
    """Put image features into the placeholder slots of the prompt embeddings.

    Args:
        embeds: (B, S, D) token embeddings of the prompt.
        input_ids: (B, S) token ids; the slots are where they equal ``image_token_id``.
        feats: (N, T, D) or (N*T, D) image features, in slot order.

    Returns:
        (B, S, D) embeddings with the slots replaced by the features.
    """
    slots = (input_ids == image_token_id).unsqueeze(-1)
    if int(slots.sum()) * embeds.shape[-1] != feats.numel():
        raise ValueError(
            f"{int(slots.sum())} image placeholder tokens but {feats.numel() // embeds.shape[-1]} image features; "
            "check the image token count (image_seq_length / num_image_tokens) in the VLM config"
        )
    return embeds.masked_scatter(slots, feats.to(embeds.dtype))


class InternVLBackbone(VLMBackbone):
    """InternVL3 through ``InternVLForConditionalGeneration`` (``model.model.language_model`` is Qwen2)."""

    supports_images = True
    start_image_token = "<img>"
    end_image_token = "</img>"

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def image_size(self) -> int:
        size = self.model.config.vision_config.image_size
        return size[0] if isinstance(size, (list, tuple)) else size

    def encode_images(self, images: torch.Tensor) -> PromptBatch:
        cfg = self.model.config
        context = self.tokenizer.convert_ids_to_tokens(cfg.image_token_id)
        image_text = self.start_image_token + context * cfg.image_seq_length + self.end_image_token
        text = self.config.image_template.format(image=image_text, instruction=self.config.image_instruction)
        input_ids, mask = self.tokenize([text] * len(images))
        x = F.interpolate(
            _to_unit_range(images),
            size=(self.image_size, self.image_size),
            mode="bicubic",
            align_corners=False,
        )
        return PromptBatch(input_ids, mask, pixel_values=imagenet_normalize(x.clamp(0, 1)))

    def prompt_embeds(self, batch: PromptBatch) -> torch.Tensor:
        embeds = self.decoder.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is None:
            return embeds
        feats = self.model.model.get_image_features(
            pixel_values=batch.pixel_values.to(embeds.device, self.model.dtype)
        ).pooler_output  # (B, image_seq_length, D)
        return scatter_image_features(embeds, batch.input_ids, self.model.config.image_token_id, feats)


class _ProcessorBackbone(VLMBackbone):
    """A VLM whose images go through a Hugging Face image processor and whose decoder is
    ``model.model.language_model`` (Qwen2.5-VL, Janus-Pro)."""

    def __init__(self, model: nn.Module, tokenizer, config: VLMConfig, image_processor=None) -> None:
        super().__init__(model, tokenizer, config)
        self.image_processor = image_processor

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model


class Qwen25VLBackbone(_ProcessorBackbone):
    """Qwen2.5-VL through ``Qwen2_5_VLForConditionalGeneration``: 3-D (mrope) positions for image prompts."""

    supports_images = True

    def encode_images(self, images: torch.Tensor) -> PromptBatch:
        if self.image_processor is None:
            raise ConfigError(
                "this Qwen2.5-VL backbone was loaded without an image processor; it cannot take images"
            )
        proc = self.image_processor(images=_to_uint8_arrays(images), return_tensors="pt")
        merge = self.model.config.vision_config.spatial_merge_size
        pad = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
        texts = []
        for thw in proc["image_grid_thw"]:
            n = int(thw.prod()) // merge**2
            image_text = "<|vision_start|>" + pad * n + "<|vision_end|>"
            texts.append(
                self.config.image_template.format(image=image_text, instruction=self.config.image_instruction)
            )
        input_ids, mask = self.tokenize(texts)
        return PromptBatch(
            input_ids, mask, pixel_values=proc["pixel_values"], image_grid_thw=proc["image_grid_thw"]
        )

    def prompt_embeds(self, batch: PromptBatch) -> torch.Tensor:
        embeds = self.decoder.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is None:
            return embeds
        feats = self.model.model.get_image_features(
            batch.pixel_values.to(embeds.device), batch.image_grid_thw
        ).pooler_output
        feats = torch.cat(list(feats), dim=0)
        return scatter_image_features(embeds, batch.input_ids, self.model.config.image_token_id, feats)

    def position_ids(self, batch: PromptBatch, num_queries: int) -> torch.Tensor:
        """(3, B, S + Q) positions: mrope for image tokens, queries after the largest prompt position."""
        if batch.pixel_values is None:
            return super().position_ids(batch, num_queries)[None].expand(3, -1, -1)
        token_type = (batch.input_ids == self.model.config.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(
            batch.input_ids,
            mm_token_type_ids=token_type,
            image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask,
        )  # (3, B, S)
        start = pos.amax(dim=(0, 2)) + 1  # (B,)
        queries = start[:, None] + torch.arange(num_queries, device=pos.device)[None]  # (B, Q)
        return torch.cat([pos, queries[None].expand(3, -1, -1)], dim=2)


class JanusBackbone(_ProcessorBackbone):
    """Janus-Pro through ``JanusForConditionalGeneration``: its Llama decoder (``model.model.language_model``).

    Only the understanding path is used: an input image goes through the SigLIP encoder and aligner into the
    ``<image_placeholder>`` slots between ``<begin_of_image>`` / ``<end_of_image>`` (Janus's own understanding
    format); Janus's VQ tokenizer and image-generation head are loaded with the checkpoint but never run.
    """

    supports_images = True
    start_image_token = "<begin_of_image>"
    end_image_token = "<end_of_image>"

    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: (image_size / patch_size)^2 (576 for Janus-Pro's 384 px, patch 16)."""
        return self.model.config.vision_config.num_image_tokens

    def encode_images(self, images: torch.Tensor) -> PromptBatch:
        if self.image_processor is None:
            raise ConfigError(
                "this Janus backbone was loaded without an image processor; it cannot take images"
            )
        proc = self.image_processor(images=_to_uint8_arrays(images), return_tensors="pt")
        pad = self.tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
        image_text = self.start_image_token + pad * self.num_image_tokens + self.end_image_token
        text = self.config.image_template.format(image=image_text, instruction=self.config.image_instruction)
        input_ids, mask = self.tokenize([text] * len(images))
        return PromptBatch(input_ids, mask, pixel_values=proc["pixel_values"])

    # the same as InternVL's: the image encoder's features (B, num_image_tokens, D) into the placeholder slots
    prompt_embeds = InternVLBackbone.prompt_embeds


class CausalLMBackbone(VLMBackbone):
    """Any Hugging Face decoder-only language model loaded by ``AutoModel`` (its base model, text only)."""

    @property
    def decoder(self) -> nn.Module:
        return self.model


class TextEncoderBackbone(VLMBackbone):
    """A bidirectional text encoder loaded by ``AutoModel`` (BERT-like; text only).

    Every token sees every other, so the prompt's states also depend on the queries; only the query positions
    are read out, as for a decoder. Its absolute position embeddings take the same ``cumsum(mask) - 1`` ids.
    """

    causal = False

    @property
    def decoder(self) -> nn.Module:
        return self.model


@torch.no_grad()
def is_causal(decoder: nn.Module, hidden_size: int, length: int = 6) -> bool:
    """Whether ``decoder``'s states of a position ignore later positions (a decoder-only LM) or not (an encoder).

    Two random embedding sequences (1, length, D) that differ only at the last position go through the model;
    a causal model gives the same states at the other positions (up to rounding), a bidirectional one does not.
    """
    param = next(decoder.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, length, hidden_size, generator=gen)
    y = x.clone()
    y[:, -1] = torch.randn(hidden_size, generator=gen)
    mask = torch.ones(1, length, dtype=torch.long, device=param.device)

    def states(e: torch.Tensor) -> torch.Tensor:
        out = decoder(inputs_embeds=e.to(param.device, param.dtype), attention_mask=mask)
        return out.last_hidden_state[:, :-1].float()  # (1, length - 1, D)

    a, b = states(x), states(y)
    return bool((a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1e-6))  # causal: equal up to rounding


BACKBONES: dict[str, type[VLMBackbone]] = {
    "internvl": InternVLBackbone,
    "qwen2_5_vl": Qwen25VLBackbone,
    "janus": JanusBackbone,
    "causal_lm": CausalLMBackbone,
    "text_encoder": TextEncoderBackbone,
}
