"""GenEval's real detector: mmdet's Mask2Former post-processing on hand-built logits, the CLIP colour
classifier on masked crops, and `parauni eval geneval-score --detector mask2former` end to end on tiny random
models saved with ``save_pretrained`` and loaded back offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.eval.geneval_mask2former import (
    CROP_BACKGROUND,
    GENEVAL_OBJECTS,
    CLIPColorClassifier,
    ImageDetection,
    Mask2FormerDetector,
    geneval_object_name,
    keep_ratio_size,
    mask2former_instances,
    masks_to_boxes,
)
from parauni.scoring.clip import RewardModelError
from parauni.scoring.geneval_rules import GENEVAL_COLORS
from parauni.world.captions import colors_row, single_object_row

OBJECT_NAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "object_names.txt"
LABELS = ["dog", "cat", "mouse"]  # COCO spelling: "mouse" is GenEval's "computer mouse"


def _sigmoid(x: float) -> float:
    return 1 / (1 + np.exp(-x))


# ------------------------------------------------------------------------------------------ names, sizes


def test_geneval_objects_are_object_names_txt_and_coco_names_map_onto_them():
    if OBJECT_NAMES.is_file():
        assert GENEVAL_OBJECTS == tuple(OBJECT_NAMES.read_text().split("\n")[:80])
    assert len(GENEVAL_OBJECTS) == 80
    assert geneval_object_name("mouse") == "computer mouse"
    assert geneval_object_name("remote") == "tv remote"
    assert geneval_object_name("keyboard") == "computer keyboard"
    assert geneval_object_name("dining table") == "dining table"
    with pytest.raises(ValueError, match="'wall' is not a GenEval object name"):
        geneval_object_name("wall")


def test_keep_ratio_size_is_mmdets_1333x800():
    assert keep_ratio_size(512, 512) == (800, 800)
    assert keep_ratio_size(480, 640) == (800, 1067)  # 640 * 800 / 480 = 1066.7, rounded half up
    assert keep_ratio_size(100, 1000) == (133, 1333)  # the long side binds
    assert keep_ratio_size(1024, 768) == (1067, 800)


def test_masks_to_boxes_are_tight_with_exclusive_ends_and_zero_for_empty_masks():
    masks = torch.zeros(2, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[0, 4, 0] = True
    torch.testing.assert_close(masks_to_boxes(masks), torch.tensor([[0.0, 1, 5, 5], [0, 0, 0, 0]]))


# ---------------------------------------------------------------------------------------- post-processing


def _synthetic_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two queries, two classes + no-object; class logits are log-probabilities (softmax gives them back).

    Query 0's mask logits (4 x 4) step from -2 (columns 0-1) to +2 (columns 2-3); query 1's are +1 everywhere.
    """
    probs = torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]]])  # (1, Q=2, K+1=3)
    masks = torch.ones(1, 2, 4, 4)
    masks[0, 0, :, :2], masks[0, 0, :, 2:] = -2.0, 2.0
    return probs.log(), masks


def test_postprocessing_matches_hand_computed_scores_boxes_and_labels():
    class_logits, mask_logits = _synthetic_outputs()
    # Model input 8 x 8 of which the image, resized to 8 x 6, fills the left part; the original is 16 x 12.
    (inst,) = mask2former_instances(class_logits, mask_logits, (8, 8), [(8, 6)], [(16, 12)], top_k=3)
    # Query 0's columns: upsampled 2x to the input [-2, -2, -2, -1, 1, 2, 2, 2], cropped to 6 columns, then
    # 2x again: [-2, -2, -2, -2, -2, -1.75, -1.25, -0.5, 0.5, 1.25, 1.75, 2] -> mask = columns 8..11.
    m0 = np.mean([_sigmoid(v) for v in (0.5, 1.25, 1.75, 2.0)])
    m1 = _sigmoid(1.0)
    # Top 3 of the (query, class) probabilities 0.6, 0.3, 0.2, 0.1 drop (query 1, class 1).
    torch.testing.assert_close(inst.scores, torch.tensor([0.6 * m0, 0.3 * m0, 0.2 * m1]).float())
    assert inst.labels.tolist() == [0, 1, 0]
    torch.testing.assert_close(inst.boxes, torch.tensor([[8.0, 0, 12, 16], [8, 0, 12, 16], [0, 0, 12, 16]]))
    assert inst.masks.shape == (3, 16, 12) and inst.masks.dtype == torch.bool
    assert inst.masks[0].sum() == 16 * 4 and inst.masks[0][:, 8:].all()
    assert inst.masks[2].all()


def test_postprocessing_without_the_crop_would_differ_and_empty_masks_score_zero():
    class_logits, mask_logits = _synthetic_outputs()
    # No padding: all 8 input columns are the image, so the +2 columns of the padding are not cut away.
    (uncropped,) = mask2former_instances(class_logits, mask_logits, (8, 8), [(8, 8)], [(16, 12)], top_k=3)
    assert uncropped.boxes[0, 0] != 8.0
    mask_logits[0, 0] = -1.0  # query 0 now has an empty mask
    (inst,) = mask2former_instances(class_logits, mask_logits, (8, 8), [(8, 6)], [(16, 12)])
    assert len(inst.scores) == 4  # top_k 100 > Q * K = 4 pairs
    torch.testing.assert_close(inst.scores[2:], torch.zeros(2))  # query 0's two pairs, last
    torch.testing.assert_close(inst.boxes[2:], torch.zeros(2, 4))
    torch.testing.assert_close(inst.scores[:2], torch.tensor([0.2, 0.1]) * _sigmoid(1.0))


def test_postprocessing_handles_a_batch_with_per_image_sizes():
    class_logits, mask_logits = _synthetic_outputs()
    batch = mask2former_instances(
        class_logits.repeat(2, 1, 1),
        mask_logits.repeat(2, 1, 1, 1),
        (8, 8),
        [(8, 6), (8, 8)],
        [(16, 12), (8, 8)],
    )
    assert [tuple(inst.masks.shape[1:]) for inst in batch] == [(16, 12), (8, 8)]
    (single,) = mask2former_instances(class_logits, mask_logits, (8, 8), [(8, 6)], [(16, 12)])
    torch.testing.assert_close(batch[0].scores, single.scores)
    torch.testing.assert_close(batch[0].boxes, single.boxes)
    assert not torch.equal(batch[1].scores, single.scores)  # image 1 is not cropped: other mask scores
    with pytest.raises(ValueError, match="2 images of outputs but 1 resized sizes"):
        mask2former_instances(
            class_logits.repeat(2, 1, 1), mask_logits.repeat(2, 1, 1, 1), (8, 8), [(8, 6)], [(8, 8)]
        )


# ---------------------------------------------------------------------------------------- colour classifier


class _PixelCountEmbedder:
    """A stand-in CLIP: text -> one-hot of the prompt's colour; image -> one-hot of the colour of the most
    pixels among pure red / blue (the grey background counts for nothing)."""

    palette = {"red": (255, 0, 0), "blue": (0, 0, 255)}

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        words = [p.split()[4].split("-")[0] for p in prompts]  # "a photo of a {c}..."
        return torch.nn.functional.one_hot(torch.tensor([GENEVAL_COLORS.index(w) for w in words]), 10).float()

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        pixels = ((x[0] + 1) * 127.5).round().permute(1, 2, 0)  # (h, w, 3)
        counts = {c: int((pixels == torch.tensor(rgb)).all(-1).sum()) for c, rgb in self.palette.items()}
        return torch.nn.functional.one_hot(
            torch.tensor(GENEVAL_COLORS.index(max(counts, key=counts.get))), 10
        )[None].float()


def _red_square_on_blue() -> tuple[np.ndarray, ImageDetection]:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[..., 2] = 255  # blue
    image[6:10, 6:10] = (255, 0, 0)  # a 4 x 4 red square
    mask = np.zeros((20, 20), dtype=bool)
    mask[6:10, 6:10] = True
    # The box is loose (8 x 8 around the square): 48 of its 64 pixels are outside the mask.
    return image, ImageDetection("dog", 0.9, (3.6, 3.6, 11.5, 11.5), mask, image=image)


def test_colour_comes_from_the_masked_crop_with_grey_outside_the_mask():
    image, det = _red_square_on_blue()
    classifier = CLIPColorClassifier(_PixelCountEmbedder())
    crop = classifier.crop(det)
    assert crop.shape == (8, 8, 3)  # the box rounded to (4, 4, 12, 12)
    assert (crop[2:6, 2:6] == (255, 0, 0)).all()
    assert (crop[0] == CROP_BACKGROUND).all()
    assert classifier([det], "dog") == ["red"]  # without the mask the blue surround would win
    unmasked = ImageDetection("dog", 0.9, det.box, np.ones((20, 20), dtype=bool), image=image)
    assert classifier([det, unmasked], "dog") == ["red", "blue"]
    assert classifier([], "dog") == []
    with pytest.raises(ValueError, match="no source image or mask"):
        classifier([ImageDetection("dog", 0.9, det.box, det.mask)], "dog")


def test_tiny_clip_names_one_of_the_ten_colours_per_detection_from_averaged_templates(clip_dir):
    classifier = CLIPColorClassifier.from_pretrained(clip_dir, device="cpu")
    image, det = _red_square_on_blue()
    other = ImageDetection("dog", 0.8, (0.0, 0.0, 20.0, 20.0), np.ones((20, 20), dtype=bool), image=image)
    colors = classifier([det, other], "dog")
    assert len(colors) == 2 and set(colors) <= set(GENEVAL_COLORS)

    # The text classifier is the normalised mean of the three normalised template embeddings, per colour.
    text = classifier.text_classifier("dog")
    assert text.shape == (10, 16)
    red = classifier.embedder.embed_texts(
        ["a photo of a red dog", "a photo of a red-colored dog", "a photo of a red object"]
    )
    torch.testing.assert_close(text[0], torch.nn.functional.normalize(red.mean(0), dim=0))
    crop = torch.from_numpy(classifier.crop(det)).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = (classifier.embedder.embed_images(crop) @ text.T).argmax().item()
    assert colors[0] == GENEVAL_COLORS[expected]


def test_a_missing_clip_folder_names_the_component_and_the_repo(tmp_path):
    with pytest.raises(
        RewardModelError, match=r"GenEval colour classifier.*does not exist.*clip-vit-large-patch14"
    ):
        CLIPColorClassifier.from_pretrained(tmp_path / "no-clip")


# ------------------------------------------------------------------------------------------ detector


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory) -> Path:
    """A tiny random Mask2Former (Swin of width 8, 5 queries) over LABELS whose class head always says
    "mouse", with a Mask2Former image processor, saved with save_pretrained."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessorPil,
        SwinConfig,
    )

    stages = ["stage1", "stage2", "stage3", "stage4"]
    config = Mask2FormerConfig(
        backbone_config=SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, out_features=stages
        ),
        feature_size=32,  # the pixel decoder's GroupNorm(32, ...) needs multiples of 32
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=5,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # every query: p(mouse) = 1 - 1e-8, so a detection's score is its mask score
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.copy_(torch.tensor([-10.0, -10.0, 10.0, -10.0]))
    folder = tmp_path_factory.mktemp("mask2former")
    model.save_pretrained(folder)
    Mask2FormerImageProcessorPil().save_pretrained(folder)
    return folder


def test_detector_reloads_offline_pads_to_32_and_returns_geneval_named_detections(mask2former_dir):
    detector = Mask2FormerDetector.from_pretrained(mask2former_dir, device="cpu")
    assert detector.labels == ["dog", "cat", "computer mouse"]
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pixels, resized = detector.preprocess(image)
    assert resized == (800, 1067) and pixels.shape == (1, 3, 800, 1088)
    assert pixels[..., 1067:].abs().max() == 0  # zero padding on the right
    dets = detector(image)
    assert len(dets) == 5 * 3  # top 100 of 5 queries x 3 classes
    mice = [d for d in dets if d.label == "computer mouse"]
    assert len(mice) == 5 and all(d.image is image for d in dets)
    for d in mice:
        assert d.mask.shape == (48, 64) and d.mask.dtype == bool
        if d.mask.any():
            ys, xs = np.nonzero(d.mask)
            assert d.box == (xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0)
            assert 0.5 < d.score <= 1.0  # class probability ~1 x mean sigmoid over positive logits
    assert all(d.score < 1e-6 for d in dets if d.label != "computer mouse")


def _write_layout(out: Path, rows: list[dict], image: np.ndarray) -> None:
    for i, row in enumerate(rows):
        (out / f"{i:05d}" / "samples").mkdir(parents=True)
        Image.fromarray(image).save(out / f"{i:05d}" / "samples" / "0000.png")
        (out / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(row) + "\n")


def test_cli_scores_a_geneval_folder_with_mask2former_and_clip(mask2former_dir, clip_dir, tmp_path, capsys):
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    rows = [
        single_object_row("computer mouse"),
        single_object_row("dog"),
        colors_row("computer mouse", "red"),
    ]
    _write_layout(tmp_path / "images", rows, image)
    out = tmp_path / "scores" / "results.jsonl"
    args = ["eval", "geneval-score", "--images", str(tmp_path / "images"), "--out", str(out), "--quiet"]
    args += ["--detector", "mask2former", "--detector-model", str(mask2former_dir), "--clip", str(clip_dir)]
    assert main(args) == 0
    assert "overall" in capsys.readouterr().out
    results = [json.loads(line) for line in out.read_text().splitlines()]
    mouse, dog, colored = results
    assert mouse["correct"] and mouse["reason"] == ""
    assert not dog["correct"] and dog["reason"] == "expected dog>=1, found 0"
    kept = mouse["detections"]["computer mouse"]
    assert 1 <= len(kept) <= 5 and all(d["score"] > 0.5 for d in kept)
    # The colour clause asked the tiny CLIP: right or wrong, it named one of the ten colours.
    assert colored["correct"] or "expected red computer mouse>=1, found 0 red; and 1 " in colored["reason"]
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["tags"]["single_object"] == 0.5


@pytest.mark.parametrize(
    "extra, messages",
    [
        (
            ["--detector-model", "{tmp}/none"],
            [
                "GenEval detector (Mask2Former): local folder",
                "none does not exist",
                "hf download facebook/mask2",
            ],
        ),
        (
            ["--detector-model", "nobody/not-cached"],
            [
                "could not load the GenEval detector (Mask2Former) from 'nobody/not-cached'",
                "neither a local folder nor in the Hugging Face cache",
            ],
        ),
        (
            ["--detector", "world", "--clip", "x"],
            ["--detector-model / --clip go with --detector mask2former"],
        ),
    ],
)
def test_cli_mask2former_errors_exit_2(extra, messages, tmp_path, capsys):
    _write_layout(tmp_path / "images", [single_object_row("dog")], np.zeros((8, 8, 3), dtype=np.uint8))
    args = ["eval", "geneval-score", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "r.jsonl")]
    extra = [e.format(tmp=tmp_path) for e in extra]
    detector = [] if "--detector" in extra else ["--detector", "mask2former"]
    assert main([*args, *detector, *extra]) == 2
    err = capsys.readouterr().err
    assert "parauni eval geneval-score: error:" in err
    assert all(m in err for m in messages), err


def test_cli_geneval_loads_the_detector_before_generating(tmp_path, capsys):
    metadata = tmp_path / "m.jsonl"
    metadata.write_text(json.dumps(single_object_row("dog")) + "\n")
    args = ["eval", "geneval", "--model", "tiny", "--metadata", str(metadata), "--out", str(tmp_path / "o")]
    assert (
        main([*args, "--detector", "mask2former", "--detector-model", str(tmp_path / "none"), "--quiet"]) == 2
    )
    assert "GenEval detector (Mask2Former): local folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
