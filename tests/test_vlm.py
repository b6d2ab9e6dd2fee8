"""VLM backbones, loaded offline from tiny random models saved with ``save_pretrained``.

The adapter's per-layer query states must equal what the stock Hugging Face forward gives for the same input
(prompt embeddings + queries, extended mask, positions continuing after each row's last real token), for
InternVL (text and image prompts), Qwen2.5-VL (1-D and 3-D mrope positions) and plain decoder-only LMs.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import NUM_LAYERS, TEXT_CONFIG, WIDTH
from fp32 import assert_close_up_to_order, decoder_additions

from parauni.config import VLMConfig
from parauni.models.components import ComponentLoadError, load_vlm
from parauni.models.vlm import (
    CausalLMBackbone,
    InternVLBackbone,
    PromptBatch,
    Qwen25VLBackbone,
    check_prompts,
)

Q = 6
SHORT, LONG = "a red circle", "a cat sitting on a wooden table next to a green cup and three dogs"


def _additions(seq: int) -> int:
    """The fp32 addition chain of one query state of the tiny decoders over ``seq`` tokens (tests/fp32.py):
    the adapter and the Hugging Face reference run the same layers, but may take other attention kernels
    (masks, sequence lengths), hence other summation orders. About 2,000-2,500 here: 2.1e-5 to 2.4e-5 of the states' scale."""
    return decoder_additions(NUM_LAYERS, WIDTH, TEXT_CONFIG["intermediate_size"], seq)


def _vlm(kind: str, path, **kw):
    return load_vlm(VLMConfig(kind=kind, path=str(path), dtype="float32", max_length=64, **kw))


@pytest.fixture(scope="module")
def internvl(internvl_dir):
    return _vlm("internvl", internvl_dir)


@pytest.fixture(scope="module")
def qwen_vl(qwen_vl_dir):
    return _vlm("qwen2_5_vl", qwen_vl_dir)


def _queries(n: int = Q, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def _images(n: int, size=(64, 64), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _hand_positions(mask: torch.Tensor, q: int) -> torch.Tensor:
    """Positions written out per row: real tokens 0..n-1, queries n..n+q-1, padding 0 (it is masked)."""
    b, s = mask.shape
    pos = torch.zeros(b, s + q, dtype=torch.long)
    for i, n in enumerate(mask.sum(1).tolist()):
        pos[i, :n] = torch.arange(n)
        pos[i, s:] = torch.arange(n, n + q)
    return pos


def _query_slices(out, q: int) -> torch.Tensor:
    assert len(out.hidden_states) == NUM_LAYERS + 1  # embeddings + one per decoder layer
    return torch.stack([h[:, -q:] for h in out.hidden_states[1:]], dim=1)  # (B, L, Q, D)


def _reference_with_embeds(decoder, embeds, mask, queries, position_ids):
    """The stock HF decoder on inputs_embeds = [prompt; queries] with the mask extended by ones."""
    b = embeds.shape[0]
    x = torch.cat([embeds, queries[None].expand(b, -1, -1)], dim=1)
    full_mask = torch.cat([mask, torch.ones(b, len(queries), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        out = decoder(
            inputs_embeds=x,
            attention_mask=full_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
    return _query_slices(out, len(queries))


def _token_queries(vlm, first_id: int = 20):
    """Queries equal to the embeddings of real tokens, so the whole HF model can be called with input_ids."""
    ids = torch.arange(first_id, first_id + Q)
    return ids, vlm.decoder.get_input_embeddings().weight[ids].detach().clone()


def _extend(batch: PromptBatch, query_ids: torch.Tensor):
    b = batch.input_ids.shape[0]
    ids = torch.cat([batch.input_ids, query_ids[None].expand(b, -1)], dim=1)
    mask = torch.cat(
        [batch.attention_mask, torch.ones(b, len(query_ids), dtype=batch.attention_mask.dtype)], 1
    )
    return ids, mask


# ------------------------------------------------------------------------------------------------ prompts


def test_check_prompts():
    assert check_prompts(" a cat ") == ["a cat"]
    assert check_prompts(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="non-empty list"):
        check_prompts([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        check_prompts(["a cat", "   "])
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        check_prompts(["a cat", 7])
    with pytest.raises(TypeError, match="prompt 0 is a NoneType"):
        check_prompts([None])


def test_templates_and_right_padding(internvl):
    texts = internvl.format_prompts([SHORT, None])
    assert texts[0] == internvl.config.template.format(caption=SHORT)
    assert texts[1] == internvl.config.uncond_template
    batch = internvl.encode_prompts([SHORT, LONG])
    n_short, n_long = batch.attention_mask.sum(1).tolist()
    assert n_short < n_long == batch.input_ids.shape[1]
    # right padding: ones then zeros, pad token after the real ones
    assert batch.attention_mask[0, :n_short].all() and not batch.attention_mask[0, n_short:].any()
    assert (batch.input_ids[0, n_short:] == internvl.tokenizer.pad_token_id).all()
    decoded = internvl.tokenizer.decode(batch.input_ids[1, :n_long])
    assert decoded.startswith("<|im_start|>user\nGenerate an image: ") and decoded.endswith(
        "assistant\n<img>"
    )


@pytest.mark.parametrize(
    "caption", [" ".join(["a red circle and a blue square"] * 30), "日本語のテキスト" * 12, "z" * 300]
)
def test_long_prompts_are_truncated_to_max_length_with_a_warning(internvl, caption):
    with pytest.warns(UserWarning, match="longer than vlm.max_length=64"):
        batch = internvl.encode_prompts([caption, SHORT])
    assert batch.input_ids.shape[1] <= 64
    # the template's end survives the truncation
    n = int(batch.attention_mask[0].sum())
    assert internvl.tokenizer.decode(batch.input_ids[0, :n]).endswith(
        "<|im_end|>\n<|im_start|>assistant\n<img>"
    )


def test_short_prompts_are_not_truncated(internvl):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = internvl.format_prompts([LONG])[0]
    assert LONG in text


def test_position_ids_are_cumsum_of_the_extended_mask(internvl):
    batch = PromptBatch(torch.zeros(2, 5, dtype=torch.long), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    expected = torch.tensor([[0, 1, 2, 2, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])
    assert torch.equal(internvl.position_ids(batch, 2), expected)


# ------------------------------------------------------------------------------------------------ InternVL


def test_internvl_loads_from_a_saved_folder(internvl, internvl_dir):
    assert isinstance(internvl, InternVLBackbone)
    assert type(internvl.model).__name__ == "InternVLForConditionalGeneration"
    assert internvl.num_layers == NUM_LAYERS and internvl.hidden_size == WIDTH
    assert not any(p.requires_grad for p in internvl.parameters())
    internvl.train()
    assert not internvl.model.training  # frozen VLM stays in eval mode


def test_internvl_text_states_equal_the_hf_language_model(internvl):
    batch = internvl.encode_prompts([SHORT, LONG])
    queries = _queries()
    with torch.no_grad():
        ours = internvl.query_states(batch, queries)
    assert ours.shape == (2, NUM_LAYERS, Q, WIDTH)
    embeds = internvl.model.get_input_embeddings()(batch.input_ids)
    ref = _reference_with_embeds(
        internvl.model.model.language_model,
        embeds,
        batch.attention_mask,
        queries,
        _hand_positions(batch.attention_mask, Q),
    )
    assert_close_up_to_order(ours, ref, _additions(batch.input_ids.shape[1] + Q))


@pytest.mark.parametrize("with_image", [False, True])
def test_internvl_states_equal_the_full_hf_model_forward(internvl, with_image):
    query_ids, queries = _token_queries(internvl)
    if with_image:
        batch = internvl.encode_prompts([None, None], images=_images(2))
    else:
        batch = internvl.encode_prompts([LONG, SHORT])
    with torch.no_grad():
        ours = internvl.query_states(batch, queries)
        ids, mask = _extend(batch, query_ids)
        out = internvl.model.model(
            input_ids=ids,
            pixel_values=batch.pixel_values,
            attention_mask=mask,
            position_ids=_hand_positions(batch.attention_mask, Q),
            output_hidden_states=True,
            use_cache=False,
        )
    assert_close_up_to_order(ours, _query_slices(out, Q), _additions(ids.shape[1]))


def test_internvl_right_padding_does_not_change_a_rows_states(internvl):
    queries = _queries()
    with torch.no_grad():
        alone = internvl.query_states(internvl.encode_prompts([SHORT]), queries)
        batch = internvl.encode_prompts([SHORT, LONG])
        batched = internvl.query_states(batch, queries)
    assert batch.attention_mask[0].sum() < batch.input_ids.shape[1]  # row 0 really is padded
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # and the prompt matters


def test_internvl_image_features_land_in_the_img_context_slots(internvl):
    images = _images(2)
    batch = internvl.encode_prompts([None, None], images=images)
    cfg = internvl.model.config
    assert batch.pixel_values.shape == (2, 3, 56, 56)
    slots = batch.input_ids == cfg.image_token_id
    assert slots.sum(1).tolist() == [cfg.image_seq_length] * 2
    text = internvl.tokenizer.decode(batch.input_ids[0])
    assert "<img>" + "<IMG_CONTEXT>" * 4 + "</img>" in text and "Keep the image as it is." in text
    with torch.no_grad():
        embeds = internvl.prompt_embeds(batch)
        feats = internvl.model.model.get_image_features(pixel_values=batch.pixel_values).pooler_output
        tokens = internvl.model.get_input_embeddings()(batch.input_ids)
    assert feats.shape == (2, cfg.image_seq_length, WIDTH)
    torch.testing.assert_close(embeds[slots], feats.reshape(-1, WIDTH), atol=0, rtol=0)
    torch.testing.assert_close(embeds[~slots], tokens[~slots], atol=0, rtol=0)
    # different images give different query states
    with torch.no_grad():
        states = internvl.query_states(batch, _queries())
    assert (states[0] - states[1]).abs().max() > 1e-4


def test_internvl_pixels_are_imagenet_normalised(internvl):
    white = torch.ones(1, 3, 30, 40)
    batch = internvl.encode_prompts([None], images=white)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(batch.pixel_values[0, :, 10, 10], expected)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        internvl.encode_prompts([None], images=torch.zeros(1, 1, 8, 8))


def test_queries_get_gradients_through_the_frozen_vlm(internvl):
    queries = _queries().requires_grad_(True)
    internvl.query_states(internvl.encode_prompts([SHORT, LONG]), queries).square().mean().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in internvl.parameters())


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL


def test_qwen_vl_loads_with_its_image_processor(qwen_vl):
    assert isinstance(qwen_vl, Qwen25VLBackbone)
    assert type(qwen_vl.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert qwen_vl.image_processor is not None
    assert qwen_vl.num_layers == NUM_LAYERS and qwen_vl.hidden_size == WIDTH


def test_qwen_vl_text_states_equal_hf(qwen_vl):
    batch = qwen_vl.encode_prompts([SHORT, LONG])
    pos = qwen_vl.position_ids(batch, Q)
    assert pos.shape == (3, 2, batch.input_ids.shape[1] + Q)
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])  # text: the same on the 3 axes
    queries = _queries()
    with torch.no_grad():
        ours = qwen_vl.query_states(batch, queries)
    hand = _hand_positions(batch.attention_mask, Q)[None].expand(3, -1, -1)
    embeds = qwen_vl.model.get_input_embeddings()(batch.input_ids)
    ref = _reference_with_embeds(qwen_vl.decoder, embeds, batch.attention_mask, queries, hand)
    assert_close_up_to_order(ours, ref, _additions(batch.input_ids.shape[1] + Q))
    # and the right-padded row equals the prompt alone
    with torch.no_grad():
        alone = qwen_vl.query_states(qwen_vl.encode_prompts([SHORT]), queries)
    torch.testing.assert_close(ours[:1], alone, atol=1e-5, rtol=0)


def test_qwen_vl_image_states_equal_the_full_hf_forward_with_its_own_mrope(qwen_vl):
    images = _images(2, size=(64, 80), seed=3)
    batch = qwen_vl.encode_prompts([None, None], images=images)
    assert batch.image_grid_thw.tolist() == [[1, 4, 6], [1, 4, 6]]  # 56 x 84 px -> 4 x 6 patches
    image_id = qwen_vl.model.config.image_token_id
    assert (batch.input_ids == image_id).sum(1).tolist() == [6, 6]  # 24 patches / merge 2x2
    pos = qwen_vl.position_ids(batch, Q)
    assert pos.shape == (3, 2, batch.input_ids.shape[1] + Q)
    slots = batch.input_ids[0] == image_id
    assert not torch.equal(pos[1, 0, : len(slots)][slots], pos[2, 0, : len(slots)][slots])  # 2-D image grid
    q_pos = pos[:, :, -Q:]
    assert torch.equal(q_pos[0], q_pos[1]) and torch.equal(q_pos[0], q_pos[2])
    assert torch.equal(q_pos[0, 0], pos[:, 0, :-Q].max() + 1 + torch.arange(Q))

    query_ids, queries = _token_queries(qwen_vl)
    with torch.no_grad():
        ours = qwen_vl.query_states(batch, queries)
        ids, mask = _extend(batch, query_ids)
        out = qwen_vl.model.model(  # positions computed by HF (get_rope_index), not by the adapter
            input_ids=ids,
            attention_mask=mask,
            pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw,
            mm_token_type_ids=(ids == image_id).int(),
            output_hidden_states=True,
            use_cache=False,
        )
    assert_close_up_to_order(ours, _query_slices(out, Q), _additions(ids.shape[1]))
    assert (ours[0] - ours[1]).abs().max() > 1e-4  # the image reaches the queries


def test_qwen_vl_image_features_land_in_the_image_pad_slots(qwen_vl):
    batch = qwen_vl.encode_prompts([None], images=_images(1, seed=4))
    slots = batch.input_ids == qwen_vl.model.config.image_token_id
    with torch.no_grad():
        embeds = qwen_vl.prompt_embeds(batch)
        feats = qwen_vl.model.model.get_image_features(batch.pixel_values, batch.image_grid_thw).pooler_output
    torch.testing.assert_close(embeds[slots], torch.cat(list(feats)), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ causal LM


@pytest.mark.parametrize("which, cls_name", [("qwen2_lm_dir", "Qwen2Model"), ("llama_lm_dir", "LlamaModel")])
def test_causal_lm_backbone(request, which, cls_name):
    vlm = _vlm("causal_lm", request.getfixturevalue(which))
    assert isinstance(vlm, CausalLMBackbone) and type(vlm.model).__name__ == cls_name
    assert vlm.num_layers == NUM_LAYERS and vlm.decoder is vlm.model
    batch = vlm.encode_prompts([SHORT, LONG])
    queries = _queries(seed=1)
    with torch.no_grad():
        ours = vlm.query_states(batch, queries)
        alone = vlm.query_states(vlm.encode_prompts([SHORT]), queries)
    embeds = vlm.model.get_input_embeddings()(batch.input_ids)
    ref = _reference_with_embeds(
        vlm.model, embeds, batch.attention_mask, queries, _hand_positions(batch.attention_mask, Q)
    )
    assert ours.shape == (2, NUM_LAYERS, Q, WIDTH)
    assert_close_up_to_order(ours, ref, _additions(batch.input_ids.shape[1] + Q))
    torch.testing.assert_close(ours[:1], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reads text only"):
        vlm.encode_prompts([None], images=_images(1))


def test_a_folder_that_does_not_exist_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ComponentLoadError, match="no_such_model") as err:
        _vlm("internvl", missing)
    assert "does not exist" in str(err.value)


def test_an_incomplete_folder_is_a_clear_error(tmp_path, internvl_dir):
    (tmp_path / "config.json").write_text((internvl_dir / "config.json").read_text())
    with pytest.raises(ComponentLoadError, match="exists but is incomplete"):
        _vlm("internvl", tmp_path)


@pytest.mark.parametrize("with_image", [False, True])
@pytest.mark.parametrize("name", ["internvl", "qwen_vl"])
def test_training_queries_see_the_prompt_through_its_cache_as_in_one_pass(name, with_image, request):
    """With trainable queries the prompt runs first without a graph, then the queries attend to its cache:
    the states and the queries' gradient equal those of one pass over prompt + queries."""
    vlm = request.getfixturevalue(name)
    batch = (
        vlm.encode_prompts([None, None], images=_images(2, size=(56, 56)))
        if with_image
        else vlm.encode_prompts([LONG, SHORT])
    )
    with torch.no_grad():
        one_pass = vlm.query_states(batch, _queries())  # (B, L, Q, D)
    queries = _queries().requires_grad_(True)
    split = vlm.query_states(batch, queries)
    assert_close_up_to_order(split.detach(), one_pass, _additions(batch.input_ids.shape[1] + Q))
    weights = torch.randn(one_pass.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((split * weights).sum(), queries)
    reference = _queries().requires_grad_(True)
    vlm.causal = False  # the single pass, with a graph (an instance attribute: the fixture is shared)
    try:
        (expected,) = torch.autograd.grad((vlm.query_states(batch, reference) * weights).sum(), reference)
    finally:
        del vlm.causal
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
