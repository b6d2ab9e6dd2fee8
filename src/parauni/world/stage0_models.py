"""The Stage-0 models of the shapes world, each built beside its training: the tokenizer, the VLM (InternVL
architecture; captioning and text LM), the autoencoder (DC-AE) and the text-to-image model (SANA DiT with its
Gemma-2-architecture text encoder). :mod:`parauni.world.pretrain` trains them into a folder, phase by phase.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import CONDITIONAL_TEMPLATE
from ..errors import ConfigError
from ..models.tokenizer import train_bpe_tokenizer
from ..models.vlm import imagenet_normalize
from ..utils.images import pil_to_tensor
from ..utils.seeds import stream_seed
from .captions import TWIN_KINDS, WorldStream, caption_twin, world_vocabulary
from .config import STREAM_OFFSETS, WorldConfig, transformer_sizes
from .fit import fit
from .t2i import TextToImage

CAPTION_INSTRUCTION = "Describe the image."


class WorldSource:
    """World examples by global index, as pixels in [-1, 1] (the trainer's data interface)."""

    encoded = False

    def __init__(self, seed: int, size: int, twins: str = "binding") -> None:
        if twins not in TWIN_KINDS:
            raise ConfigError(f"world twins {twins!r}: choose one of {list(TWIN_KINDS)}")
        self.stream = WorldStream(seed, size)
        self.twins = twins

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        items = [self.stream.example(i) for i in indices]
        return torch.stack([pil_to_tensor(e["image"]) for e in items]), [e["caption"] for e in items]

    def twin(self, caption: str) -> str | None:
        """The caption's twin of the source's kind, or None (``train.distill_twins``; :func:`caption_twin`)."""
        return caption_twin(caption, self.twins)


# ----------------------------------------------------------------------------------------------- tokenizer
def world_tokenizer(cfg: WorldConfig):
    """A byte-level BPE tokenizer trained on world captions and the prompt templates."""
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["tokenizer"], cfg.image_size)
    corpus = [e["caption"] for e in stream.batch(0, 2000)]
    corpus += [" ".join(world_vocabulary()), "Generate an image: ", "Generate an image.", CAPTION_INSTRUCTION]
    corpus += ["Keep the image as it is.", "user\n", "assistant\n"]
    return train_bpe_tokenizer(corpus, vocab_size=cfg.vlm.vocab_size)


# ----------------------------------------------------------------------------------------------- the VLM
def world_vlm(cfg: WorldConfig, tokenizer):
    """A randomly initialised InternVL-architecture VLM sized by ``cfg.vlm``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v, size = cfg.vlm, cfg.image_size
    grid = size // v.patch
    config = InternVLConfig(
        vision_config=dict(
            **transformer_sizes(v.vision_hidden, v.vision_layers, v.vision_heads, 2 * v.vision_hidden),
            image_size=[size, size],
            patch_size=[v.patch, v.patch],
            use_qk_norm=False,
            norm_type="layer_norm",
            use_mean_pooling=True,
            use_absolute_position_embeddings=True,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            **transformer_sizes(v.hidden, v.layers, v.heads, v.intermediate),
            num_key_value_heads=v.kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=(grid // 2) ** 2,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return InternVLForConditionalGeneration(config)


def _vlm_batch(
    model, tokenizer, items: list[dict], text_only: list[bool], restate: bool = False
) -> dict[str, torch.Tensor]:
    """Captioning rows (image -> caption) and text rows (the generation prompt as language modelling).

    With ``restate`` a text row continues the generation prompt, after its ``<img>``, with the caption again
    (the answer of a unified model, written as text), so that the positions where ParaUni's queries will sit
    are trained to gather the prompt's content (docs/world.md gives how much more their states vary).
    """
    context = "<img>" + "<IMG_CONTEXT>" * model.config.image_seq_length + "</img>"
    texts, prompt_lens, images = [], [], []
    for item, text in zip(items, text_only, strict=True):
        if text:
            full = CONDITIONAL_TEMPLATE.format(caption=item["caption"])
            if restate:
                full += item["caption"] + "</img><|im_end|>"
            texts.append(full)
            prompt_lens.append(0)
        else:
            prompt = f"<|im_start|>user\n{context}\n{CAPTION_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
            texts.append(prompt + item["caption"] + "<|im_end|>")
            prompt_lens.append(len(tokenizer(prompt).input_ids))
            images.append(pil_to_tensor(item["image"]))
    enc = tokenizer(texts, padding="longest", padding_side="right", return_tensors="pt")
    labels = enc.input_ids.clone()
    labels[enc.attention_mask == 0] = -100
    for i, n in enumerate(prompt_lens):
        labels[i, :n] = -100
    out = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
    if images:
        out["pixel_values"] = imagenet_normalize((torch.stack(images) + 1) / 2)
    return out


def _split_rows(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """Half of a batch is captioning (image rows), half text LM; images must come first for the scatter."""
    half = len(items) // 2
    return items[:half], items[half:]


def vlm_loss(model, tokenizer, items: list[dict], restate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss and accuracy over the answer tokens of a mixed captioning / text batch."""
    image_items, text_items = _split_rows(items)
    batch = _vlm_batch(
        model,
        tokenizer,
        image_items + text_items,
        [False] * len(image_items) + [True] * len(text_items),
        restate,
    )
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    valid = labels != -100
    accuracy = (logits.argmax(-1)[valid] == labels[valid]).float().mean()
    return loss, accuracy


@torch.no_grad()
def caption_accuracy(model, tokenizer, items: list[dict]) -> float:
    """Next-token accuracy over the caption tokens of image -> caption rows only (teacher forcing)."""
    batch = {
        k: v.to(model.device) for k, v in _vlm_batch(model, tokenizer, items, [False] * len(items)).items()
    }
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    return float((logits.argmax(-1)[valid] == labels[valid]).float().mean())


def train_world_vlm(
    model, tokenizer, cfg: WorldConfig, progress: bool = True, work: str | Path | None = None
) -> dict:
    """Pretrain the world VLM (resumable from ``work``); returns its loss curve and held-out metrics: the
    mixed batch's loss and token accuracy, and the token accuracy of captioning alone."""
    v = cfg.vlm
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["vlm"], cfg.image_size)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        batch = stream.batch(step * v.train.batch_size, v.train.batch_size)
        loss, acc = vlm_loss(model, tokenizer, batch, v.restate)
        return loss, {"accuracy": acc}

    result = fit("VLM", model, step_loss, cfg.vlm.train, work, cfg.seed, cfg.save_every, progress=progress)
    heldout = WorldStream(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).batch(0, 128)
    with torch.no_grad():
        loss, acc = vlm_loss(model, tokenizer, heldout, v.restate)
    return {
        **result,
        "heldout_loss": float(loss),
        "heldout_token_accuracy": float(acc),
        "heldout_caption_accuracy": caption_accuracy(model, tokenizer, heldout),
    }


# ----------------------------------------------------------------------------------------------- the autoencoder
def world_autoencoder(cfg: WorldConfig):
    """A small DC-AE (diffusers ``AutoencoderDC`` of ResBlocks) for the world's images."""
    from diffusers import AutoencoderDC

    a = cfg.ae
    n = len(a.channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        return AutoencoderDC(
            in_channels=3,
            latent_channels=a.latent_channels,
            attention_head_dim=8,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=tuple(a.channels),
            decoder_block_out_channels=tuple(a.channels),
            encoder_layers_per_block=(1,) * n,
            decoder_layers_per_block=(1,) * n,
            encoder_qkv_multiscales=((),) * n,
            decoder_qkv_multiscales=((),) * n,
            upsample_block_type="interpolate",
            downsample_block_type="conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=1.0,
        )


def train_world_autoencoder(
    ae, cfg: WorldConfig, progress: bool = True, work: str | Path | None = None
) -> dict:
    """Train the autoencoder to reconstruct world images (decoder robust to latent noise; resumable from
    ``work``), then set its ``scaling_factor`` to 1 / std of the latents, as DC-AE's is set for SANA."""
    a = cfg.ae
    source = WorldSource(cfg.seed + STREAM_OFFSETS["ae"], cfg.image_size)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, step))
        x, _ = source.examples(list(range(step * a.train.batch_size, (step + 1) * a.train.batch_size)))
        x = x.to(ae.device)
        z = ae.encode(x).latent
        z = z + a.latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen).to(z.device)
        return torch.nn.functional.mse_loss(ae.decode(z).sample, x), {}

    result = fit(
        "autoencoder",
        ae,
        step_loss,
        a.train,
        work,
        cfg.seed,
        cfg.save_every,
        progress=progress,
    )
    ae.requires_grad_(False)
    x, _ = WorldSource(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).examples(list(range(256)))
    x = x.to(ae.device)
    with torch.no_grad():
        z = ae.encode(x).latent
        mse = torch.nn.functional.mse_loss(ae.decode(z).sample.clamp(-1, 1), x).item()
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return {**result, "heldout_psnr": 10 * math.log10(4.0 / max(mse, 1e-12)), "latent_std": float(z.std())}


# ----------------------------------------------------------------------------------------------- the T2I model
def world_t2i(cfg: WorldConfig, tokenizer, vae=None) -> TextToImage:
    """A randomly initialised SANA DiT (on the autoencoder's latents, or pixels) with its Gemma-2-architecture
    text encoder."""
    from diffusers import SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    t = cfg.t2i
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        **transformer_sizes(t.text_hidden, t.text_layers, t.text_heads, 2 * t.text_hidden),
        num_key_value_heads=t.text_heads,
        head_dim=t.text_hidden // t.text_heads,
        query_pre_attn_scalar=t.text_hidden // t.text_heads,
        max_position_embeddings=256,
        sliding_window=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    width = 32 * t.dit_heads
    f = 1 if vae is None else vae.spatial_compression_ratio
    channels, patch, grid = (
        (3 if vae is None else cfg.ae.latent_channels),
        t.dit_patch,
        cfg.image_size // f // t.dit_patch,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        text_encoder = Gemma2Model(text_config)
        dit = SanaTransformer2DModel(
            in_channels=channels,
            out_channels=channels,
            num_attention_heads=t.dit_heads,
            attention_head_dim=32,
            num_layers=t.dit_layers,
            num_cross_attention_heads=t.dit_heads,
            cross_attention_head_dim=32,
            cross_attention_dim=width,
            caption_channels=t.text_hidden,
            mlp_ratio=t.mlp_ratio,
            sample_size=grid,
            patch_size=patch,
            interpolation_scale=1,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            qk_norm=None,
        )
    fixed = t.text_tokens > 0
    return TextToImage(
        text_encoder, tokenizer, dit, max_length=t.text_tokens if fixed else 64, vae=vae, fixed_length=fixed
    )


def train_text_encoder(
    t2i: TextToImage, cfg: WorldConfig, progress: bool = True, work: str | Path | None = None
) -> dict:
    """Pretrain the text encoder as a language model on world captions (as Gemma-2 was pretrained on text),
    with its input embedding as the output layer (resumable from ``work``)."""
    t = cfg.t2i
    encoder = t2i.text_encoder
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["text"], cfg.image_size)

    def step_loss(step: int) -> tuple[torch.Tensor, dict]:
        captions = [
            e["caption"] for e in stream.batch(step * t.text_train.batch_size, t.text_train.batch_size)
        ]
        batch = t2i.encode_prompts(captions)
        hidden = encoder(**batch).last_hidden_state[:, :-1]  # (B, S - 1, C)
        logits = hidden @ encoder.get_input_embeddings().weight.T  # tied output layer
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)), {}

    result = fit(
        "text encoder",
        encoder,
        step_loss,
        t.text_train,
        work,
        cfg.seed,
        cfg.save_every,
        progress=progress,
    )
    encoder.requires_grad_(t.tune_text_encoder)
    return {**result, "final_loss": result["curve"][-1]["loss"] if result["curve"] else float("nan")}
