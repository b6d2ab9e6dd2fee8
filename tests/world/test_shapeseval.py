"""ShapesEval's account of what colour-attribution images show (correct, bound wrongly, a shape or a colour
missing), on renders of the world whose content is known."""

from __future__ import annotations

import numpy as np
import pytest

from parauni.world.captions import color_attr_row, scene_for
from parauni.world.scene import render
from parauni.world.shapeseval import ATTRIBUTION_KINDS, run_shapeseval


def test_attribution_failures_name_what_each_image_shows():
    asked = color_attr_row("circle", "red", "square", "blue")
    drawn = [
        asked,  # correct
        color_attr_row("circle", "blue", "square", "red"),  # the colours swapped: bound wrongly
        color_attr_row("circle", "red", "triangle", "blue"),  # the square missing, both colours drawn
        color_attr_row("circle", "red", "square", "green"),  # the shapes drawn, blue missing
        color_attr_row("cross", "green", "triangle", "yellow"),  # nothing asked drawn
    ]
    rng = np.random.default_rng(0)
    renders = [render(scene_for(row, rng, 32)) for row in drawn]

    def generate(prompts, first_seed):
        return np.stack(renders[first_seed : first_seed + len(prompts)])

    result = run_shapeseval(generate, [asked], images_per_prompt=5, batch_size=1, progress=False)
    assert [r["correct"] for r in result["results"]] == [True, False, False, False, False]
    assert result["attribution"] == pytest.approx(dict.fromkeys(ATTRIBUTION_KINDS, 0.2))
    assert ["circle", "red"] in result["results"][0]["drawn"]


def test_attribution_is_none_without_colour_attribution_rows():
    from parauni.world.captions import colors_row

    rows = [colors_row("circle", "red")]
    image = render(scene_for(rows[0], np.random.default_rng(0), 32))
    result = run_shapeseval(lambda p, s: np.stack([image] * len(p)), rows, 2, progress=False)
    assert result["attribution"] is None and result["overall"] == 1.0
