"""Stage 0 of the shapes world: the pretrained models the paper took from others, trained here.

* a tokenizer trained on the world's words (byte-level BPE, with the InternVL chat special tokens);
* a small VLM of the InternVL architecture (``InternVLForConditionalGeneration``) pretrained on captioning the
  world's images and on its captions as text, so that its layers carry meaning;
* a small SANA DiT pretrained for text-to-image with its own Gemma-2-architecture text encoder.

Artefacts are cached under a key of the world config, so a second ``parauni demo`` skips Stage 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import ModelConfig, from_dict
from ..models.tokenizer import train_bpe_tokenizer
from ..models.vlm import imagenet_normalize
from ..training.config import TrainConfig
from ..training.trainer import train, warmup_cosine
from ..utils.images import pil_to_tensor
from .captions import WorldStream, world_vocabulary
from .config import WorldConfig
from .t2i import TextToImage

STAGE0_VERSION = 2  # bump when the code that trains Stage 0 changes its results (2: per-example draws)
CAPTION_INSTRUCTION = "Describe the image."
DONE_FILE = "stage0.json"
# Each stage draws its own stream of world examples.
STREAM_OFFSETS = {
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


class WorldSource:
    """World examples by global index, as pixels in [-1, 1] (the trainer's data interface)."""

    encoded = False

    def __init__(self, seed: int, size: int) -> None:
        self.stream = WorldStream(seed, size)

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        items = [self.stream.example(i) for i in indices]
        return torch.stack([pil_to_tensor(e["image"]) for e in items]), [e["caption"] for e in items]


def stage0_key(cfg: WorldConfig) -> str:
    """Cache key of the Stage-0 artefacts: everything that changes them."""
    data = {
        "version": STAGE0_VERSION,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "vlm": dataclasses.asdict(cfg.vlm),
        "t2i": dataclasses.asdict(cfg.t2i),
        "ae": dataclasses.asdict(cfg.ae),
        "reward": dataclasses.asdict(cfg.reward),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


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
            hidden_size=v.vision_hidden,
            num_hidden_layers=v.vision_layers,
            num_attention_heads=v.vision_heads,
            intermediate_size=2 * v.vision_hidden,
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
            hidden_size=v.hidden,
            intermediate_size=v.intermediate,
            num_hidden_layers=v.layers,
            num_attention_heads=v.heads,
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
    are trained to gather the prompt's content (measured: their states vary about 10x more across prompts).
    """
    from ..config import CONDITIONAL_TEMPLATE

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
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    valid = labels != -100
    accuracy = (logits.argmax(-1)[valid] == labels[valid]).float().mean()
    return loss, accuracy


def train_world_vlm(model, tokenizer, cfg: WorldConfig, progress: bool = True) -> dict:
    """Pretrain the world VLM; returns its loss curve and held-out captioning metrics."""
    v = cfg.vlm
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["vlm"], cfg.image_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=v.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    curve = []
    for step in tqdm(range(v.steps), desc="stage 0: VLM", disable=not progress):
        lr = warmup_cosine(step, v.lr, v.warmup, v.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, acc = vlm_loss(model, tokenizer, stream.batch(step * v.batch_size, v.batch_size), v.restate)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "loss": loss.item(), "accuracy": acc.item()})
    model.eval()
    heldout = WorldStream(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).batch(0, 128)
    with torch.no_grad():
        loss, acc = vlm_loss(model, tokenizer, heldout, v.restate)
    return {"curve": curve, "heldout_loss": float(loss), "heldout_token_accuracy": float(acc)}


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


def train_world_autoencoder(ae, cfg: WorldConfig, progress: bool = True) -> dict:
    """Train the autoencoder to reconstruct world images (decoder robust to latent noise), then set its
    ``scaling_factor`` to 1 / std of the latents, as DC-AE's is set for SANA."""
    a = cfg.ae
    source = WorldSource(cfg.seed + STREAM_OFFSETS["ae"], cfg.image_size)
    opt = torch.optim.AdamW(ae.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    ae.train()
    curve = []
    for step in tqdm(range(a.steps), desc="stage 0: autoencoder", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, a.lr, 20, a.steps)
        x, _ = source.examples(list(range(step * a.batch_size, (step + 1) * a.batch_size)))
        z = ae.encode(x).latent
        z = z + a.latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        loss = torch.nn.functional.mse_loss(ae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "loss": loss.item()})
    ae.eval().requires_grad_(False)
    x, _ = WorldSource(cfg.seed + STREAM_OFFSETS["heldout"], cfg.image_size).examples(list(range(256)))
    with torch.no_grad():
        z = ae.encode(x).latent
        mse = torch.nn.functional.mse_loss(ae.decode(z).sample.clamp(-1, 1), x).item()
    ae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return {
        "curve": curve,
        "heldout_psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
        "latent_std": float(z.std()),
    }


# ----------------------------------------------------------------------------------------------- the T2I model
def world_t2i(cfg: WorldConfig, tokenizer, vae=None) -> TextToImage:
    """A randomly initialised SANA DiT (on the autoencoder's latents, or pixels) with its Gemma-2-architecture
    text encoder."""
    from diffusers import SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    t = cfg.t2i
    text_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=t.text_hidden,
        intermediate_size=2 * t.text_hidden,
        num_hidden_layers=t.text_layers,
        num_attention_heads=t.text_heads,
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
    return TextToImage(text_encoder, tokenizer, dit, vae=vae)


def train_text_encoder(t2i: TextToImage, cfg: WorldConfig, progress: bool = True) -> dict:
    """Pretrain the text encoder as a language model on world captions (as Gemma-2 was pretrained on text),
    with its input embedding as the output layer; then it is frozen, as SANA keeps its text encoder frozen."""
    t = cfg.t2i
    encoder = t2i.text_encoder
    stream = WorldStream(cfg.seed + STREAM_OFFSETS["text"], cfg.image_size)
    opt = torch.optim.AdamW(encoder.parameters(), lr=t.text_lr, betas=(0.9, 0.95), weight_decay=0.01)
    encoder.train()
    curve = []
    for step in tqdm(range(t.text_steps), desc="stage 0: text encoder", disable=not progress):
        lr = warmup_cosine(step, t.text_lr, 20, t.text_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        captions = [e["caption"] for e in stream.batch(step * t.text_batch_size, t.text_batch_size)]
        batch = t2i.encode_prompts(captions)
        hidden = encoder(**batch).last_hidden_state[:, :-1]  # (B, S - 1, C)
        logits = hidden @ encoder.get_input_embeddings().weight.T  # tied output layer
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        opt.step()
        curve.append({"step": step, "loss": loss.item()})
    encoder.eval().requires_grad_(t.tune_text_encoder)
    return {"final_loss": curve[-1]["loss"] if curve else float("nan"), "curve": curve}


def t2i_train_config(cfg: WorldConfig, save_every: int = 0) -> TrainConfig:
    t = cfg.t2i
    return TrainConfig(
        stage=0,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        warmup=t.warmup,
        weight_decay=0.01,
        caption_dropout=0.1,
        timestep_sampling=t.timestep_sampling,
        image_size=cfg.image_size,
        save_every=save_every,
        log_every=10,
        seed=cfg.seed,
    )


# ----------------------------------------------------------------------------------------------- Stage 0
def run_stage0(cfg: WorldConfig, cache_dir: str | Path, progress: bool = True, log=print) -> Path:
    """Train (or reuse from the cache) the world's tokenizer, VLM and text-to-image model.

    Returns the artefact folder: ``vlm/`` (InternVL + tokenizer), ``t2i/`` (text encoder + DiT), ``clip/`` +
    ``aesthetic.safetensors`` (the world's reward models) and ``stage0.json`` (timings and metrics), which
    is written last and marks the folder complete.
    """
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if (folder / DONE_FILE).is_file():
        log(f"stage 0: reusing the cached world models in {folder}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    timings, metrics = {}, {}

    t0 = time.time()
    tokenizer = world_tokenizer(cfg)
    vlm = world_vlm(cfg, tokenizer)
    log(
        f"stage 0: VLM with {sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters, "
        f"{cfg.vlm.layers} decoder layers"
    )
    vlm_metrics = train_world_vlm(vlm, tokenizer, cfg, progress)
    vlm.save_pretrained(folder / "vlm")
    tokenizer.save_pretrained(folder / "vlm")
    (folder / "vlm_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vlm_metrics.pop("curve")))
    timings["stage0_vlm"] = time.time() - t0
    metrics["vlm"] = vlm_metrics
    log(
        f"stage 0: VLM held-out caption token accuracy {vlm_metrics['heldout_token_accuracy']:.3f} "
        f"({timings['stage0_vlm']:.0f} s)"
    )

    t0 = time.time()
    vae = None
    if cfg.ae.enabled:
        vae = world_autoencoder(cfg)
        ae_metrics = train_world_autoencoder(vae, cfg, progress)
        (folder / "ae_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ae_metrics.pop("curve")))
        metrics["ae"] = ae_metrics
        timings["stage0_ae"] = time.time() - t0
        log(
            f"stage 0: autoencoder f{vae.spatial_compression_ratio}c{cfg.ae.latent_channels}, held-out PSNR "
            f"{ae_metrics['heldout_psnr']:.1f} dB ({timings['stage0_ae']:.0f} s)"
        )
        t0 = time.time()
    t2i = world_t2i(cfg, tokenizer, vae)
    log(
        f"stage 0: text-to-image DiT {sum(p.numel() for p in t2i.dit.parameters()) / 1e6:.2f}M + text encoder "
        f"{sum(p.numel() for p in t2i.text_encoder.parameters()) / 1e6:.2f}M parameters"
    )
    text_metrics = train_text_encoder(t2i, cfg, progress)
    (folder / "text_encoder_log.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in text_metrics.pop("curve"))
    )
    metrics["text_encoder"] = text_metrics
    source = WorldSource(cfg.seed + STREAM_OFFSETS["t2i"], cfg.image_size)
    result = train(t2i, source, t2i_train_config(cfg), folder / "t2i", progress=progress)
    timings["stage0_t2i"] = time.time() - t0
    metrics["t2i"] = {"final_loss": result.final_loss}
    log(f"stage 0: text-to-image final loss {result.final_loss:.4f} ({timings['stage0_t2i']:.0f} s)")
    t0 = time.time()
    metrics["clip"] = train_world_reward_models(folder, tokenizer, cfg, progress, log)
    timings["stage0_clip"] = time.time() - t0
    (folder / DONE_FILE).write_text(
        json.dumps({"timings": timings, "metrics": metrics, "key": stage0_key(cfg)}, indent=2)
    )
    return folder


def train_world_reward_models(
    folder: Path, tokenizer, cfg: WorldConfig, progress: bool = True, log=print
) -> dict:
    """Stage 0's last step: the world CLIP and the aesthetic MLP on its embeddings (Stage III's rewards),
    saved into ``folder``; returns their held-out metrics."""
    from .reward_models import save_world_reward_models, train_world_aesthetic, train_world_clip, world_clip

    t0 = time.time()
    clip = world_clip(cfg, tokenizer)
    clip_metrics = train_world_clip(clip, tokenizer, cfg, progress)
    mlp, aesthetic_metrics = train_world_aesthetic(clip, cfg, progress)
    save_world_reward_models(folder, clip, tokenizer, mlp, cfg)
    (folder / "clip_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in clip_metrics.pop("curve")))
    aesthetic_metrics.pop("curve")
    log(
        f"stage 0: world CLIP held-out retrieval top-1 {clip_metrics['heldout_retrieval_top1']:.3f}, hard-negative "
        f"accuracy {clip_metrics['heldout_hard_negative_accuracy']:.3f}; aesthetic ranking accuracy "
        f"{aesthetic_metrics['heldout_ranking_accuracy']:.3f} ({time.time() - t0:.0f} s)"
    )
    return {**clip_metrics, "aesthetic": aesthetic_metrics}


def stage0_folder(cfg: WorldConfig, cache_dir: str | Path) -> Path:
    """The complete Stage-0 folder of ``cfg`` in ``cache_dir``; a clear error when Stage 0 has not run."""
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if not (folder / DONE_FILE).is_file():
        raise FileNotFoundError(
            f"no complete Stage-0 world models in {folder}: run `parauni demo` first (same --world overrides "
            "and cache), which trains and caches them"
        )
    return folder


def world_model_config(cfg: WorldConfig, stage0: Path) -> ModelConfig:
    """The ParaUni model of the world: the Stage-0 VLM and DiT, pixel space, fresh queries + LIM."""
    p = cfg.parauni
    return from_dict(
        ModelConfig,
        {
            "name": "world",
            "seed": cfg.seed,
            "vlm": {
                "kind": "internvl",
                "path": str(Path(stage0, "vlm").resolve()),
                "dtype": "float32",
                "max_length": 96,
            },
            "lim": {
                "num_queries": p.num_queries,
                "connector_layers": p.connector_layers,
                "connector_heads": p.connector_heads,
                "connector_intermediate": p.connector_intermediate,
            },
            "dit": {
                "path": str(Path(stage0, "t2i", "transformer").resolve()),
                "subfolder": None,
                "dtype": "float32",
            },
            "vae": (
                {"kind": "dcae", "path": str(Path(stage0, "t2i", "vae").resolve()), "dtype": "float32"}
                if cfg.ae.enabled
                else {"kind": "none", "path": None}
            ),
            "sampling": {
                "sampler": cfg.eval.sampler,
                "steps": cfg.eval.steps,
                "cfg": cfg.eval.cfg,
                "height": cfg.image_size,
                "width": cfg.image_size,
            },
        },
    )
