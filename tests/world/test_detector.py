"""ShapesEval's detector (parauni.world.detector): exact on clean renders, robust to the flaws of generated
images, and silent on noise. ShapesEval = filter_detections + evaluate_image + score_rows."""

from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from parauni.scoring.geneval_rules import evaluate_image, filter_detections, score_rows
from parauni.world.captions import make_eval_metadata, scene_for
from parauni.world.detector import ShapesDetector
from parauni.world.scene import BACKGROUND, COLORS, SHAPES, Scene, WorldObject, render, shape_mask

DETECTOR = ShapesDetector()
EVAL_ROWS = make_eval_metadata(per_tag=48)
ImageMaker = Callable[[dict, np.random.Generator], np.ndarray]


def shapes_eval(make_image: ImageMaker, rows: list[dict] = EVAL_ROWS, seeds: int = 1) -> dict:
    """ShapesEval of images made per (metadata row, seed)."""
    results = []
    for index, row in enumerate(rows):
        for seed in range(seeds):
            image = make_image(row, np.random.default_rng([index, seed]))
            kept = filter_detections(DETECTOR(image), row["tag"])
            correct, _ = evaluate_image(kept, row, DETECTOR.classify_colors)
            results.append({"tag": row["tag"], "correct": correct})
    return score_rows(results)


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def ragged(image: np.ndarray, rng: np.random.Generator, p: float) -> np.ndarray:
    """Remove a fraction p of the shapes' edge pixels and grow them by a fraction p of the outside rim."""
    foreground = np.any(image != BACKGROUND, axis=-1)
    inner = foreground & ~ndimage.binary_erosion(foreground)
    outer = ~foreground & ndimage.binary_dilation(foreground)
    out = image.copy()
    out[inner & (rng.random(foreground.shape) < p)] = BACKGROUND
    grow = outer & (rng.random(foreground.shape) < p)
    nearest = ndimage.distance_transform_edt(~foreground, return_distances=False, return_indices=True)
    out[grow] = image[nearest[0][grow], nearest[1][grow]]
    return out


def imperfect(
    size: int,
    noise: float = 0.0,
    blur: float = 0.0,
    object_shift: float = 0.0,
    global_shift: float = 0.0,
    rag: float = 0.0,
) -> ImageMaker:
    """Renders of the row's scene with per-object colour shifts, ragged edges, blur, a cast and noise."""

    def make(row: dict, rng: np.random.Generator) -> np.ndarray:
        scene = scene_for(row, rng, size)
        image = render(scene).astype(float)
        for obj in scene.objects:
            image[shape_mask(obj.shape, obj.box, size, size)] += rng.uniform(-object_shift, object_shift, 3)
        image = as_uint8(image)
        if rag:
            image = ragged(image, rng, rag)
        image = ndimage.gaussian_filter(image.astype(float), sigma=(blur, blur, 0))
        image += rng.uniform(-global_shift, global_shift, 3) + rng.normal(0.0, noise, image.shape)
        return as_uint8(image)

    return make


def test_ground_truth_renders_score_nearly_perfectly():
    result = shapes_eval(imperfect(32), seeds=4)
    assert result["counts"] == {tag: 192 for tag in result["tags"]}
    assert result["overall"] >= 0.98
    assert min(result["tags"].values()) >= 0.95


@pytest.mark.parametrize("size", [48, 64])
def test_ground_truth_renders_at_larger_sizes(size):
    result = shapes_eval(imperfect(size), rows=make_eval_metadata(per_tag=12, seed=1))
    assert result["overall"] >= 0.98


def test_clean_detections_are_confident_and_exact():
    size = 32
    colors, centres = ("red", "orange", "white", "purple"), ((7, 7), (24, 7), (7, 24), (24, 24))
    objects = [
        WorldObject(shape, color, cx, cy, 9.0)
        for shape, color, (cx, cy) in zip(SHAPES, colors, centres, strict=True)
    ]
    detections = DETECTOR(render(Scene(objects, size)))
    assert len(detections) == 4
    by_label = {d.label: d for d in detections}
    assert set(by_label) == set(SHAPES)
    for obj in objects:
        found = by_label[obj.shape]
        assert found.color == obj.color and found.score > 0.99
        assert found.mask.shape == (size, size) and found.mask.dtype == bool
        assert np.array_equal(found.mask, shape_mask(obj.shape, obj.box, size, size))
        ys, xs = np.nonzero(found.mask)
        assert found.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert np.allclose(found.box, obj.box, atol=1.5)  # a triangle's thin apex is under half a pixel
    assert DETECTOR.classify_colors(detections, "circle") == [d.color for d in detections]


def test_touching_shapes_of_different_colours_are_split():
    scene = Scene([WorldObject("square", "red", 10, 16, 10), WorldObject("circle", "blue", 20, 16, 10)], 32)
    detections = sorted(DETECTOR(render(scene)), key=lambda d: d.box[0])
    assert [(d.label, d.color) for d in detections] == [("square", "red"), ("circle", "blue")]
    assert all(d.score > 0.9 for d in detections)


def test_mild_noise_blur_and_colour_shifts():
    mild = shapes_eval(imperfect(32, noise=10, blur=0.5, object_shift=20))
    assert mild["overall"] >= 0.95
    cast = shapes_eval(imperfect(32, noise=10, blur=0.5, global_shift=20))
    assert cast["overall"] >= 0.95


def test_ragged_edges():
    assert (
        shapes_eval(imperfect(64, noise=10, rag=0.15), rows=make_eval_metadata(per_tag=16))["overall"] >= 0.95
    )
    # At 32 px a ragged edge is a large part of a 7-12 px shape: lower, still mostly right.
    small = shapes_eval(imperfect(32, noise=10, rag=0.15))
    assert 0.75 <= small["overall"] < 0.97


def test_heavy_degradation_lowers_the_score():
    heavy = shapes_eval(imperfect(32, noise=30, blur=1.0))
    assert heavy["overall"] <= 0.7
    assert heavy["tags"]["counting"] <= 0.4


@pytest.mark.parametrize(
    "name, noise",
    [
        ("uniform", lambda rng: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        ("grey+gaussian 40", lambda rng: as_uint8(128 + rng.normal(0, 40, (32, 32, 3)))),
        ("grey+gaussian 80", lambda rng: as_uint8(128 + rng.normal(0, 80, (32, 32, 3)))),
    ],
)
def test_noise_scores_near_zero(name, noise):
    result = shapes_eval(lambda row, rng: noise(rng))
    assert result["overall"] <= 0.05, name


def test_blank_and_bad_images():
    assert DETECTOR(np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="uint8 \\(H, W, 3\\)"):
        DETECTOR(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="float32"):
        DETECTOR(np.zeros((32, 32, 3), dtype=np.float32))


def test_every_palette_colour_is_recognised_under_shift():
    rng = np.random.default_rng(0)
    for color in COLORS:
        for _ in range(5):
            image = render(Scene([WorldObject("square", color, 16, 16, 10)], 32)).astype(float)
            image[11:21, 11:21] += rng.choice([-20.0, 20.0], size=3)
            (found,) = DETECTOR(as_uint8(image + rng.normal(0, 10, image.shape)))
            assert found.color == color and found.label == "square"
