"""The shapes world: placement and rendering (scene.py), GenEval-style captions, metadata and the training
stream (captions.py)."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from parauni.scoring.geneval_rules import (
    GENEVAL_COLORS,
    GENEVAL_TAGS,
    Detection,
    color_from_detection,
    evaluate_image,
    filter_detections,
    relative_position,
)
from parauni.world.captions import (
    WorldStream,
    all_metadata,
    color_attr_row,
    colors_row,
    counting_row,
    dense_caption,
    make_eval_metadata,
    metadata_for,
    position_row,
    read_metadata,
    sample_training_example,
    scene_for,
    single_object_row,
    two_object_row,
    with_article,
    world_vocabulary,
    write_eval_metadata,
)
from parauni.world.scene import (
    BACKGROUND,
    COLORS,
    MAX_SIZE_FRAC,
    MIN_SIZE_FRAC,
    SHAPES,
    Scene,
    WorldObject,
    boxes_apart,
    place_objects,
    render,
    shape_mask,
)

# The official GenEval metadata lives in ../shared beside the repository (never copied into it).
OFFICIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
SIZES = (32, 48, 64)


def object_masks(scene: Scene) -> list[np.ndarray]:
    return [shape_mask(o.shape, o.box, scene.size, scene.size) for o in scene.objects]


# --- palette -----------------------------------------------------------------------------------------


def test_palette_is_genevals_ten_colours_far_apart_and_far_from_grey():
    assert tuple(COLORS) == GENEVAL_COLORS
    rgb = {name: np.array(value, dtype=float) for name, value in COLORS.items()}
    pairwise = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(rgb, 2))
    to_grey = min(np.linalg.norm(v - np.array(BACKGROUND)) for v in rgb.values())
    assert pairwise > 100
    assert to_grey > 120


# --- placement ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_place_objects_inside_apart_and_sized(size):
    for seed, n in itertools.product(range(50), (1, 2, 3, 4)):
        boxes = place_objects(np.random.default_rng(seed), n, size)
        assert len(boxes) == n
        for cx, cy, side in boxes:
            assert MIN_SIZE_FRAC * size <= side <= MAX_SIZE_FRAC * size
            assert side / 2 <= cx <= size - side / 2 and side / 2 <= cy <= size - side / 2
        for a, b in itertools.combinations(boxes, 2):
            assert boxes_apart(a, b, gap=1.0)


def test_place_objects_deterministic_by_seed():
    first = place_objects(np.random.default_rng(7), 4, 32)
    assert first == place_objects(np.random.default_rng(7), 4, 32)
    assert first != place_objects(np.random.default_rng(8), 4, 32)


def test_place_objects_impossible_and_bad_arguments():
    with pytest.raises(ValueError, match="cannot place 80 objects"):
        place_objects(np.random.default_rng(0), 80, 32)
    with pytest.raises(ValueError, match="at least 1"):
        place_objects(np.random.default_rng(0), 0, 32)
    with pytest.raises(ValueError, match="min_frac"):
        place_objects(np.random.default_rng(0), 1, 32, min_frac=0.5, max_frac=0.2)


# --- rendering ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_render_shapes_never_touch_and_colours_are_exact(size):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        boxes = place_objects(rng, 4, size)
        scene = Scene(
            [WorldObject(SHAPES[i], list(COLORS)[seed % 10 - i], *b) for i, b in enumerate(boxes)], size
        )
        image = render(scene)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        masks = object_masks(scene)
        for i, (obj, mask) in enumerate(zip(scene.objects, masks, strict=True)):
            assert np.all(image[mask] == COLORS[obj.color])
            grown = ndimage.binary_dilation(mask)  # 4-neighbourhood
            assert not any(grown[other].any() for j, other in enumerate(masks) if j != i)
        assert np.all(image[~np.any(masks, axis=0)] == BACKGROUND)


def test_render_is_deterministic_by_seed():
    def image(seed):
        rng = np.random.default_rng(seed)
        return render(scene_for(metadata_for("counting", rng), rng, 32))

    assert np.array_equal(image(3), image(3))
    assert not np.array_equal(image(3), image(4))


@pytest.mark.parametrize("size", SIZES)
def test_shape_areas_match_their_geometry(size):
    side = 0.36 * size
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}
    for shape, fraction in expected.items():
        mask = shape_mask(shape, (3.3, 4.6, 3.3 + side, 4.6 + side), size, size)
        assert mask.sum() == pytest.approx(fraction * side**2, rel=0.12), shape


def test_triangle_points_up_and_cross_arms_are_a_third():
    triangle = shape_mask("triangle", (0, 0, 30, 30), 30, 30)
    widths = triangle.sum(axis=1)
    assert widths[1] < 4 and widths[-1] >= 28 and np.all(np.diff(widths) >= 0)
    cross = shape_mask("cross", (0, 0, 30, 30), 30, 30)
    assert cross[0].sum() == 10 and cross[15].sum() == 30 and not cross[0, 0]


def test_world_object_rejects_unknown_names():
    with pytest.raises(ValueError, match="'hexagon'"):
        WorldObject("hexagon", "red", 5, 5, 4)
    with pytest.raises(ValueError, match="'teal'"):
        WorldObject("circle", "teal", 5, 5, 4)


# --- GenEval phrasing --------------------------------------------------------------------------------


def official_rows() -> list[dict]:
    """The official GenEval metadata; the test skips, saying where it looked, without ../shared beside the repo."""
    if not OFFICIAL.is_file():
        pytest.skip(f"the official GenEval metadata is not at {OFFICIAL} (../shared beside the repository)")
    return read_metadata(OFFICIAL)


def rebuild(row: dict) -> dict:
    """Our builder's row for an official row of the same tag, classes and colours."""
    inc = row["include"]
    tag = row["tag"]
    if tag == "single_object":
        return single_object_row(inc[0]["class"])
    if tag == "two_object":
        return two_object_row(inc[0]["class"], inc[1]["class"])
    if tag == "colors":
        return colors_row(inc[0]["class"], inc[0]["color"])
    if tag == "position":
        return position_row(inc[1]["class"], inc[1]["position"][0], inc[0]["class"])
    return color_attr_row(inc[0]["class"], inc[0]["color"], inc[1]["class"], inc[1]["color"])


def test_builders_reproduce_every_official_non_counting_row_exactly():
    rows = [r for r in official_rows() if r["tag"] != "counting"]
    assert len(rows) == 473
    for row in rows:
        assert json.dumps(rebuild(row)) == json.dumps(row)


def test_counting_rows_follow_the_official_structure():
    for row in (r for r in official_rows() if r["tag"] == "counting"):
        n = row["include"][0]["count"]
        number = row["prompt"].split()[3]
        ours = counting_row("cross", n)
        expected = json.loads(json.dumps(row).replace(f'"{row["include"][0]["class"]}"', '"cross"'))
        expected["prompt"] = f"a photo of {number} crosses"
        assert json.dumps(ours) == json.dumps(expected)


def test_world_prompts_and_articles():
    assert single_object_row("circle")["prompt"] == "a photo of a circle"
    assert two_object_row("circle", "square")["prompt"] == "a photo of a circle and a square"
    assert counting_row("circle", 3)["prompt"] == "a photo of three circles"
    assert counting_row("cross", 4)["prompt"] == "a photo of four crosses"
    assert colors_row("circle", "orange")["prompt"] == "a photo of an orange circle"
    assert position_row("circle", "left of", "square")["prompt"] == "a photo of a circle left of a square"
    assert color_attr_row("cross", "red", "circle", "orange")["prompt"] == (
        "a photo of a red cross and an orange circle"
    )
    assert with_article("orange square") == "an orange square" and with_article("red") == "a red"


def test_position_row_target_first():
    row = position_row("circle", "above", "square")
    assert row["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["above", 0]},
    ]


def test_metadata_for_draws_valid_rows_with_distinct_classes():
    rng = np.random.default_rng(0)
    pattern = {
        "single_object": r"a photo of an? \w+",
        "two_object": r"a photo of an? \w+ and an? \w+",
        "counting": r"a photo of (two|three|four) \w+",
        "colors": r"a photo of an? \w+ \w+",
        "position": r"a photo of an? \w+ (left of|right of|above|below) an? \w+",
        "color_attr": r"a photo of an? \w+ \w+ and an? \w+ \w+",
    }
    for tag in GENEVAL_TAGS * 30:
        row = metadata_for(tag, rng)
        assert row["tag"] == tag and re.fullmatch(pattern[tag], row["prompt"]), row
        assert row in all_metadata(tag)
        classes = [c["class"] for c in row["include"]]
        assert len(set(classes)) == len(classes)
        if tag == "color_attr":
            assert row["include"][0]["color"] != row["include"][1]["color"]
        if tag == "counting":
            assert row["exclude"] == [{"class": classes[0], "count": row["include"][0]["count"] + 1}]


def test_unique_prompt_counts():
    counts = {tag: len({r["prompt"] for r in all_metadata(tag)}) for tag in GENEVAL_TAGS}
    assert counts == {
        "single_object": 4,
        "two_object": 12,
        "counting": 12,
        "colors": 40,
        "position": 48,
        "color_attr": 1080,
    }


# --- scenes satisfy their metadata -------------------------------------------------------------------


def truth_detections(scene: Scene) -> list[Detection]:
    return [Detection(o.shape, 1.0, o.box, None, o.color) for o in scene.objects]


@pytest.mark.parametrize("size", SIZES)
def test_every_scene_satisfies_its_metadata(size):
    for i in range(300):
        rng = np.random.default_rng([size, i])
        row = metadata_for(GENEVAL_TAGS[i % 6], rng)
        scene = scene_for(row, rng, size)
        dets = truth_detections(scene)
        correct, reason = evaluate_image(filter_detections(dets, row["tag"]), row, color_from_detection)
        assert correct, (row, reason)
        assert len(scene.objects) == sum(c["count"] for c in row["include"])


def test_position_scenes_hold_only_the_wanted_relation_with_margin():
    for i in range(400):
        rng = np.random.default_rng(i)
        row = metadata_for("position", rng)
        target, subject = truth_detections(scene_for(row, rng, 32))
        relation = row["include"][1]["position"][0]
        assert relative_position(subject, target) == {relation}
        # Still only that relation with boxes a pixel off, as a detector may return them.
        nudged = Detection(subject.label, 1.0, tuple(np.add(subject.box, (-1, 1, 1, -1))))
        assert relative_position(nudged, target) == {relation}


# --- dense captions, stream, vocabulary --------------------------------------------------------------


def test_dense_caption_wording():
    scene = Scene(
        [
            WorldObject("circle", "red", 6.5, 6.5, 12.5),
            WorldObject("square", "blue", 27.0, 27.0, 9.5),
            WorldObject("cross", "green", 16.0, 16.0, 11.0),
        ],
        32,
    )
    assert dense_caption(scene) == (
        "three objects on a grey background: a large red circle at the top left, a small blue square at the "
        "bottom right and a medium green cross in the centre."
    )
    single = Scene([WorldObject("triangle", "orange", 6.0, 16.0, 11.0)], 32)
    assert dense_caption(single) == "one object on a grey background: a medium orange triangle on the left."


def test_stream_is_resumable_and_deterministic():
    stream = WorldStream(seed=5)
    batch = stream.batch(10, 4)
    again = list(itertools.islice(WorldStream(seed=5).examples(start=12), 2))
    for a, b in zip(batch[2:], again, strict=True):
        assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    other = WorldStream(seed=6).batch(10, 4)
    assert [e["caption"] for e in other] != [e["caption"] for e in batch]
    first = next(iter(stream))
    assert first["image"].shape == (32, 32, 3) and first["image"].dtype == np.uint8


def test_stream_tag_mix_and_dense_metadata():
    tags = [e["metadata"]["tag"] for e in WorldStream(seed=1, size=48).batch(0, 700)]
    share = {tag: tags.count(tag) / len(tags) for tag in set(tags)}
    assert set(share) == {*GENEVAL_TAGS, "dense"}
    assert 0.10 <= share["dense"] <= 0.20
    assert all(0.09 <= share[tag] <= 0.20 for tag in GENEVAL_TAGS)
    only_dense = WorldStream(seed=1, tag_weights={"dense": 1.0}).example(3)
    assert only_dense["metadata"] == {"tag": "dense", "include": [], "prompt": only_dense["caption"]}
    with pytest.raises(ValueError, match="unknown tags"):
        WorldStream(seed=1, tag_weights={"faces": 1.0})


def test_vocabulary_covers_every_caption():
    vocabulary = set(world_vocabulary())
    rng = np.random.default_rng(0)
    for _ in range(400):
        _, caption, _ = sample_training_example(rng, 32)
        tokens = re.findall(r"\w+|[^\w\s]", caption)
        assert set(tokens) <= vocabulary, set(tokens) - vocabulary


# --- evaluation prompt set and JSONL -----------------------------------------------------------------


def test_eval_metadata_cycles_small_tags_and_samples_large_ones():
    rows = make_eval_metadata(per_tag=48, seed=0)
    assert len(rows) == 6 * 48
    assert rows == make_eval_metadata(per_tag=48, seed=0)
    by_tag = {tag: [r["prompt"] for r in rows if r["tag"] == tag] for tag in GENEVAL_TAGS}
    assert all(len(prompts) == 48 for prompts in by_tag.values())
    assert {p: by_tag["single_object"].count(p) for p in set(by_tag["single_object"])} == {
        f"a photo of a {s}": 12 for s in SHAPES
    }
    assert len(set(by_tag["colors"])) == 40
    assert len(set(by_tag["position"])) == 48
    assert len(set(by_tag["color_attr"])) == 48
    assert make_eval_metadata(per_tag=48, seed=1) != rows


def test_metadata_jsonl_round_trip_and_official_file(tmp_path):
    rows = make_eval_metadata(per_tag=5)
    path = tmp_path / "metadata.jsonl"
    write_eval_metadata(path, rows)
    assert read_metadata(path) == rows
    official = official_rows()
    assert len(official) == 553
    assert {r["tag"] for r in official} == set(GENEVAL_TAGS)


def test_read_metadata_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(single_object_row("circle"))
    path.write_text(f"{good}\n{good}\n" + json.dumps({"tag": "counting", "prompt": "two dogs"}) + "\n")
    with pytest.raises(ValueError, match=r"line 3.*'two dogs' has no 'include'"):
        read_metadata(path)
    path.write_text(f"{good}\nnot json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_metadata(path)


def test_binding_twins_exchange_colours_or_turn_a_relation_round():
    from parauni.world.captions import WorldStream, binding_twin

    assert (
        binding_twin("a photo of a brown triangle and a white circle")
        == "a photo of a white triangle and a brown circle"
    )
    assert (
        binding_twin("a photo of a red circle left of a blue square")
        == "a photo of a blue circle left of a red square"
    )
    assert binding_twin("a photo of a circle right of a cross") == "a photo of a circle left of a cross"
    assert binding_twin("a photo of a triangle above a cross") == "a photo of a triangle below a cross"
    for plain in ("a photo of a circle", "a photo of a green cross", "a photo of two red circles"):
        assert binding_twin(plain) is None
    dense = [e["caption"] for e in WorldStream(3, 32).batch(0, 200) if e["caption"].count(" a ") >= 3]
    for caption in dense:
        twin = binding_twin(caption)
        assert twin is None or (twin != caption and sorted(twin.split()) == sorted(caption.split()))


def test_shape_twins_replace_the_last_shape_by_one_the_caption_does_not_name():
    from parauni.errors import ConfigError
    from parauni.world.captions import PLURALS, SHAPES, WorldStream, caption_twin, shape_twin
    from parauni.world.stage0_models import WorldSource

    twin = shape_twin("a photo of a red circle and a blue square")
    assert twin.startswith("a photo of a red circle and a blue ") and twin.split()[-1] in {
        "triangle",
        "cross",
    }
    assert shape_twin("a photo of a red circle and a blue square") == twin  # always the same twin
    assert shape_twin("a photo of two crosses").split()[-1] in {"circles", "squares", "triangles"}
    assert shape_twin("a photo of a green thing") is None
    for e in WorldStream(3, 32).batch(0, 300):  # every caption names a shape; all four in some dense ones
        caption, twin = e["caption"], shape_twin(e["caption"])
        assert twin is not None and twin != caption and len(twin.split()) == len(caption.split())
        changed = [(a, b) for a, b in zip(caption.split(), twin.split(), strict=True) if a != b]
        assert len(changed) == 1 and changed[0][1].rstrip(".,") in {*SHAPES, *PLURALS.values()}
    caption = "a photo of a pink triangle and a black square"
    assert caption_twin(caption, "binding") == "a photo of a black triangle and a pink square"
    assert caption_twin(caption, "shape") == shape_twin(caption)
    assert caption_twin(caption, "both") in {caption_twin(caption, "binding"), shape_twin(caption)}
    assert caption_twin("a photo of a cross", "both") == shape_twin("a photo of a cross")  # no binding twin
    assert WorldSource(0, 32, twins="shape").twin(caption) == shape_twin(caption)
    with pytest.raises(ConfigError, match="twin kind 'colour'"):
        caption_twin(caption, "colour")
    with pytest.raises(ConfigError, match="world twins 'colour'"):
        WorldSource(0, 32, twins="colour")
