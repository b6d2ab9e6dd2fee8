"""Rectified-flow maths and the samplers against hand-computed values (system.md section 2)."""

from __future__ import annotations

import pytest
import torch

from parauni.diffusion.flow import (
    dit_timestep,
    flow_loss,
    interpolate,
    sample_timesteps,
    shift_sigmas,
    velocity_target,
)
from parauni.diffusion.sampling import (
    SchedulerStep,
    denoise,
    dpm_solver_scheduler,
    euler_step,
    flow_sigmas,
    guided_velocity,
    make_sampler,
)


def test_interpolate_and_velocity_target_by_hand():
    x0 = torch.tensor([[2.0, -1.0]]).view(1, 2, 1, 1).repeat(2, 1, 1, 1)
    noise = torch.tensor([[4.0, 3.0]]).view(1, 2, 1, 1).repeat(2, 1, 1, 1)
    t = torch.tensor([0.25, 1.0])
    x_t = interpolate(x0, noise, t)
    # row 0: 0.75 * x0 + 0.25 * noise; row 1 (t = 1): pure noise
    assert torch.equal(x_t[0].flatten(), torch.tensor([0.75 * 2 + 0.25 * 4, 0.75 * -1 + 0.25 * 3]))
    assert torch.equal(x_t[1], noise[1])
    assert torch.equal(interpolate(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(velocity_target(x0, noise)[0].flatten(), torch.tensor([2.0, 4.0]))
    # d x_t / d t is the velocity target
    torch.testing.assert_close(
        interpolate(x0, noise, torch.full((2,), 0.6)) - interpolate(x0, noise, torch.full((2,), 0.2)),
        0.4 * velocity_target(x0, noise),
    )


def test_flow_loss_by_hand():
    x0 = torch.zeros(1, 1, 1, 2)
    noise = torch.tensor([1.0, 1.0]).view(1, 1, 1, 2)
    v_pred = torch.tensor([0.0, 3.0]).view(1, 1, 1, 2)  # target (1, 1): errors 1 and 2
    assert flow_loss(v_pred, x0, noise).item() == pytest.approx((1 + 4) / 2)
    assert flow_loss(noise - x0, x0, noise).item() == 0.0
    assert flow_loss(v_pred.bfloat16(), x0, noise).dtype == torch.float32


def test_shift_sigmas_and_dit_timestep():
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert shift_sigmas(torch.tensor(0.25), 3.0).item() == pytest.approx(0.75 / 1.5)
    s = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert dit_timestep(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 500.0, 1000.0]


@pytest.mark.parametrize("mode", ["uniform", "logit_normal"])
def test_sample_timesteps(mode):
    t = sample_timesteps(4000, mode, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.03
    again = sample_timesteps(4000, mode, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    if mode == "uniform":
        assert abs(t.std().item() - (1 / 12) ** 0.5) < 0.01
        assert (t < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.02)
    else:  # logit-normal concentrates around 0.5
        assert (t < 0.1).float().mean().item() < 0.03


def test_logit_normal_mean_shifts_the_distribution():
    t = sample_timesteps(2000, "logit_normal", logit_mean=2.0, generator=torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=0.02)


def test_sample_timesteps_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match=r"unknown timestep sampling 'cosine'.*'uniform'"):
        sample_timesteps(3, "cosine")


def test_flow_sigmas():
    s = flow_sigmas(4, shift=1.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s = flow_sigmas(4, shift=3.0)
    assert s.shape == (5,) and s[0].item() == 1.0 and s[-1].item() == 0.0
    assert s[2].item() == pytest.approx(0.75)  # shift 3 of 0.5
    assert s[1].item() == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))
    assert (s[1:] < s[:-1]).all()
    with pytest.raises(ValueError, match="steps=0"):
        flow_sigmas(0)


def test_euler_step_on_linear_fields():
    x = torch.tensor([1.0, -2.0])
    out = euler_step(x, torch.tensor([2.0, 2.0]), torch.tensor(0.5), torch.tensor(0.25))
    assert torch.equal(out.sample, torch.tensor([0.5, -2.5]))  # x + (0.25 - 0.5) * v
    v = -3.0 * x  # v = a x
    out = euler_step(x, v, torch.tensor(1.0), torch.tensor(0.75))
    torch.testing.assert_close(out.sample, x * (1 + 3.0 * 0.25))
    assert out.mean is None and out.log_prob is None
    assert euler_step(x.bfloat16(), v, torch.tensor(1.0), torch.tensor(0.5)).sample.dtype == torch.bfloat16


def _exact_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    eps = torch.randn(2, 4, 6, 6, generator=g)
    return x0, eps


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (4, 3.0), (20, 3.0)])
def test_euler_denoise_on_the_exact_field_recovers_x0(steps, shift):
    x0, eps = _exact_problem()
    calls = []

    def velocity(x, t):
        calls.append(t.clone())
        return eps - x0

    sigmas, step = make_sampler("euler", steps, shift)
    out = denoise(velocity, eps.clone(), sigmas, step)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert len(calls) == steps and calls[0].shape == (2,) and torch.equal(calls[0], torch.ones(2))


def test_euler_denoise_records_every_step():
    x0, eps = _exact_problem()
    sigmas, step = make_sampler("euler", 3, 1.0)
    out, steps = denoise(lambda x, t: eps - x0, eps.clone(), sigmas, step, record=True)
    assert len(steps) == 3 and torch.equal(steps[-1].sample, out)
    # on the exact field every intermediate sample lies on the straight path x_t
    torch.testing.assert_close(
        steps[0].sample, interpolate(x0, eps, torch.full((2,), 2 / 3)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("steps", [4, 20])
def test_dpm_solver_on_the_exact_field_recovers_x0(steps):
    x0, eps = _exact_problem(1)
    sigmas, step = make_sampler("dpm", steps, 3.0)
    assert isinstance(step, SchedulerStep)
    assert sigmas.shape == (steps + 1,) and sigmas[-1].item() == 0.0 and (sigmas[1:] < sigmas[:-1]).all()
    out = denoise(lambda x, t: eps - x0, eps.clone(), sigmas, step)
    # diffusers' flow sigmas start just below 1 (sigma_0 = shift(0.999) = 0.99967): the pure noise handed to the
    # solver is read as x at sigma_0, so the exact answer is x0 + (1 - sigma_0) (eps - x0), i.e. x0 to ~3e-4.
    sigma0 = float(step.scheduler.sigmas[0])
    assert 0.9996 < sigma0 < 1.0
    torch.testing.assert_close(out, x0 + (1 - sigma0) * (eps - x0), atol=1e-5, rtol=0)
    assert ((out - x0).abs() / (eps - x0).abs().clamp(min=1e-3)).max() < 5e-4


def test_dpm_scheduler_is_sanas():
    sched = dpm_solver_scheduler(3.0)
    c = sched.config
    assert c.prediction_type == "flow_prediction" and c.use_flow_sigmas and c.flow_shift == 3.0
    assert c.algorithm_type == "dpmsolver++" and c.solver_order == 2


def test_make_sampler_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        make_sampler("ddim", 10)


def _toy_velocity(calls):
    def velocity(x, t, cond):
        calls.append(x.shape[0])
        return x * cond[:, :1, :1, None] + t.view(-1, 1, 1, 1)

    return velocity


def test_guided_velocity_scale_one_uses_only_the_conditional_branch():
    calls = []
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.6])
    cond, uncond = torch.full((2, 5, 7), 2.0), torch.full((2, 5, 7), -1.0)
    v = guided_velocity(_toy_velocity(calls), cond, uncond, 1.0)(x, t)
    torch.testing.assert_close(v, 2 * x + t.view(-1, 1, 1, 1))
    assert calls == [2]


def test_guided_velocity_by_hand():
    calls = []
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0.3, 0.6])
    cond, uncond = torch.full((2, 5, 7), 2.0), torch.full((2, 5, 7), -1.0)
    v = guided_velocity(_toy_velocity(calls), cond, uncond, 4.5)(x, t)
    v_c, v_u = 2 * x + t.view(-1, 1, 1, 1), -x + t.view(-1, 1, 1, 1)
    torch.testing.assert_close(v, v_u + 4.5 * (v_c - v_u))  # = 12.5 x + t
    torch.testing.assert_close(v, 12.5 * x + t.view(-1, 1, 1, 1))
    assert calls == [4]  # one batched call for both branches
