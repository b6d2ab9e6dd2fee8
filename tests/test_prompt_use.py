"""`parauni.analysis.prompt_use`: the prompt-sensitivity figures, and that they see a collapsed LIM."""

from __future__ import annotations

import copy

import pytest
import torch
from fp32 import dit_additions, relative_order_tolerance

from parauni.analysis.prompt_use import (
    DEFAULT_PROMPTS,
    format_sensitivity,
    prompt_sensitivity,
    relative_spread,
)


def test_relative_spread_is_zero_for_equal_rows_and_scale_free():
    x = torch.randn(1, 5).expand(3, 5)
    assert relative_spread(x) == pytest.approx(0.0, abs=1e-7)
    y = torch.randn(3, 5)
    assert relative_spread(7 * y) == pytest.approx(relative_spread(y), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 prompts"):
        relative_spread(y[:1])


def test_a_model_reads_its_prompts_and_a_collapsed_lim_does_not(tiny_model):
    result = prompt_sensitivity(tiny_model)
    assert len(result["query_states"]) == tiny_model.vlm.num_layers
    assert all(s > 0 for s in result["query_states"])
    assert result["condition"] > 1e-3 and result["velocity"] > 0
    assert "condition across prompts" in format_sensitivity(result)

    collapsed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        collapsed.lim.projector.weight.zero_()  # every prompt -> LN(bias): one condition
    result = prompt_sensitivity(collapsed)
    # every prompt's condition is LN(bias), computed per batch row: rows may differ by summation order alone
    # (tests/fp32.py), a relative spread within the tolerance of the chain's additions: the condition's (the
    # norm's and the mean's sums, the spread's mean over the prompts) and then the DiT's (64 tokens at 64 px)
    prompts = len(DEFAULT_PROMPTS)
    chain = 2 * collapsed.lim.projector.out_features + len(collapsed.lim.layers) + prompts
    condition = relative_order_tolerance(chain)
    velocity = relative_order_tolerance(
        chain + dit_additions(collapsed.dit.config, 64, collapsed.queries.shape[0])
    )
    assert result["condition"] == pytest.approx(0.0, abs=condition)
    assert result["velocity"] == pytest.approx(0.0, abs=velocity)
    assert result["velocity_vs_uncond"] == pytest.approx(0.0, abs=velocity)
    with pytest.raises(ValueError, match="t=2"):
        prompt_sensitivity(tiny_model, t=2)
