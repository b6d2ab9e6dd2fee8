"""DPM-Solver++ takes at most as many steps as it has distinct integer timesteps (issue 19, item 2).

Its timesteps are the shifted flow sigmas times 1000, rounded: at shift 3 two of them coincide from 351
steps on (a repeated, wrong step), and past ~500 diffusers indexes beyond its sigma table. The bound is
found per shift, refused beyond with the bound in the message, and the sampler runs exactly at it.
"""

from __future__ import annotations

import pytest
import torch

from parauni.diffusion.sampling import check_dpm_steps, dpm_max_steps, dpm_solver_scheduler, sample


@pytest.mark.parametrize(("shift", "bound"), [(3.0, 350), (1.0, 998), (6.0, 176)])
def test_the_bound_is_the_last_count_with_distinct_timesteps(shift, bound):
    assert dpm_max_steps(shift) == bound
    scheduler = dpm_solver_scheduler(shift)
    scheduler.set_timesteps(bound)
    assert len(set(scheduler.timesteps.tolist())) == bound
    scheduler.set_timesteps(bound + 1)
    assert len(set(scheduler.timesteps.tolist())) < bound + 1


def test_steps_beyond_the_bound_are_refused_naming_it():
    check_dpm_steps(350, 3.0)
    with pytest.raises(ValueError, match=r"steps=351 .*\(at most 350: .*euler sampler"):
        check_dpm_steps(351, 3.0)
    with pytest.raises(ValueError, match=r"steps=1000 .*\(at most 350:"):
        sample(lambda x, t, c: torch.zeros_like(x), None, None, torch.zeros(1, 1, 2, 2), steps=1000, cfg=1.0)


def test_the_sampler_runs_exactly_at_the_bound():
    """For data that is one point x0 the flow velocity is v = (x - x0) / t, so DPM-Solver++'s data
    prediction x - t v is x0 at every step and its last step lands on x0: 350 distinct steps run to it
    (no IndexError, no repeated step)."""
    x0 = torch.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    noise = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample(lambda x, t, c: (x - x0) / t.view(-1, 1, 1, 1), None, None, noise, steps=350, cfg=1.0)
    # each step mixes x and x0 with fp32 weights that sum to 1: a few ulps of |x| <= 4 per step, 350 steps
    torch.testing.assert_close(out, x0, atol=350 * 8 * 4 * torch.finfo(torch.float32).eps, rtol=0)
