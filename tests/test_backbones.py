"""The paper's other bases: each backbone's own prompt format, the ``blip3o`` and ``janus_pro_1b`` presets.

* Prompt formats: InternVL3's chat ending in ``<img>``; Qwen2.5-VL's chat with its own image block and no ``<img>``
  (OpenUni's format by default, BLIP-3o's in the ``blip3o`` preset); Janus-Pro's ``<|User|>: ...`` format.
* The presets build on the meta device with the published sizes (``parauni info``).
* A tiny random model of each preset's transformers class (``Qwen2_5_VLForConditionalGeneration``,
  ``JanusForConditionalGeneration``), saved with ``save_pretrained`` and loaded back offline, gives the same query
  states as the stock Hugging Face forward, trains a Stage-I run and generates (text and image-to-image).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NUM_LAYERS, TEXT_CONFIG, WIDTH, tiny_config
from PIL import Image

from parauni.cli import main
from parauni.config import (
    CONDITIONAL_TEMPLATE,
    PROMPT_FORMATS,
    VLM_KINDS,
    VLMConfig,
    from_dict,
    load_model_config,
    to_dict,
)
from parauni.models.components import JANUS_SPECIAL_TOKENS, load_vlm
from parauni.models.parauni import ParaUni
from parauni.models.tokenizer import BASIC_CORPUS, train_bpe_tokenizer
from parauni.models.vlm import JanusBackbone, Qwen25VLBackbone
from parauni.pipeline import generate
from parauni.training.config import stage_config
from parauni.training.data import FolderSource
from parauni.training.trainer import train

Q = 6
SHORT, LONG = "a red circle", "a cat sitting on a wooden table next to a green cup and three dogs"
BLIP3O_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
BLIP3O_USER = "<|im_start|>user\nPlease generate image based on the following caption: "


# ------------------------------------------------------------------------------------------------ fixtures


# the VQ image generator of the tiny Janus models (ParaUni reads Janus's understanding path only)
JANUS_VQ = dict(
    embed_dim=8,
    num_embeddings=64,
    latent_channels=32,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    projection_dim=WIDTH,
    image_token_embed_dim=WIDTH,
)


@pytest.fixture(scope="module")
def janus_dir(hf_root) -> Path:
    """A tiny ``JanusForConditionalGeneration`` (32 px, patch 16 -> 4 image tokens) with Janus's special tokens."""
    import transformers as tf

    tok = train_bpe_tokenizer(BASIC_CORPUS, vocab_size=512, special_tokens=JANUS_SPECIAL_TOKENS)
    config = tf.JanusConfig(
        text_config=dict(model_type="llama", **TEXT_CONFIG),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            mlp_ratio=2.0,
            projection_dim=WIDTH,
            num_image_tokens=4,
        ),
        vq_config=JANUS_VQ,
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16)
        model = tf.JanusForConditionalGeneration(config)
    folder = hf_root / "janus"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tf.JanusImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def janus(janus_dir) -> JanusBackbone:
    return load_vlm(VLMConfig(kind="janus", path=str(janus_dir), dtype="float32", max_length=64))


def _blip3o_vlm(path) -> dict:
    """The blip3o preset's VLM section (its prompt format) pointed at a tiny saved Qwen2.5-VL."""
    vlm = {k: v for k, v in to_dict(load_model_config("blip3o").vlm).items() if k != "arch"}
    return {**vlm, "path": str(path), "dtype": "float32"}  # max_length 128: the tiny BPE spends many tokens


def _queries(n: int = Q, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def _images(n: int, size=(40, 48), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hand_positions(mask: torch.Tensor, q: int) -> torch.Tensor:
    """Real tokens 0..n-1, queries n..n+q-1, padding 0 (masked), per row."""
    b, s = mask.shape
    pos = torch.zeros(b, s + q, dtype=torch.long)
    for i, n in enumerate(mask.sum(1).tolist()):
        pos[i, :n] = torch.arange(n)
        pos[i, s:] = torch.arange(n, n + q)
    return pos


def _decoded(vlm, batch, row: int = 0) -> str:
    n = int(batch.attention_mask[row].sum())
    return vlm.tokenizer.decode(batch.input_ids[row, :n])


# ------------------------------------------------------------------------------------------------ formats


def test_each_kind_reads_prompts_in_its_own_format():
    assert set(PROMPT_FORMATS) == set(VLM_KINDS)
    internvl = VLMConfig(kind="internvl")
    assert internvl.template == CONDITIONAL_TEMPLATE and internvl.template.endswith("assistant\n<img>")
    qwen = VLMConfig(kind="qwen2_5_vl", path="x")
    for text in (qwen.template, qwen.uncond_template, qwen.image_template):
        assert "<img>" not in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.template.format(caption=SHORT) == (
        "<|im_start|>user\nGenerate an image: a red circle<|im_end|>\n<|im_start|>assistant\n"
    )
    janus = VLMConfig(kind="janus", path="x")
    assert janus.template.format(caption=SHORT) == "<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>"
    assert janus.uncond_template == "<|User|>: \n\n<|Assistant|>:<begin_of_image>"
    # an explicit template wins, and a saved config keeps its templates whatever the kind's default
    mine = VLMConfig(kind="qwen2_5_vl", path="x", template="<|im_start|>user\n{caption}<|im_end|>\n")
    assert (
        mine.template == "<|im_start|>user\n{caption}<|im_end|>\n"
        and mine.uncond_template == qwen.uncond_template
    )
    assert from_dict(VLMConfig, to_dict(mine)) == mine


def test_qwen_vl_prompts_use_qwens_chat_and_image_block(qwen_vl_dir):
    vlm = load_vlm(VLMConfig(kind="qwen2_5_vl", path=str(qwen_vl_dir), dtype="float32", max_length=64))
    batch = vlm.encode_prompts([SHORT, None])
    assert _decoded(vlm, batch, 0) == vlm.config.template.format(caption=SHORT)
    assert (
        _decoded(vlm, batch, 1) == "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
    )
    image_batch = vlm.encode_prompts([None], images=_images(1, size=(56, 56)))
    n = int((image_batch.input_ids == vlm.model.config.image_token_id).sum())  # 4 x 4 patches / merge 2 x 2
    assert n == 4
    assert _decoded(vlm, image_batch) == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>Keep the image as it is."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_blip3o_prompt_format_on_a_qwen_vl(qwen_vl_dir):
    vlm = load_vlm(VLMConfig(**_blip3o_vlm(qwen_vl_dir)))
    assert isinstance(vlm, Qwen25VLBackbone)
    batch = vlm.encode_prompts([SHORT, None])
    expected = BLIP3O_SYSTEM + BLIP3O_USER + SHORT + "<|im_end|>\n<|im_start|>assistant\n"
    assert _decoded(vlm, batch, 0) == expected
    assert _decoded(vlm, batch, 1) == BLIP3O_SYSTEM + "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    im_start = vlm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert int((batch.input_ids[0] == im_start).sum()) == 3  # the chat markers are single special tokens
    text = _decoded(vlm, vlm.encode_prompts([None], images=_images(1, size=(56, 56))))
    assert text.startswith(BLIP3O_SYSTEM + "<|im_start|>user\n<|vision_start|>")
    assert text.endswith(
        "<|vision_end|>\nPlease reconstruct the given image.<|im_end|>\n<|im_start|>assistant\n"
    )


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    "preset, cls_name, layers, vlm_params",
    [
        ("blip3o", "Qwen2_5_VLForConditionalGeneration", 36, (3.70e9, 3.80e9)),
        ("janus_pro_1b", "JanusForConditionalGeneration", 24, (2.0e9, 2.15e9)),
    ],
)
def test_presets_build_on_meta_with_the_published_sizes(preset, cls_name, layers, vlm_params):
    model = ParaUni.from_config(load_model_config(preset), meta=True)
    assert all(p.is_meta for p in model.parameters())
    assert type(model.vlm.model).__name__ == cls_name
    assert model.vlm.num_layers == layers and model.vlm.hidden_size == 2048
    assert model.lim.layers == list(range(layers)) and model.queries.shape == (256, 2048)
    counts = model.parameter_counts()
    assert vlm_params[0] < counts["vlm"]["frozen"] < vlm_params[1], counts["vlm"]
    assert 1.59e9 < counts["dit"]["frozen"] < 1.61e9  # the paper preset's SANA-1.5 1.6B
    assert model.dit.config.caption_channels == 2304 and model.latent_factor == 32
    assert model.lim.connector_in.weight.shape == (1536, 2048)  # 2048 -> OpenUni-L's 1536-wide connector
    if preset == "janus_pro_1b":
        vc = model.vlm.model.config.vision_config
        assert (vc.image_size // vc.patch_size) ** 2 == vc.num_image_tokens == 576
        assert model.vlm.model.lm_head.weight is not model.vlm.decoder.embed_tokens.weight
    else:
        assert model.vlm.model.config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
        assert model.vlm.config.template.startswith(BLIP3O_SYSTEM + BLIP3O_USER)


def test_parauni_info_prints_the_janus_preset(capsys):
    assert main(["info", "janus_pro_1b"]) == 0
    out = capsys.readouterr().out
    assert "janus: deepseek-community/Janus-Pro-1B; 24 decoder layers, width 2048" in out
    assert "structure on the meta device" in out


# ------------------------------------------------------------------------------------------------ Janus


def test_janus_loads_offline_from_a_saved_folder(janus):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert type(janus.model).__name__ == "JanusForConditionalGeneration"
    assert type(janus.decoder).__name__ == "LlamaModel"
    assert janus.num_layers == NUM_LAYERS and janus.hidden_size == WIDTH and janus.num_image_tokens == 4
    assert janus.image_processor is not None
    assert not any(p.requires_grad for p in janus.parameters())


def test_janus_text_prompts_and_states_equal_the_hf_decoder(janus):
    batch = janus.encode_prompts([SHORT, LONG])
    assert _decoded(janus, batch, 0) == "<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>"
    boi = janus.tokenizer.convert_tokens_to_ids("<begin_of_image>")
    assert batch.input_ids[1, -1] == boi  # the queries follow Janus's image-start tag
    queries = _queries()
    with torch.no_grad():
        ours = janus.query_states(batch, queries)
        alone = janus.query_states(janus.encode_prompts([SHORT]), queries)
        b = len(batch.input_ids)
        embeds = janus.decoder.get_input_embeddings()(batch.input_ids)
        out = janus.decoder(
            inputs_embeds=torch.cat([embeds, queries[None].expand(b, -1, -1)], 1),
            attention_mask=torch.cat([batch.attention_mask, torch.ones(b, Q, dtype=torch.long)], 1),
            position_ids=_hand_positions(batch.attention_mask, Q),
            output_hidden_states=True,
            use_cache=False,
        )
    ref = torch.stack([h[:, -Q:] for h in out.hidden_states[1:]], dim=1)
    assert ours.shape == (2, NUM_LAYERS, Q, WIDTH)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[:1], alone, atol=1e-5, rtol=0)  # right padding changes nothing


def test_janus_training_queries_read_the_prompt_cache_as_one_pass(janus):
    """Trainable queries: the prompt's cache, then the queries with a graph; the same states as one pass."""
    batch = janus.encode_prompts([SHORT, LONG])
    with torch.no_grad():
        one_pass = janus.query_states(batch, _queries())
    queries = _queries().requires_grad_(True)
    split = janus.query_states(batch, queries)
    torch.testing.assert_close(split.detach(), one_pass, atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(split.square().sum(), queries)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_janus_image_prompts_equal_the_full_hf_forward(janus):
    batch = janus.encode_prompts([None, None], images=_images(2))
    cfg = janus.model.config
    assert batch.pixel_values.shape == (2, 3, 32, 32)
    assert (batch.input_ids == cfg.image_token_id).sum(1).tolist() == [4, 4]
    assert _decoded(janus, batch) == (
        "<|User|>: <begin_of_image>" + "<image_placeholder>" * 4 + "<end_of_image>\nKeep the image as it is."
        "\n\n<|Assistant|>:<begin_of_image>"
    )
    query_ids = torch.arange(
        20, 20 + Q
    )  # queries equal to real token embeddings: the HF model takes input_ids
    queries = janus.decoder.get_input_embeddings().weight[query_ids].detach().clone()
    with torch.no_grad():
        ours = janus.query_states(batch, queries)
        slots = batch.input_ids == cfg.image_token_id
        feats = janus.model.model.get_image_features(pixel_values=batch.pixel_values).pooler_output
        torch.testing.assert_close(
            janus.prompt_embeds(batch)[slots], feats.reshape(-1, WIDTH), atol=0, rtol=0
        )
        ids = torch.cat([batch.input_ids, query_ids[None].expand(2, -1)], 1)
        out = janus.model.model(
            input_ids=ids,
            pixel_values=batch.pixel_values,
            attention_mask=torch.ones_like(ids),
            output_hidden_states=True,
            use_cache=False,
        )
    ref = torch.stack([h[:, -Q:] for h in out.hidden_states[1:]], dim=1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-4  # the image reaches the queries


def test_janus_built_from_an_arch_dict_gets_its_tokens_and_image_processor():
    arch = dict(
        text_config=dict(model_type="llama", **TEXT_CONFIG),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            projection_dim=WIDTH,
            num_image_tokens=4,
        ),
        vq_config=JANUS_VQ,
        tie_word_embeddings=False,
    )
    vlm = load_vlm(VLMConfig(kind="janus", path=None, arch=arch, dtype="float32"))
    assert vlm.tokenizer.convert_ids_to_tokens(vlm.model.config.image_token_id) == "<image_placeholder>"
    batch = vlm.encode_prompts([None], images=_images(1))
    assert int((batch.input_ids == vlm.model.config.image_token_id).sum()) == 4
    with torch.no_grad():
        assert vlm.query_states(batch, _queries()).shape == (1, NUM_LAYERS, Q, WIDTH)
    vlm.image_processor = None
    with pytest.raises(ValueError, match="without an image processor"):
        vlm.encode_prompts([None], images=_images(1))


# ------------------------------------------------------------------------------------------------ end to end


def _image_folder(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": f"a photo of a red circle number {i}"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "janus"])
def test_stage1_step_and_generation_offline(kind, request, tmp_path):
    """The tiny model of each preset's class: a Stage-I run, the saved folder reloads, text and image generate."""
    if kind == "janus":
        vlm = dict(kind="janus", path=str(request.getfixturevalue("janus_dir")), arch=None)
    else:
        vlm = {**_blip3o_vlm(request.getfixturevalue("qwen_vl_dir")), "arch": None}
    model = ParaUni.from_config(tiny_config(vlm=vlm))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    source = FolderSource(
        _image_folder(tmp_path / "data"), 64, encode=model.encode_images, cache_key=kind, progress=False
    )
    cfg = stage_config(1, {"steps": 2, "batch_size": 2, "warmup": 1, "save_every": 2, "image_size": 64})
    result = train(model, source, cfg, tmp_path / "run", progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "queries" in changed and any(n.startswith("lim.") for n in changed)
    assert not any(n.startswith(("vlm.", "dit.", "vae.")) for n in changed)

    loaded = ParaUni.from_pretrained(result.model_dir).eval()
    assert loaded.config.vlm.template == model.config.vlm.template  # the format travels with the model
    torch.testing.assert_close(loaded.queries, model.queries)
    kw = dict(steps=2, height=32, width=32, progress=False)
    texts = generate(loaded, ["a red circle", "a blue square"], **kw)
    assert texts.shape == (2, 3, 32, 32) and torch.isfinite(texts).all()
    images = generate(loaded, None, _images(2, size=(64, 64)), **kw)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
