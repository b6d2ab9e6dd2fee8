"""The shared CLIP helper's preprocessing and text pooling, and the world's reward models: hard negatives,
the contrastive loss, degradations, and the aesthetic MLP's ranking after a short training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parauni.scoring.clip import CLIPEmbedder, RewardModelError
from parauni.world.captions import (
    WorldStream,
    all_metadata,
    color_attr_row,
    position_row,
)
from parauni.world.config import WorldConfig
from parauni.world.pretrain import world_tokenizer
from parauni.world.reward_models import (
    DEGRADATIONS,
    _images,
    clip_loss,
    degrade,
    hard_negative,
    load_world_clip,
    train_world_aesthetic,
    train_world_clip,
    world_clip,
    world_clip_embedder,
)


@pytest.fixture(scope="module")
def cfg() -> WorldConfig:
    c = WorldConfig().quick()
    c.reward.aesthetic_train.steps, c.reward.aesthetic_train.batch_size = 40, 16
    return c


@pytest.fixture(scope="module")
def world_tok(cfg):
    return world_tokenizer(cfg)


@pytest.fixture(scope="module")
def trained(cfg, world_tok):
    """The quick world CLIP after its few steps, and the aesthetic MLP trained for 40 steps on it."""
    clip = world_clip(cfg, world_tok)
    clip_metrics = train_world_clip(clip, world_tok, cfg, progress=False)
    mlp, aesthetic_metrics = train_world_aesthetic(clip, cfg, progress=False)
    return clip, clip_metrics, mlp, aesthetic_metrics


def _clip_tokenizer():
    """A tiny CLIPTokenizer (byte-level characters only) that adds <|startoftext|> / <|endoftext|> itself."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    return CLIPTokenizer(vocab=vocab, merges=[])


# ------------------------------------------------------------------------------------------- CLIP helper


def test_world_captions_end_in_the_pooled_eos_token(cfg, world_tok):
    embedder = world_clip_embedder(world_clip(cfg, world_tok), world_tok, cfg)
    assert not embedder.tokenizer_adds_eos  # the world BPE does not add it: the embedder appends it
    captions = ["a photo of a red circle", WorldStream(0, 32).example(3)["caption"]]
    enc = embedder.tokenize(captions)
    last = enc["attention_mask"].sum(1) - 1
    eos = world_tok.eos_token_id
    assert embedder.model.config.text_config.eos_token_id == eos
    assert (enc["input_ids"][torch.arange(2), last] == eos).all()
    # transformers pools at the first eos: the end of the caption, not a pad or an earlier token.
    assert [int(row.tolist().index(eos)) for row in enc["input_ids"]] == last.tolist()
    embedder.max_length = 4
    assert (embedder.tokenize(captions)["input_ids"][:, -1] == eos).all(), "truncated rows still end in eos"


def test_clip_tokenizers_that_add_eos_are_used_as_they_are(cfg, world_tok):
    tok = _clip_tokenizer()
    model = world_clip(cfg, world_tok)
    model.config.text_config.eos_token_id = 2  # the legacy CLIP config: argmax pooling, any eos id
    embedder = CLIPEmbedder(model, tok, resize=32, crop=(32, 32))
    assert embedder.tokenizer_adds_eos
    enc = embedder.tokenize(["a cat", "a long caption about dogs"])
    ids = tok("a cat").input_ids
    assert enc["input_ids"][0, : len(ids)].tolist() == ids and ids[-1] == tok.eos_token_id
    model.config.text_config.eos_token_id = 7
    with pytest.raises(ValueError, match="pools at token id 7"):
        CLIPEmbedder(model, tok, resize=32, crop=(32, 32))


def test_text_chunks_sorted_by_length_give_the_same_embeddings(cfg, world_tok):
    embedder = world_clip_embedder(world_clip(cfg, world_tok), world_tok, cfg)
    captions = [e["caption"] for e in WorldStream(1, 32).batch(0, 12)]
    with torch.no_grad():
        torch.testing.assert_close(
            embedder.embed_texts(captions, chunk=3), embedder.embed_texts(captions, chunk=100)
        )


def test_preprocessing_matches_the_clip_image_processor(cfg, world_tok):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
    embedder = CLIPEmbedder.from_image_processor(world_clip(cfg, world_tok), None, processor)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = embedder.preprocess(x)
    reference = torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"]))
    assert ours.shape == reference.shape == (1, 3, 20, 20)
    # PIL's bicubic vs torch's antialiased bicubic and uint8 rounding: close, not bitwise equal.
    assert (ours - reference).abs().mean() < 0.05


def test_missing_world_clip_names_the_folder_and_stage0(tmp_path):
    with pytest.raises(RewardModelError, match="Stage 0"):
        load_world_clip(tmp_path / "stage0-x")


def test_world_clip_rejects_a_tokenizer_it_cannot_pool(cfg, world_tok):
    class Tok:
        eos_token_id, pad_token_id = 2, 2

        def __len__(self) -> int:
            return 10

    with pytest.raises(ValueError, match="eos"):
        world_clip(cfg, Tok())


# ------------------------------------------------------------------------------------------- world CLIP


@pytest.mark.parametrize(
    "tag", ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
)
def test_hard_negatives_change_one_detail(tag):
    rng = np.random.default_rng(0)
    for row in all_metadata(tag)[:20]:
        negative = hard_negative(row, rng)
        assert negative is not None and negative != row["prompt"]
    assert hard_negative({"tag": "dense", "include": [], "prompt": "x"}, rng) is None


def test_hard_negatives_swap_colours_and_flip_relations():
    rng = np.random.default_rng(0)
    row = color_attr_row("circle", "red", "square", "blue")
    assert hard_negative(row, rng) == "a photo of a blue circle and a red square"
    assert (
        hard_negative(position_row("circle", "left of", "square"), rng)
        == "a photo of a circle right of a square"
    )


def test_clip_loss_counts_identical_captions_as_positives(cfg, world_tok):
    embedder = world_clip_embedder(world_clip(cfg, world_tok), world_tok, cfg)
    items = WorldStream(2, 32).batch(0, 4)
    doubled = items + items  # every caption twice: the loss must not push copies apart
    loss, accuracy = clip_loss(embedder, doubled, np.random.default_rng(0))
    assert torch.isfinite(loss) and 0 <= float(accuracy) <= 1
    loss.backward()
    assert embedder.model.logit_scale.grad is not None


def test_world_clip_training_reports_heldout_metrics(trained):
    _, metrics, _, _ = trained
    assert len(metrics["curve"]) == 3
    assert 0 <= metrics["heldout_retrieval_top1"] <= 1 and 0 <= metrics["heldout_hard_negative_accuracy"] <= 1
    assert set(metrics["heldout_hard_negative_accuracy_by_tag"]) <= set(
        ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    )


# ------------------------------------------------------------------------------------------- aesthetic


def test_degradations_keep_the_shape_and_range_and_strength_zero_is_identity():
    x = _images(WorldStream(3, 32).batch(0, 6))
    g = torch.Generator().manual_seed(0)
    kinds = list(DEGRADATIONS) * 2
    assert torch.equal(degrade(x, kinds, torch.zeros(6), g), x)
    y = degrade(x, kinds, torch.ones(6), g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert all(not torch.equal(y[i], x[i]) for i in range(6))
    with pytest.raises(ValueError, match="unknown degradations"):
        degrade(x[:1], ["sepia"], torch.ones(1), g)
    with pytest.raises(ValueError, match="one kind and one strength"):
        degrade(x, ["blur"], torch.ones(6), g)


def test_world_aesthetic_ranks_clean_renders_above_heavily_noised_ones(cfg, world_tok, trained):
    clip, _, mlp, metrics = trained
    assert 0 <= metrics["heldout_ranking_accuracy"] <= 1 and set(
        metrics["heldout_ranking_accuracy_by_kind"]
    ) == set(DEGRADATIONS)
    embedder = world_clip_embedder(clip, world_tok, cfg)
    clean = _images(WorldStream(4, 32).batch(0, 32))
    noised = degrade(clean, ["noise"] * 32, torch.ones(32), torch.Generator().manual_seed(1))
    with torch.no_grad():
        wins = mlp(embedder.embed_images(clean)) > mlp(embedder.embed_images(noised))
    assert wins.float().mean() >= 0.9
