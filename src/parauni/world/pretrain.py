"""Stage 0 of the shapes world: the pretrained models the paper took from others, trained here.

* a tokenizer trained on the world's words (byte-level BPE, with the InternVL chat special tokens);
* a small VLM of the InternVL architecture (``InternVLForConditionalGeneration``) pretrained on captioning the
  world's images and on its captions as text, so that its layers carry meaning;
* a small DC-AE, and a small SANA DiT pretrained for text-to-image with its own Gemma-2-architecture text
  encoder;
* the world's reward models (a CLIP and an aesthetic MLP).

:func:`pretrain` trains them into a folder, model by model ("phases"), resumable after a kill at any point;
``parauni world pretrain`` runs it with the long recipe (:data:`RECIPE`) whose result ships with the package
(:mod:`parauni.world.release`); ``parauni demo --stage0 scratch`` runs it with the world config's quick defaults,
cached under a key of the config.

Why one module of about 650 lines: it is one recipe read top to bottom, each model's builder beside its
training loop and its phase (tokenizer, VLM, autoencoder, text-to-image, rewards), then the resumable folder
that holds them; the reward models, the fit loop and the text-to-image model already live apart
(``reward_models.py``, ``fit.py``, ``t2i.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ..config import CONDITIONAL_TEMPLATE, ModelConfig, from_dict
from ..errors import MissingFileError, ParaUniError
from ..models.tokenizer import train_bpe_tokenizer
from ..models.vlm import imagenet_normalize
from ..training.checkpoint import RAW_FILE
from ..training.run import RunOptions, run_stage
from ..utils.device import default_device
from ..utils.images import pil_to_tensor
from ..utils.run_files import CHECKPOINT_DIR, TRAIN_LOG
from .captions import WorldStream, binding_twin, world_vocabulary
from .config import STREAM_OFFSETS, WorldConfig, stage0_base, transformer_sizes, world_config
from .fit import fit
from .reward_models import save_world_reward_models, train_world_aesthetic, train_world_clip, world_clip
from .t2i import TextToImage

STAGE0_VERSION = (
    3  # bump when the code that trains Stage 0 changes its results (3: fixed-length DiT captions)
)
CAPTION_INSTRUCTION = "Describe the image."
DONE_FILE = "stage0.json"
CONFIG_FILE = "world.json"
METRICS_DIR = "metrics"
WORK_DIR = ".work"
# Phases of Stage 0 in the order they run; t2i needs the autoencoder, rewards nothing but the tokenizer.
PHASES: tuple[str, ...] = ("vlm", "ae", "t2i", "rewards")
# The long recipe of the shipped Stage 0 (`parauni world pretrain`): overrides of the world config's quick
# defaults, chosen by the measurements in docs/world.md.
RECIPE: tuple[str, ...] = (
    "vlm.train.steps=1500",
    "vlm.train.warmup=50",
    "vlm.restate=true",
    "ae.train.steps=800",
    "t2i.text_train.steps=300",
    "t2i.train.steps=6000",
    "t2i.train.warmup=100",
    "t2i.train.ema=0.999",
    "reward.train.steps=1500",
    "reward.train.warmup=50",
    "reward.aesthetic_train.steps=300",
)


class Stage0Error(ParaUniError, ValueError):
    """A Stage-0 folder that cannot be used as asked (another config, a missing model)."""


class WorldSource:
    """World examples by global index, as pixels in [-1, 1] (the trainer's data interface)."""

    encoded = False

    def __init__(self, seed: int, size: int) -> None:
        self.stream = WorldStream(seed, size)

    def examples(self, indices: list[int], seed: int = 0) -> tuple[torch.Tensor, list[str]]:
        items = [self.stream.example(i) for i in indices]
        return torch.stack([pil_to_tensor(e["image"]) for e in items]), [e["caption"] for e in items]

    @staticmethod
    def twin(caption: str) -> str | None:
        """The caption with its bindings exchanged, or None (``train.distill_twins``; :func:`binding_twin`)."""
        return binding_twin(caption)


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
    are trained to gather the prompt's content (measured: their states vary about 10x more across prompts).
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
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
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


# ----------------------------------------------------------------------------------------------- Stage 0
def stage0_config(cfg: WorldConfig) -> dict:
    """The part of the world config that determines Stage 0 (what ``world.json`` of a Stage-0 folder holds)."""
    keep = ("image_size", "seed", "vlm", "ae", "t2i", "reward")
    data = {k: v for k, v in dataclasses.asdict(cfg).items() if k in keep}
    for bookkeeping in ("save_every", "keep_last", "log_every"):  # they change no weight
        del data["t2i"]["train"][bookkeeping]
    return data


def stage0_key(cfg: WorldConfig) -> str:
    """Cache key of the Stage-0 artefacts: everything that changes them."""
    data = {"version": STAGE0_VERSION, **stage0_config(cfg)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _claim_folder(folder: Path, cfg: WorldConfig) -> None:
    """Write ``world.json`` into a new Stage-0 folder, or check that an existing one was begun with the same
    Stage-0 config (a resumed run must not mix two recipes)."""
    wanted = {"version": STAGE0_VERSION, **stage0_config(cfg)}
    path = folder / CONFIG_FILE
    if path.is_file():
        found = json.loads(
            path.read_text()
        )  # an earlier folder's flat keys are nested, today's fixed values added
        found = {"version": found.get("version"), **stage0_config(world_config(base=stage0_base(found)))}
        if found != wanted:
            diff = [
                k
                for k in sorted(set(_flat(found)) | set(_flat(wanted)))
                if _flat(found).get(k) != _flat(wanted).get(k)
            ]
            raise Stage0Error(
                f"{folder} holds a Stage 0 begun with another world config (differs in {diff[:6]}): give another "
                "--out, or the same --world overrides to resume it"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def phase_metrics(folder: str | Path, phase: str) -> dict | None:
    """The metrics a finished phase wrote (``metrics/<phase>.json``), or None while it has not finished."""
    path = Path(folder) / METRICS_DIR / f"{phase}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish_phase(folder: Path, phase: str, metrics: dict, curves: dict[str, list]) -> dict:
    """Write the phase's loss curves (``<name>_log.jsonl``) and its metrics file, which marks it done."""
    for name, curve in curves.items():
        (folder / f"{name}_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
    (folder / METRICS_DIR).mkdir(exist_ok=True)
    tmp = folder / METRICS_DIR / f".{phase}.json"
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.rename(folder / METRICS_DIR / f"{phase}.json")
    return metrics


def _phase_vlm(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vlm = world_vlm(cfg, tokenizer).to(default_device())
    log(
        f"stage 0: VLM with {sum(p.numel() for p in vlm.parameters()) / 1e6:.2f}M parameters, {cfg.vlm.layers} decoder layers"
    )
    m = train_world_vlm(vlm, tokenizer, cfg, progress, folder / WORK_DIR / "vlm")
    vlm.cpu().save_pretrained(folder / "vlm")
    tokenizer.save_pretrained(folder / "vlm")
    log(
        f"stage 0: VLM held-out caption token accuracy {m['heldout_caption_accuracy']:.3f} (mixed rows "
        f"{m['heldout_token_accuracy']:.3f}; {m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "vlm", m, {"vlm": m.pop("curve")})


def _phase_ae(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vae = world_autoencoder(cfg).to(default_device())
    m = train_world_autoencoder(vae, cfg, progress, folder / WORK_DIR / "ae")
    vae.cpu().save_pretrained(folder / "t2i" / "vae")
    log(
        f"stage 0: autoencoder f{vae.spatial_compression_ratio}c{cfg.ae.latent_channels}, held-out PSNR "
        f"{m['heldout_psnr']:.1f} dB ({m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "ae", m, {"ae": m.pop("curve")})


def _phase_t2i(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    vae = None
    if cfg.ae.enabled:
        from diffusers import AutoencoderDC

        if phase_metrics(folder, "ae") is None:
            raise Stage0Error(
                f"the text-to-image phase needs the autoencoder of {folder}: train phase 'ae' first"
            )
        vae = AutoencoderDC.from_pretrained(folder / "t2i" / "vae")
    t2i = world_t2i(cfg, tokenizer, vae).to(default_device())
    log(
        f"stage 0: text-to-image DiT {sum(p.numel() for p in t2i.dit.parameters()) / 1e6:.2f}M + text encoder "
        f"{sum(p.numel() for p in t2i.text_encoder.parameters()) / 1e6:.2f}M parameters"
    )
    text = train_text_encoder(t2i, cfg, progress, folder / WORK_DIR / "text_encoder")
    source = WorldSource(cfg.seed + STREAM_OFFSETS["t2i"], cfg.image_size)
    t0 = time.time()
    result = run_stage(
        t2i, source, cfg.t2i.train, folder / "t2i", RunOptions(resume=True, progress=progress)
    ).result
    log_rows = [json.loads(line) for line in (folder / "t2i" / TRAIN_LOG).read_text().splitlines()]
    m = {
        "final_loss": result.final_loss,
        "text_encoder_final_loss": text["final_loss"],
        "seconds": text["seconds"] + (log_rows[-1]["seconds"] if log_rows else time.time() - t0),
    }
    log(f"stage 0: text-to-image final loss {result.final_loss:.4f} ({m['seconds']:.0f} s)")
    return _finish_phase(folder, "t2i", m, {"text_encoder": text["curve"]})


def _phase_rewards(cfg: WorldConfig, folder: Path, tokenizer, progress: bool, log) -> dict:
    clip = world_clip(cfg, tokenizer).to(default_device())
    clip_metrics = train_world_clip(clip, tokenizer, cfg, progress, folder / WORK_DIR / "clip")
    mlp, aesthetic = train_world_aesthetic(clip, cfg, progress, folder / WORK_DIR / "aesthetic")
    save_world_reward_models(folder, clip.cpu(), tokenizer, mlp.cpu(), cfg)
    curve = clip_metrics.pop("curve")
    aesthetic.pop("curve")
    m = {**clip_metrics, "aesthetic": aesthetic, "seconds": clip_metrics["seconds"] + aesthetic["seconds"]}
    log(
        f"stage 0: world CLIP held-out retrieval top-1 {m['heldout_retrieval_top1']:.3f}, hard-negative "
        f"accuracy {m['heldout_hard_negative_accuracy']:.3f}; aesthetic ranking accuracy "
        f"{aesthetic['heldout_ranking_accuracy']:.3f} ({m['seconds']:.0f} s)"
    )
    return _finish_phase(folder, "rewards", m, {"clip": curve})


_PHASE_FNS = {"vlm": _phase_vlm, "ae": _phase_ae, "t2i": _phase_t2i, "rewards": _phase_rewards}


def pretrain(
    cfg: WorldConfig,
    folder: str | Path,
    phases: tuple[str, ...] | list[str] = PHASES,
    progress: bool = True,
    log=print,
) -> dict[str, dict]:
    """Train the Stage-0 models of ``phases`` into ``folder``, resuming whatever a killed run left there.

    A phase that finished (``metrics/<phase>.json``) is skipped; one that was interrupted continues from its
    last checkpoint (``.work/`` for the small models, ``t2i/checkpoints`` for the DiT) to the same weights as an
    uninterrupted run. Two processes may train different phases into the same folder at once (the DiT needs
    the autoencoder's phase done first). Returns the metrics of every finished phase.
    """
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise Stage0Error(f"unknown Stage-0 phases {unknown}; choose from {list(PHASES)}")
    folder = Path(folder)
    _claim_folder(folder, cfg)
    tokenizer = world_tokenizer(cfg)
    for phase in PHASES:
        if phase not in phases or (phase == "ae" and not cfg.ae.enabled):
            continue
        if phase_metrics(folder, phase) is not None:
            log(f"stage 0: {phase} already trained in {folder}")
            continue
        _PHASE_FNS[phase](cfg, folder, tokenizer, progress, log)
    return {p: m for p in PHASES if (m := phase_metrics(folder, p)) is not None}


def clean_work(folder: str | Path) -> None:
    """Remove what only resuming needs (checkpoints, the DiT's last raw weights) from a finished folder."""
    folder = Path(folder)
    shutil.rmtree(folder / WORK_DIR, ignore_errors=True)
    shutil.rmtree(folder / "t2i" / CHECKPOINT_DIR, ignore_errors=True)
    (folder / "t2i" / RAW_FILE).unlink(missing_ok=True)


def run_stage0(cfg: WorldConfig, cache_dir: str | Path, progress: bool = True, log=print) -> Path:
    """Train (or reuse from the cache) the world's Stage-0 models with ``cfg`` as it is (the quick from-scratch
    path of ``parauni demo --stage0 scratch``).

    Returns the folder: ``vlm/`` (InternVL + tokenizer), ``t2i/`` (text encoder + DiT + autoencoder),
    ``clip/`` + ``aesthetic.safetensors`` (the world's reward models) and ``stage0.json`` (timings and metrics),
    which is written last and marks the folder complete.
    """
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if (folder / DONE_FILE).is_file():
        log(f"stage 0: reusing the cached world models in {folder}")
        return folder
    metrics = pretrain(cfg, folder, PHASES, progress, log)
    write_stage0_summary(folder, metrics)
    clean_work(folder)
    return folder


def write_stage0_summary(folder: Path, metrics: dict[str, dict], extra: dict | None = None) -> None:
    """``stage0.json``: seconds and metrics per model (the demo reads it); written last, it marks the folder
    complete."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    summary = {
        "timings": {f"stage0_{p}": m.get("seconds", 0.0) for p, m in metrics.items()},
        "metrics": {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in metrics.items()},
        "key": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12],
        "config": config,
        **(extra or {}),
    }
    (folder / DONE_FILE).write_text(json.dumps(summary, indent=2) + "\n")


def stage0_folder(cfg: WorldConfig, cache_dir: str | Path) -> Path:
    """The complete Stage-0 folder of ``cfg`` in ``cache_dir``; a clear error when Stage 0 has not run."""
    folder = Path(cache_dir) / f"stage0-{stage0_key(cfg)}"
    if not (folder / DONE_FILE).is_file():
        raise MissingFileError(
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
                "use_layernorm": p.use_layernorm,
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
