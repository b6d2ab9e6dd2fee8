"""The binding probe: swapped-colour pairs against other prompts, per layer, LIM output and teacher."""

from __future__ import annotations

import pytest
import torch

from parauni.analysis.binding import binding_profile, binding_ratio, set_binding_ratio
from parauni.world.captions import swapped_color_pairs


def test_binding_ratio_is_zero_for_an_invisible_swap_and_about_one_for_a_new_prompt():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 5, generator=g)
    assert binding_ratio(x, x.clone()) == 0.0
    assert binding_ratio(x, torch.randn(64, 3, 5, generator=g)) == pytest.approx(1.0, abs=0.25)
    with pytest.raises(ValueError, match="equal shapes"):
        binding_ratio(x, x[:3])


def test_set_binding_ratio_ignores_token_order_where_the_positional_one_does_not():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, 4, generator=g)
    shuffled = x[:, torch.randperm(6, generator=g)]  # the same token sets, in another order
    assert set_binding_ratio(x, shuffled) == pytest.approx(0.0, abs=1e-9)
    assert binding_ratio(x, shuffled) > 0.5
    moved = x.clone()
    moved[:, 0] = torch.randn(32, 4, generator=g)  # one token of six replaced
    assert 0.05 < set_binding_ratio(x, moved) < 0.6
    with pytest.raises(ValueError, match="token sets"):
        set_binding_ratio(x, x[:3])


def test_swapped_pairs_exchange_the_colours_only():
    prompts, swapped = swapped_color_pairs(20, seed=1)
    assert len(prompts) == len(swapped) == 20 and prompts != swapped
    for a, b in zip(prompts, swapped, strict=True):
        assert sorted(a.split()) == sorted(b.split())  # the same words, bound differently
        assert a.startswith("a photo of a") and " and a" in a


def test_binding_profile_reports_every_layer_and_a_bag_of_words_teacher_sees_no_swap(tiny_model):
    prompts, swapped = swapped_color_pairs(6)
    width = tiny_model.dit.config.caption_channels

    def bag_of_words(captions):  # a teacher that ignores word order cannot see a binding
        rows = [
            sum(
                torch.randn(width, generator=torch.Generator().manual_seed(hash(w) % 2**31))
                for w in c.split()
            )
            for c in captions
        ]
        states = torch.stack(rows)[:, None]
        return states, torch.ones(len(captions), 1)

    out = binding_profile(tiny_model, prompts, swapped, teacher=bag_of_words)
    assert len(out["query_states"]) == tiny_model.vlm.num_layers
    assert len(out["lim_layers"]) == len(tiny_model.lim.layers)
    assert 0.0 <= out["condition"] and out["teacher"] == pytest.approx(0.0, abs=1e-9)
    assert 0.0 <= out["condition_set"] and out["teacher_set"] == pytest.approx(0.0, abs=1e-9)
