"""Shared fixtures for the CPU test suite.

* Offline mode (``HF_HUB_OFFLINE=1``) and one CPU thread, set before torch / transformers are imported.
* ``tiny_model``: the ``tiny`` preset (random InternVL + SANA + DC-AE), built once per session; tests that train
  or perturb a model build their own with ``make_tiny``.
* Tiny random Hugging Face components (InternVL, Qwen2.5-VL, decoder-only LMs, SANA, DC-AE) written with
  ``save_pretrained`` into a session folder, each with its locally trained tokenizer, so the tests load them
  back by path exactly as real checkpoints are loaded.
* ``quick_cache``: the quick shapes world's Stage 0, trained once per session for the world tests.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: the tiny models gain little from two, and on a shared 2-core machine two OpenMP threads
# spin-wait for each other (measured: the model tests take 4x longer under load with 2 threads than with 1).
torch.set_num_threads(1)

from parauni.config import (  # noqa: E402
    ModelConfig,
    TrainableConfig,
    apply_overrides,
    from_dict,
    load_model_config,
    preset_dict,
)
from parauni.models.parauni import ParaUni  # noqa: E402
from parauni.models.tokenizer import BASIC_CORPUS, train_bpe_tokenizer  # noqa: E402
from parauni.rl.config import PhaseConfig, RLConfig  # noqa: E402

# The text decoder shared by every tiny VLM / LM below (4 layers of width 64, GQA 4/2 heads).
TEXT_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)
NUM_LAYERS = TEXT_CONFIG["num_hidden_layers"]
WIDTH = TEXT_CONFIG["hidden_size"]


def tiny_config(overrides: list[str] | None = None, **sections) -> ModelConfig:
    """The ``tiny`` preset with ``--section.key=value`` overrides and whole sections replaced/updated."""
    data = preset_dict("tiny")
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return from_dict(ModelConfig, apply_overrides(data, overrides or []))


def tiny_rl_config(**fields) -> RLConfig:
    """A Stage-III config small enough for a test: one phase of reward ``bright``, 2 prompts x 2 images of 32 x 32
    an epoch, 3 steps, a rank-4 LoRA, no checkpoints; ``fields`` replace any of it."""
    base = dict(
        phases=[PhaseConfig("p", {"bright": 1.0}, 2, "deep", 0.02)],
        prompts_per_epoch=2,
        group_size=2,
        steps=3,
        cfg=2.0,
        height=32,
        width=32,
        micro_batch=4,
        rollout_batch=4,
        trainable=TrainableConfig(queries=False, lim=False, dit=False, dit_lora_rank=4, dit_lora_alpha=8.0),
        save_every=0,
    )
    return RLConfig(**{**base, **fields})


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(BASIC_CORPUS, vocab_size=512)


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_models")


def _save(model, tokenizer, folder: Path, extra=None) -> Path:
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if extra is not None:
        extra.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def internvl_dir(hf_root, tokenizer) -> Path:
    """A tiny InternVL3-style ``InternVLForConditionalGeneration`` (56 px images -> 4 <IMG_CONTEXT> tokens)."""
    import transformers as tf

    config = tf.InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=[56, 56],
            patch_size=[14, 14],
            use_qk_norm=False,
            norm_type="layer_norm",
            use_mean_pooling=True,
            use_absolute_position_embeddings=True,
        ),
        text_config=dict(model_type="qwen2", **TEXT_CONFIG),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        model = tf.InternVLForConditionalGeneration(config)
    return _save(model, tokenizer, hf_root / "internvl")


@pytest.fixture(scope="session")
def qwen_vl_dir(hf_root, tokenizer) -> Path:
    """A tiny ``Qwen2_5_VLForConditionalGeneration`` with its image processor (14 px patches, merge 2)."""
    import transformers as tf

    config = tf.Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=64,
            num_heads=2,
            intermediate_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            **TEXT_CONFIG,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
    processor = tf.Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)
    return _save(model, tokenizer, hf_root / "qwen2_5_vl", processor)


@pytest.fixture(scope="session")
def qwen2_lm_dir(hf_root, tokenizer) -> Path:
    """A tiny ``Qwen2ForCausalLM`` (with LM head); ``AutoModel`` loads its base ``Qwen2Model``."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12)
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TEXT_CONFIG))
    return _save(model, tokenizer, hf_root / "qwen2_lm")


@pytest.fixture(scope="session")
def llama_lm_dir(hf_root, tokenizer) -> Path:
    """A tiny ``LlamaModel`` (a decoder-only LM of another family)."""
    import transformers as tf

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(13)
        model = tf.LlamaModel(tf.LlamaConfig(**TEXT_CONFIG))
    return _save(model, tokenizer, hf_root / "llama_lm")


@pytest.fixture(scope="session")
def sana_dir(hf_root) -> Path:
    """A diffusers-style folder holding the tiny SANA DiT in ``transformer/`` (like the real SANA repos)."""
    from diffusers import SanaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(14)
        model = SanaTransformer2DModel.from_config(preset_dict("tiny")["dit"]["arch"])
    model.save_pretrained(hf_root / "sana" / "transformer")
    return hf_root / "sana"


@pytest.fixture(scope="session")
def dcae_dir(hf_root) -> Path:
    """The tiny DC-AE (8x downsampling, 8 latent channels)."""
    from diffusers import AutoencoderDC

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(15)
        model = AutoencoderDC.from_config(preset_dict("tiny")["vae"]["arch"])
    model.save_pretrained(hf_root / "dcae")
    return hf_root / "dcae"


@pytest.fixture(scope="session")
def component_dirs(internvl_dir, sana_dir, dcae_dir) -> dict[str, Path]:
    return {"vlm": internvl_dir, "dit": sana_dir, "vae": dcae_dir}


@pytest.fixture
def saved_components_config(component_dirs):
    """Factory: the tiny preset with every component loaded BY PATH from saved folders (no arch dicts).

    ``copy_to``: copy the component folders there first (so a test may delete them afterwards).
    """

    def build(overrides: list[str] | None = None, copy_to: Path | None = None) -> ModelConfig:
        dirs = dict(component_dirs)
        if copy_to is not None:
            dirs = {k: Path(shutil.copytree(v, Path(copy_to) / v.name)) for k, v in dirs.items()}
        return tiny_config(
            overrides,
            vlm=dict(path=str(dirs["vlm"]), arch=None),
            dit=dict(path=str(dirs["dit"]), subfolder="transformer", arch=None),
            vae=dict(path=str(dirs["vae"]), arch=None),
        )

    return build


@pytest.fixture(scope="session")
def tiny_model() -> ParaUni:
    """The tiny preset, built once. Read-only: tests that train or perturb build their own with make_tiny."""
    return ParaUni.from_config(tiny_config()).eval()


@pytest.fixture
def make_tiny():
    """Factory: a fresh tiny model with ``section.key=value`` overrides."""

    def build(overrides: list[str] | None = None, **sections) -> ParaUni:
        return ParaUni.from_config(tiny_config(overrides, **sections))

    return build


@pytest.fixture(scope="session")
def paper_meta_model() -> ParaUni:
    """The paper preset's structure on the meta device (no weights)."""
    return ParaUni.from_config(load_model_config("paper"), meta=True)


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory) -> Path:
    """A Stage-0 cache folder holding the quick shapes world's artefacts, trained once per session."""
    from parauni.world.config import WorldConfig
    from parauni.world.pretrain import run_stage0

    cache = tmp_path_factory.mktemp("world_cache")
    run_stage0(WorldConfig().quick(), cache, progress=False, log=lambda *_: None)
    return cache


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random ``CLIPModel`` with the test BPE tokenizer and a 32 px CLIP image processor."""
    import transformers as tf

    eos = tokenizer.eos_token_id
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = tf.CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            projection_dim=16,
            pad_token_id=eos,
            bos_token_id=eos,
            eos_token_id=eos,
        ),
        vision_config=dict(**tower, image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.CLIPModel(config)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tf.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder
