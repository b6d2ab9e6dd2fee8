"""The shapes world's Stage-0 text-to-image model: a SANA DiT with its OWN small text encoder.

As SANA was trained with Gemma-2, the world's DiT is pretrained with a small text encoder of the Gemma-2
architecture (``transformers.Gemma2Model``), trained together with it, never with the VLM. Stage I then has
to align the VLM's queries to this DiT for real, and the last-layer vs all-layer comparison is fair.

It exposes the training interface of :func:`parauni.training.trainer.train` (``encode_prompts``,
``forward``, ``param_groups``, ``encode_images``, ``save_pretrained``) and the velocity of the sampler.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..diffusion.flow import dit_timestep, flow_loss, interpolate
from ..diffusion.sampling import sample
from ..pipeline import initial_noise
from ..utils.files import drop_machine_paths
from ..utils.images import tensor_to_uint8
from ..utils.optim import decay_groups

BOS = "<|im_start|>"
CONFIG_FILE = "t2i_config.json"


class TextToImage(nn.Module):
    """Text encoder (B, S) -> (B, S, C) and SANA DiT, on an autoencoder's latents or in pixel space.

    With ``fixed_length`` every caption is padded (or cut) to ``max_length`` tokens and the DiT attends to all
    of them, padding states included (the mask is all ones): the DiT then learns from every one of the S
    condition tokens, as ParaUni's S query tokens will feed it. Otherwise captions are padded to the batch's
    longest and the padding is masked out of cross-attention.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer,
        dit: nn.Module,
        max_length: int = 64,
        vae=None,
        fixed_length: bool = False,
    ) -> None:
        super().__init__()
        if text_encoder.config.hidden_size != dit.config.caption_channels:
            raise ValueError(
                f"text encoder width {text_encoder.config.hidden_size} != DiT caption_channels "
                f"{dit.config.caption_channels}"
            )
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.dit = dit
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
        self.max_length = max_length
        self.fixed_length = fixed_length

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def encode_prompts(self, captions: list[str | None]) -> dict[str, torch.Tensor]:
        """Token ids and mask (B, S); ``None`` is the empty (unconditional) caption."""
        texts = [BOS + (c or "") for c in captions]
        enc = self.tokenizer(
            texts,
            padding="max_length" if self.fixed_length else "longest",
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": enc.input_ids.to(self.device),
            "attention_mask": enc.attention_mask.to(self.device),
        }

    def condition(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, S, C), mask (B, S)) of the DiT's cross-attention; no graph through a frozen text
        encoder. With ``fixed_length`` the mask is all ones (the padding states are read too)."""
        trains = any(p.requires_grad for p in self.text_encoder.parameters())
        mask = batch["attention_mask"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            out = self.text_encoder(input_ids=batch["input_ids"], attention_mask=mask)
        return out.last_hidden_state, torch.ones_like(mask) if self.fixed_length else mask

    @torch.no_grad()
    def text_states(self, captions: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, S, C), mask (B, S)) of the text encoder: the teacher of ``train.condition_distill``."""
        return self.condition(self.encode_prompts(captions))

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        emb, mask = cond
        return self.dit(
            hidden_states=x_t,
            encoder_hidden_states=emb,
            encoder_attention_mask=mask,
            timestep=dit_timestep(t, self.dit.config.get("timestep_scale", 1.0)),
            return_dict=False,
        )[0]

    def forward(self, batch: dict, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return flow_loss(self.velocity(interpolate(x0, noise, t), t, self.condition(batch)), x0, noise)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) -> the DiT's input space."""
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the trained parameters: weight decay on matrices, none on 1-D ones."""
        return decay_groups(self.parameters(), weight_decay)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        size: int,
        steps: int = 20,
        cfg: float = 4.5,
        sampler: str = "dpm",
        shift: float = 3.0,
    ) -> torch.Tensor:
        """(N, 3, size, size) in [-1, 1]; image i from noise seed ``seeds[i]``."""
        self.eval()
        n = len(prompts)
        emb, mask = self.condition(self.encode_prompts(list(prompts) + [None] * n))
        f = 1 if self.vae is None else self.vae.spatial_compression_ratio
        noise = initial_noise((self.dit.config.in_channels, size // f, size // f), seeds, self.device)
        x = sample(
            self.velocity,
            (emb[:n], mask[:n]),
            (emb[n:], mask[n:]),
            noise,
            sampler=sampler,
            steps=steps,
            shift=shift,
            cfg=cfg,
        )
        return self.decode_latents(x)

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "text_encoder")
        self.dit.save_pretrained(folder / "transformer")
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        config = {"max_length": self.max_length, "fixed_length": self.fixed_length}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        drop_machine_paths(folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TextToImage:
        from diffusers import AutoencoderDC, SanaTransformer2DModel
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        text_encoder = AutoModel.from_pretrained(folder / "text_encoder").requires_grad_(False).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")
        dit = SanaTransformer2DModel.from_pretrained(folder / "transformer")
        vae = AutoencoderDC.from_pretrained(folder / "vae") if (folder / "vae").is_dir() else None
        config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
        return cls(text_encoder, tokenizer, dit, vae=vae, **config)


def t2igen(model: TextToImage, cfg):
    """ShapesEval's generate function for the Stage-0 text-to-image model (sampler settings: ``cfg.eval``
    and ``cfg.image_size`` of a world config)."""
    e = cfg.eval

    def fn(prompts: list[str], first_seed: int):
        seeds = list(range(first_seed, first_seed + len(prompts)))
        x = model.generate(prompts, seeds, cfg.image_size, steps=e.steps, cfg=e.cfg, sampler=e.sampler)
        return tensor_to_uint8(x)

    return fn
