"""The layer analysis (paper figs. 2, 4, 5): layer masks, similarity, zones and `parauni analyze layers`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fp32 import assert_close_up_to_order

from parauni.analysis.layers import (
    LayerProbe,
    default_zones,
    kept_layers_scale,
    layer_similarity,
    per_layer_scores,
    suggest_zones,
    zone_sensitivity,
)
from parauni.cli import main
from parauni.pipeline import GenerationOptions
from parauni.rl.rewards import Reward

PROMPTS = ["a red circle", "two blue squares"]


class Brightness(Reward):
    """A cheap fake reward: the mean pixel value of each image."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def test_single_layer_scale_gives_exactly_that_layers_condition(tiny_model):
    with torch.no_grad():
        per_layer = tiny_model.per_layer_conditions(tiny_model.encode_prompts(PROMPTS))  # (B, L_sel, Q, C)
    n = per_layer.shape[1]
    assert n == len(tiny_model.lim.layers) > 1
    for i in range(n):
        cond = tiny_model.lim.aggregate(per_layer, kept_layers_scale(n, [i]))
        # x * n, a sum of n terms (all zero but x) and a division by n (tests/fp32.py): n + 2 roundings
        assert_close_up_to_order(cond, per_layer[:, i], n + 2)
    kept = [0, n - 1]
    torch.testing.assert_close(
        tiny_model.lim.aggregate(per_layer, kept_layers_scale(n, kept)), per_layer[:, kept].mean(1)
    )


def test_keeping_every_layer_equals_the_normal_condition(tiny_model):
    batch = tiny_model.encode_prompts(PROMPTS)
    with torch.no_grad():
        per_layer = tiny_model.per_layer_conditions(batch)
        normal = tiny_model.condition(batch)
    n = per_layer.shape[1]
    zones = default_zones(tiny_model)
    assert sorted(sum(zones.values(), [])) == list(range(tiny_model.lim.num_vlm_layers))
    torch.testing.assert_close(tiny_model.lim.aggregate(per_layer, kept_layers_scale(n, range(n))), normal)


def test_kept_layers_scale_rejects_empty_and_out_of_range():
    with pytest.raises(ValueError, match="at least one"):
        kept_layers_scale(4, [])
    with pytest.raises(ValueError, match="do not fit"):
        kept_layers_scale(4, [4])


def test_per_layer_scores_and_zone_sensitivity_shapes(tiny_model):
    rewards = {"brightness": Brightness()}
    options = GenerationOptions(seed=0, steps=1, cfg=1.0, batch_size=2)
    probe = LayerProbe(tiny_model, PROMPTS, None, rewards, options)
    scores = per_layer_scores(probe)
    n = len(tiny_model.lim.layers)
    assert list(scores) == ["brightness"] and len(scores["brightness"]) == n
    assert all(np.isfinite(scores["brightness"]))

    zr = zone_sensitivity(probe)
    assert set(zr["removed"]) | set(zr["skipped"]) == {"shallow", "middle", "deep"}
    for zone, drop in zr["drop"].items():
        assert drop["brightness"] == pytest.approx(
            zr["all"]["brightness"] - zr["removed"][zone]["brightness"]
        )
    # A "zone" holding no selected layer removes nothing: the same images as all layers.
    same = zone_sensitivity(probe, zones={"none": []})
    assert same["drop"]["none"]["brightness"] == pytest.approx(0.0, abs=1e-6)


def test_layer_similarity_is_symmetric_with_unit_diagonal(tiny_model):
    sim = layer_similarity(tiny_model, PROMPTS + ["a green triangle"], batch_size=2)
    n = tiny_model.lim.num_vlm_layers
    assert sim.shape == (n, n)
    np.testing.assert_allclose(sim, sim.T, atol=1e-10)
    np.testing.assert_allclose(np.diagonal(sim), 1.0, atol=1e-10)
    assert (sim <= 1 + 1e-10).all()


def test_suggest_zones_recovers_blocks():
    sizes = [5, 2, 4]
    n = sum(sizes)
    sim = np.full((n, n), 0.1)
    start = 0
    for s in sizes:
        sim[start : start + s, start : start + s] = 0.9
        start += s
    np.fill_diagonal(sim, 1.0)
    assert suggest_zones(sim, 3) == [range(0, 5), range(5, 7), range(7, 11)]
    assert suggest_zones(sim, 1) == [range(0, n)]
    assert len(suggest_zones(sim, n)) == n
    with pytest.raises(ValueError, match="n_zones"):
        suggest_zones(sim, n + 1)


def test_cli_analyze_layers_end_to_end(clip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\na cross\n")
    out = tmp_path / "analysis"
    argv = ["analyze", "layers", "--model", "tiny", "--out", str(out), "--prompts", str(prompts)]
    argv += ["--clip", str(clip_dir), "--limit", "2", "--steps", "1", "--quiet"]
    assert main(argv) == 0
    result = json.loads((out / "analysis.json").read_text())
    n = len(result["selected_layers"])
    assert result["num_prompts"] == 2 and len(result["per_layer"]["clip"]) == n
    assert np.asarray(result["similarity"]["matrix"]).shape == (n, n)
    assert set(result["zone_removal"]["drop"]) <= {"shallow", "middle", "deep"}
    for name in ("per_layer_scores.png", "layer_similarity.png", "zone_removal.png"):
        assert (out / name).stat().st_size > 0
    text = capsys.readouterr().out
    assert "per-layer conditioning" in text and "zone removal" in text

    assert main(["analyze", "layers", "--model", "tiny", "--out", str(out), "--prompts", str(prompts)]) == 2
    assert "--world" in capsys.readouterr().err
