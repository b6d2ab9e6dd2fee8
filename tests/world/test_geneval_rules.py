"""GenEval's scoring rules (parauni.scoring.geneval_rules) on hand-built detections, one case per rule."""

import numpy as np
import pytest

from parauni.scoring.geneval_rules import (
    GENEVAL_TAGS,
    Detection,
    color_from_detection,
    evaluate_image,
    filter_detections,
    partial_credit,
    relative_position,
    score_rows,
    validate_metadata,
)


def det(label: str, cx: float = 50.0, cy: float = 50.0, side: float = 10.0, score: float = 0.99, color=None):
    half = side / 2
    return Detection(label, score, (cx - half, cy - half, cx + half, cy + half), None, color)


def colors_of(dets, cls):
    return color_from_detection(dets, cls)


def run(dets, metadata):
    return evaluate_image(filter_detections(dets, metadata["tag"]), metadata, colors_of)


SINGLE = {
    "tag": "single_object",
    "include": [{"class": "circle", "count": 1}],
    "prompt": "a photo of a circle",
}
COUNTING = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 2}],
    "exclude": [{"class": "circle", "count": 3}],
    "prompt": "a photo of two circles",
}


def position_metadata(relation: str) -> dict:
    return {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of a circle {relation} a square",
    }


# --- filter_detections -------------------------------------------------------------------------------


def test_filter_keeps_scores_strictly_above_threshold_sorted():
    dets = [det("circle", score=s) for s in (0.31, 0.3, 0.29, 0.95)] + [det("square", score=0.2)]
    kept = filter_detections(dets, "single_object")
    assert [d.score for d in kept["circle"]] == [0.95, 0.31]
    assert "square" not in kept


def test_filter_uses_counting_threshold_for_counting_only():
    dets = [det("circle", score=s) for s in (0.5, 0.9, 0.91, 0.95)]
    assert [d.score for d in filter_detections(dets, "counting")["circle"]] == [0.95, 0.91]
    assert len(filter_detections(dets, "two_object")["circle"]) == 4


def test_filter_keeps_at_most_16_per_class_best_first():
    dets = [det("circle", score=0.4 + 0.01 * i) for i in range(20)] + [det("square", score=0.5)]
    kept = filter_detections(dets, "single_object")
    assert len(kept["circle"]) == 16
    assert kept["circle"][0].score == pytest.approx(0.59)
    assert kept["circle"][-1].score == pytest.approx(0.44)
    assert len(kept["square"]) == 1


def _official_order(scores: list[float], cutoff: float) -> list[int]:
    """The official evaluate_images.py's selection, on an mmdet-style float32 score column."""
    column = np.asarray(scores, dtype=np.float32)
    ordering = np.argsort(column, kind="stable")[::-1]  # numpy 1.23's quicksort on <= 16 items: stable
    return ordering[column[ordering] > cutoff][:16].tolist()


def test_filter_breaks_ties_as_the_official_script_latest_first():
    scores = [0.8, 0.5, 0.8, 0.8, 0.5, 0.9]
    dets = [det("circle", cx=10.0 * i, score=s) for i, s in enumerate(scores)]
    kept = filter_detections(dets, "single_object")["circle"]
    assert [dets.index(d) for d in kept] == _official_order(scores, 0.3) == [5, 3, 2, 0, 4, 1]


def test_filter_compares_scores_with_the_threshold_in_float32():
    at = float(np.float32(0.3))  # 0.30000001192..., > 0.3 in float64 but == 0.3 in float32
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    dets = [det("circle", score=at), det("circle", cx=20.0, score=above)]
    kept = filter_detections(dets, "single_object")["circle"]
    assert [d.score for d in kept] == [above]
    assert _official_order([at, above], 0.3) == [1]
    counting = [det("circle", score=float(np.float32(0.9)))]
    assert "circle" not in filter_detections(counting, "counting")


def test_filter_has_no_nms():
    dets = [det("circle", score=0.9), det("circle", score=0.8)]  # identical boxes
    assert len(filter_detections(dets, "single_object")["circle"]) == 2


def test_filter_rejects_unknown_tag():
    with pytest.raises(ValueError, match="'dense'"):
        filter_detections([], "dense")


# --- relative_position -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "distance, expected",
    # 10 px boxes: rev = d - 0.1 * 20 = d - 2, dx = (d - 2) / d, which passes 0.5 at d = 4.
    [(4.1, {"left of"}), (3.9, set()), (30.0, {"left of"})],
)
def test_relative_position_margin_along_x(distance, expected):
    a, b = det("circle", cx=50 - distance), det("square", cx=50)
    assert relative_position(a, b) == expected
    mirrored = {"right of"} if expected else set()
    assert relative_position(b, a) == mirrored


def test_relative_position_y_grows_downward():
    assert relative_position(det("circle", cy=20), det("square", cy=50)) == {"above"}
    assert relative_position(det("circle", cy=80), det("square", cy=50)) == {"below"}


def test_relative_position_hand_computed_oblique_cases():
    b = det("square")
    # off = (-10, -6): rev = (-8, -4), |off| = 11.66 -> (dx, dy) = (-0.686, -0.343): only "left of".
    assert relative_position(det("circle", cx=40, cy=44), b) == {"left of"}
    # off = (-10, -10): rev = (-8, -8) / 14.14 = -0.566 on both axes.
    assert relative_position(det("circle", cx=40, cy=40), b) == {"left of", "above"}


def test_relative_position_empty_when_offset_within_margin():
    # |off| = 1.5 < 0.1 * 20 on both axes: every revised component is 0.
    assert relative_position(det("circle", cx=51.5, cy=48.5), det("square")) == set()


def test_relative_position_margin_uses_box_sizes():
    # d = 8 between a 30 px and a 10 px box: rev = 8 - 0.1 * 40 = 4, dx = 0.5, not > 0.5.
    assert relative_position(det("circle", cx=58, side=30), det("square", side=10)) == set()
    assert relative_position(det("circle", cx=58, side=30), det("square", side=10), margin=0.05) == {
        "right of"
    }


# --- evaluate_image ----------------------------------------------------------------------------------


def test_single_object_pass_and_fail():
    assert run([det("circle")], SINGLE) == (True, "")
    assert run([det("square")], SINGLE) == (False, "expected circle>=1, found 0")
    assert run([det("circle", score=0.2)], SINGLE)[0] is False


def test_two_object_needs_both_classes():
    meta = {
        "tag": "two_object",
        "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
        "prompt": "a photo of a circle and a square",
    }
    assert run([det("circle"), det("square", cx=10)], meta)[0] is True
    assert run([det("circle"), det("circle", cx=10)], meta) == (False, "expected square>=1, found 0")


def test_counting_exact_and_one_too_many():
    two = [det("circle", cx=10), det("circle", cx=40)]
    assert run(two, COUNTING) == (True, "")
    assert run(two + [det("circle", cx=70)], COUNTING) == (False, "expected circle<3, found 3")
    assert run(two[:1], COUNTING) == (False, "expected circle>=2, found 1")


def test_counting_uses_the_09_threshold():
    # A third circle at 0.85 is not kept for counting, so it does not trip the exclude clause...
    dets = [det("circle", cx=10), det("circle", cx=40), det("circle", cx=70, score=0.85)]
    assert run(dets, COUNTING)[0] is True
    # ... and two circles at 0.85 are not enough.
    assert run([det("circle", cx=10, score=0.85), det("circle", cx=40, score=0.85)], COUNTING)[0] is False


def test_colors_clause_counts_matching_colours():
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red circle",
    }
    assert run([det("circle", color="red")], meta) == (True, "")
    correct, reason = run([det("circle", color="blue")], meta)
    assert not correct
    assert reason == "expected red circle>=1, found 0 red; and 1 blue"


def test_colour_clause_with_count_two_needs_two_matches():
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 2, "color": "red"}],
        "prompt": "two red circles",
    }
    assert run([det("circle", color="red"), det("circle", cx=10, color="red")], meta)[0] is True
    correct, reason = run([det("circle", color="red"), det("circle", cx=10, color="blue")], meta)
    assert not correct
    assert "found 1 red; and 1 red, 1 blue" in reason


def test_colour_is_judged_on_the_top_count_detections_only():
    meta = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red circle",
    }
    dets = [det("circle", score=0.9, color="blue"), det("circle", cx=10, score=0.8, color="red")]
    assert run(dets, meta)[0] is False


def test_color_attr_binds_colours_to_classes():
    meta = {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "square", "count": 1, "color": "blue"},
        ],
        "prompt": "a photo of a red circle and a blue square",
    }
    assert run([det("circle", color="red"), det("square", cx=10, color="blue")], meta)[0] is True
    correct, reason = run([det("circle", color="blue"), det("square", cx=10, color="red")], meta)
    assert not correct
    assert reason.splitlines() == [
        "expected red circle>=1, found 0 red; and 1 blue",
        "expected blue square>=1, found 0 blue; and 1 red",
    ]


def test_position_pass_and_wrong_relation():
    dets = [det("square", cx=70), det("circle", cx=30)]
    assert run(dets, position_metadata("left of")) == (True, "")
    correct, reason = run(dets, position_metadata("right of"))
    assert not correct
    assert reason == "expected circle right of target, found left of target"


def test_position_fails_without_target_group():
    correct, reason = run([det("circle", cx=30)], position_metadata("left of"))
    assert not correct
    assert reason.splitlines() == ["expected square>=1, found 0", "no target for circle to be left of"]


def test_position_compares_against_the_top_target_only():
    # The second, lower-scored square sits left of the circle but is not part of the target group.
    dets = [det("square", cx=70, score=0.9), det("square", cx=5, score=0.5), det("circle", cx=30)]
    assert run(dets, position_metadata("left of"))[0] is True


def test_position_clause_skipped_when_its_colour_failed():
    meta = position_metadata("left of")
    meta["include"][1]["color"] = "red"
    correct, reason = run([det("square", cx=70, color="red"), det("circle", cx=90, color="blue")], meta)
    assert not correct
    assert reason == "expected red circle>=1, found 0 red; and 1 blue"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"include": [], "prompt": "p1"}, "'p1' has no 'tag'"),
        ({"tag": "counting", "prompt": "p2"}, "'p2' has no 'include'"),
        ({"tag": "shapes", "include": [], "prompt": "p3"}, "'p3' has unknown tag 'shapes'"),
        ({"tag": "counting", "include": [{"class": "x", "count": 0}], "prompt": "p4"}, "'p4'.*count 0"),
        (
            {"tag": "colors", "include": [{"class": "x", "count": 1, "color": "teal"}], "prompt": "p5"},
            "'teal'",
        ),
        (
            {
                "tag": "position",
                "include": [{"class": "x", "count": 1, "position": ["left of", 0]}],
                "prompt": "p6",
            },
            "'p6'.*earlier include clause",
        ),
    ],
)
def test_bad_metadata_rows_name_the_prompt(row, message):
    with pytest.raises(ValueError, match=message):
        validate_metadata(row)
    with pytest.raises(ValueError, match=message):
        evaluate_image({}, row, colors_of)


def test_color_from_detection_requires_colours():
    assert color_from_detection([det("circle", color="red")], "circle") == ["red"]
    with pytest.raises(ValueError, match="has no colour"):
        color_from_detection([det("circle")], "circle")


# --- score_rows --------------------------------------------------------------------------------------


def test_score_rows_unweighted_mean_of_tag_means():
    rows = [{"tag": "single_object", "correct": c} for c in (True, True, False)]
    rows.append({"tag": "counting", "correct": True})
    result = score_rows(rows)
    assert result["tags"] == {"single_object": pytest.approx(2 / 3), "counting": 1.0}
    assert result["counts"] == {"single_object": 3, "counting": 1}
    # Unweighted over tags: (2/3 + 1) / 2, not the per-image mean 3/4.
    assert result["overall"] == pytest.approx(5 / 6)


def test_score_rows_all_six_tags():
    rows = [{"tag": t, "correct": i % 2 == 0} for i, t in enumerate(GENEVAL_TAGS)]
    result = score_rows(rows)
    assert list(result["tags"]) == list(GENEVAL_TAGS)
    assert result["overall"] == pytest.approx(0.5)
    assert np.isclose(sum(result["tags"].values()), 3.0)


def test_score_rows_rejects_bad_rows():
    with pytest.raises(ValueError, match="no rows"):
        score_rows([])
    with pytest.raises(ValueError, match="row 0 has tag 'dense'"):
        score_rows([{"tag": "dense", "correct": True}])
    with pytest.raises(ValueError, match="no 'correct'"):
        score_rows([{"tag": "counting"}])


# --- partial_credit (Flow-GRPO's GenEval reward) -----------------------------------------------------------


def credit(dets, metadata):
    return partial_credit(filter_detections(dets, metadata["tag"]), metadata, colors_of)


COLOR_ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ],
    "prompt": "a photo of a red circle and a blue square",
}


def test_partial_credit_count_term_is_exact_and_goes_negative_for_many_extras():
    assert credit([det("circle")], SINGLE) == 1.0
    assert credit([], SINGLE) == 0.0
    assert credit([det("circle", cx=10 * i) for i in range(3)], SINGLE) == -1.0  # 1 - |1 - 3| / 1
    three = [det("circle", cx=10 * i) for i in range(3)]
    assert credit(three, COUNTING) == pytest.approx(0.5)  # 1 - |2 - 3| / 2; excludes add nothing
    assert credit(three[:2], COUNTING) == 1.0
    assert credit(three[:2] + [det("circle", cx=70, score=0.85)], COUNTING) == 1.0  # 0.9 threshold


def test_partial_credit_colour_terms_bind_colours_to_classes():
    assert credit([det("circle", color="red"), det("square", cx=10, color="blue")], COLOR_ATTR) == 1.0
    # counts right (1 + 1), circle colour wrong (0), square right (1)
    assert credit([det("circle", color="green"), det("square", cx=10, color="blue")], COLOR_ATTR) == 0.75
    # a missing object loses its count and its colour term
    assert credit([det("circle", color="red")], COLOR_ATTR) == 0.5
    two_red = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 2, "color": "red"}],
        "prompt": "a photo of two red circles",
    }
    assert credit([det("circle", color="red"), det("circle", cx=10, color="blue")], two_red) == 0.75


def test_partial_credit_position_term():
    left = [det("square", cx=70), det("circle", cx=30)]
    assert credit(left, position_metadata("left of")) == 1.0
    assert credit(left, position_metadata("right of")) == pytest.approx(2 / 3)  # counts 1 + 1, relation 0
    assert credit([det("circle", cx=30)], position_metadata("left of")) == pytest.approx(1 / 3)  # no target
    meta = position_metadata("left of")
    meta["include"][1]["color"] = "red"  # a colour failure also fails the position term
    dets = [det("square", cx=70, color="red"), det("circle", cx=30, color="blue")]
    assert credit(dets, meta) == pytest.approx(2 / 4)


def test_partial_credit_needs_an_include_clause():
    with pytest.raises(ValueError, match="no include clause"):
        credit([], {"tag": "single_object", "include": [], "prompt": "nothing"})
