"""Sampling: ONE denoising loop that takes a step function.

The loop walks a decreasing sigma schedule ``sigmas[0] = 1 -> sigmas[-1] = 0``, asks a velocity function for
``v`` at every step and hands ``(x, v, sigma, sigma_next)`` to a step function:

* :func:`euler_step` - deterministic flow Euler (used with :func:`flow_sigmas`, shift 3.0);
* :class:`SchedulerStep` - any diffusers scheduler, here SANA's DPM-Solver++ (flow prediction, shift 3.0);
* :class:`SDEStep` - Flow-GRPO's stochastic step with its log-probability (the RL rollout), with
  :func:`sde_step` as the pure function that both the rollout and the policy update call.

Classifier-free guidance is a wrapper around the velocity function (:func:`guided_velocity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .flow import NUM_TRAIN_TIMESTEPS, shift_sigmas

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepOutput:
    """What one step returns: the next sample, and for stochastic steps the Gaussian it was drawn from."""

    sample: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    log_prob: torch.Tensor | None = None


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], StepOutput]


def flow_sigmas(steps: int, shift: float = 3.0, device: torch.device | str | None = None) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0, uniformly spaced then shifted. Returns (steps + 1,) fp32.

    Computed in fp64 and rounded once, with the end points pinned: ``sigma[0]`` is exactly 1 and
    ``sigma[-1]`` exactly 0 for every shift (fp32 arithmetic gave 0.99999988 for some shifts, which the SDE
    step's ``sigma == 1`` case then missed).
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    return _pin_ends(sigmas, last_zero=True).to(device=device, dtype=torch.float32)


def flow_match_sigmas(
    steps: int, shift: float = 3.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The RL rollout's schedule: diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`` with
    ``shift`` and its 1000 training timesteps (Flow-GRPO's SD3 pipeline), then 0. Returns (steps + 1,) fp32.

    That scheduler spaces ``steps`` values uniformly from 1 down to its smallest *shifted* training sigma,
    ``shift(1/1000)``, and shifts them again, so the last sigma before 0 is small (0.0089 at shift 3). The
    last SDE step's noise ``eta sqrt(sigma / (1 - sigma)) sqrt(sigma)`` is then about 0.006 at eta 0.7,
    where :func:`flow_sigmas` (last sigma 0.25 at 10 steps) leaves noise of std about 0.2 in the image the
    rewards score.
    """
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    smallest = float(shift_sigmas(torch.tensor(1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift))
    sigmas = shift_sigmas(torch.linspace(1.0, smallest, steps, dtype=torch.float64), shift)
    sigmas = _pin_ends(torch.cat([sigmas, sigmas.new_zeros(1)]), last_zero=True)
    return sigmas.to(device=device, dtype=torch.float32)


def _pin_ends(sigmas: torch.Tensor, last_zero: bool) -> torch.Tensor:
    """``sigmas`` (N,) with ``sigmas[0] = 1`` exactly (shift maps 1 to 1) and, if asked, ``sigmas[-1] = 0``."""
    sigmas = sigmas.clone()
    sigmas[0] = 1.0
    if last_zero:
        sigmas[-1] = 0.0
    return sigmas


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> StepOutput:
    """x_next = x + (sigma_next - sigma) * v (flow ODE, fp32 arithmetic)."""
    return StepOutput((x.float() + (sigma_next - sigma) * v.float()).to(x.dtype))


def sde_noise_scale(sigma: torch.Tensor, eta: float, sigma_max: float) -> torch.Tensor:
    """Flow-GRPO's ``std_dev_t``: ``eta * sqrt(sigma / (1 - sigma'))``, ``sigma' = sigma_max`` when sigma is 1.

    sigma: a scalar fp32 tensor. This is the SDE's noise scale; one step's standard deviation is it times
    ``sqrt(-dt)``. Flow-GRPO's KL term divides by ``2 * std_dev_t**2``.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denom = 1 - torch.where(sigma >= 1, torch.as_tensor(sigma_max, device=sigma.device), sigma)
    return eta * torch.sqrt(sigma / denom)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    *,
    eta: float,
    sigma_max: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """Flow-GRPO's SDE step with the log-probability of its result, all in fp32 (docs/how-it-works.md, "Stage III").

    With ``dt = sigma_next - sigma < 0`` and ``s = eta * sqrt(sigma / (1 - sigma'))`` (``sigma' = sigma_max``
    when ``sigma == 1``, else ``sigma``)::

        mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
        x'   = mean + s sqrt(-dt) noise

    Args:
        x: (B, C, h, w) current sample; v: (B, C, h, w) velocity at (x, sigma).
        eta: noise level; 0 gives exactly the Euler step (and no log-probability).
        sigma_max: the schedule's second sigma, used in place of sigma = 1 (where 1 - sigma = 0).
        noise: (B, C, h, w) standard normal draw for the new sample (ignored when ``prev_sample`` is given).
        prev_sample: an already drawn x' whose log-probability is wanted (the policy update recomputes the
            rollout's log-probabilities this way).

    Returns:
        :class:`StepOutput` with ``sample`` x', ``mean``, ``std`` (the scalar step standard deviation
        ``s sqrt(-dt)``) and ``log_prob`` (B,): the Gaussian log-density of x', averaged over C, h, w.
    """
    x32, v32 = x.float(), v.float()
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device)
    dt = sigma_next - sigma
    if eta == 0:
        return StepOutput((x32 + dt * v32).to(x.dtype) if prev_sample is None else prev_sample)
    s = sde_noise_scale(sigma, eta, sigma_max)
    mean = x32 * (1 + s**2 / (2 * sigma) * dt) + v32 * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s * torch.sqrt(-dt)
    if prev_sample is None:
        if noise is None:
            raise ValueError("sde_step needs either noise (to draw x') or prev_sample (to score it)")
        prev = mean + std * noise.float()
    else:
        prev = prev_sample.float()
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return StepOutput(prev, mean=mean, std=std, log_prob=log_prob.mean(dim=tuple(range(1, x.dim()))))


class SDEStep:
    """The rollout's step function: :func:`sde_step` with per-image seeded noise.

    ``generators`` holds one ``torch.Generator`` per image, so an image's trajectory depends only on its own
    seed (not on the batch it was drawn in or the number of processes). ``stochastic`` (one flag per step,
    default all true) makes the unflagged steps deterministic Euler steps (log-probability 0): the SDE window
    of Flow-GRPO-Fast and MixGRPO, where only the window's steps explore and are trained.
    """

    def __init__(
        self,
        eta: float,
        sigma_max: float,
        generators: list[torch.Generator],
        stochastic: Sequence[bool] | None = None,
    ) -> None:
        self.eta = eta
        self.sigma_max = float(sigma_max)
        self.generators = generators
        self.stochastic = stochastic
        self.index = 0

    def __call__(
        self, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> StepOutput:
        # every step draws its noise, so an image's stream is the same whichever steps are stochastic
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators]).to(x.device)
        sde = self.stochastic is None or self.stochastic[self.index]
        self.index += 1
        if not sde:
            out = euler_step(x, v, sigma, sigma_next)
            return StepOutput(out.sample, log_prob=torch.zeros(x.shape[0], device=x.device))
        return sde_step(x, v, sigma, sigma_next, eta=self.eta, sigma_max=self.sigma_max, noise=noise)


class SchedulerStep:
    """Adapts a diffusers multistep scheduler (stateful) to the step-function interface.

    ``sigmas`` holds the times at which the model is evaluated: the scheduler's (integer) timesteps / 1000,
    exactly what ``SanaPipeline`` feeds the DiT, then 0. Build one per sampling call: ``set_timesteps``
    resets the scheduler's history.
    """

    def __init__(self, scheduler, steps: int, device: torch.device | str | None = None) -> None:
        self.scheduler = scheduler
        scheduler.set_timesteps(steps, device=device)
        times = scheduler.timesteps.to(device=device, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
        self.sigmas = torch.cat([times, times.new_zeros(1)])
        self._index = 0

    def __call__(
        self, x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
    ) -> StepOutput:
        t = self.scheduler.timesteps[self._index]
        self._index += 1
        return StepOutput(self.scheduler.step(v, t, x, return_dict=True).prev_sample)


def dpm_solver_scheduler(shift: float = 3.0):
    """SANA's sampler: DPM-Solver++ (2nd order, midpoint) with flow prediction and flow sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )


def _dpm_times_distinct(steps: int, shift: float, scheduler=None) -> bool:
    """Whether DPM-Solver++'s ``steps`` integer timesteps at ``shift`` are all different."""
    scheduler = scheduler or dpm_solver_scheduler(shift)
    scheduler.set_timesteps(steps)
    times = scheduler.timesteps
    return len(times) == steps and bool((times[1:] < times[:-1]).all())


def dpm_max_steps(shift: float = 3.0) -> int:
    """The most steps DPM-Solver++ takes at ``shift`` with every timestep distinct (350 at shift 3).

    Its timesteps are the shifted sigmas times 1000, rounded to integers: past this count two steps round to
    the same timestep (a wasted, wrong step) and past ~500 diffusers indexes beyond its sigma table.
    Duplicates, once they appear, stay for every larger count, so the bound is found by bisection.
    """
    scheduler = dpm_solver_scheduler(shift)
    lo, hi = 1, NUM_TRAIN_TIMESTEPS  # lo is valid; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _dpm_times_distinct(mid, shift, scheduler) else (lo, mid - 1)
    return lo


def check_dpm_steps(steps: int, shift: float = 3.0) -> None:
    """ValueError naming the bound when DPM-Solver++ cannot take ``steps`` distinct steps at ``shift``."""
    if not _dpm_times_distinct(steps, shift):
        raise ConfigError(
            f"steps={steps} is more than the DPM-Solver++ sampler takes at shift {shift:g} "
            f"(at most {dpm_max_steps(shift)}: beyond that two steps fall on the same timestep); "
            "use fewer steps or the euler sampler (--sampler euler / --sampling.sampler=euler)"
        )


def make_sampler(kind: str, steps: int, shift: float = 3.0, device=None) -> tuple[torch.Tensor, StepFn]:
    """``(sigmas, step_fn)`` for ``kind`` 'euler' or 'dpm'."""
    if kind == "euler":
        return flow_sigmas(steps, shift, device), euler_step
    if kind == "dpm":
        check_dpm_steps(steps, shift)
        step = SchedulerStep(dpm_solver_scheduler(shift), steps, device)
        return step.sigmas, step
    raise ConfigError(f"unknown sampler {kind!r}; choose 'dpm' or 'euler'")


def _cat(a, b):
    """Concatenate conditions on the batch axis: tensors, or tuples of tensors (e.g. embeddings + mask)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    return tuple(torch.cat([x, y], dim=0) for x, y in zip(a, b, strict=True))


def guided_velocity(velocity: Callable[..., torch.Tensor], cond, uncond, scale: float) -> VelocityFn:
    """Classifier-free guidance: ``v_u + scale * (v_c - v_u)`` from one batched call.

    velocity(x, t, cond) -> v; cond / uncond: (B, Q, C) tensors, or tuples of (B, ...) tensors.
    Scale 1 skips the unconditional branch.
    """
    if scale == 1.0:
        return lambda x, t: velocity(x, t, cond)
    both = _cat(cond, uncond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = velocity(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), both).chunk(2)
        return v_u + scale * (v_c - v_u)

    return fn


def sample(
    velocity: Callable[..., torch.Tensor],
    cond,
    uncond,
    noise: torch.Tensor,
    *,
    sampler: str = "dpm",
    steps: int = 20,
    shift: float = 3.0,
    cfg: float = 4.5,
) -> torch.Tensor:
    """Generate from ``noise`` (B, C, h, w) with CFG: the sampler's schedule and step through :func:`denoise`."""
    sigmas, step = make_sampler(sampler, steps, shift, device=noise.device)
    return denoise(guided_velocity(velocity, cond, uncond, cfg), noise, sigmas, step)


def denoise(
    velocity: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step: StepFn,
    progress: bool = False,
    record: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[StepOutput]]:
    """Integrate from ``sigmas[0]`` to ``sigmas[-1]``.

    Args:
        velocity: v = velocity(x, t) with t of shape (B,) in [0, 1].
        x: (B, C, H, W) initial noise.
        sigmas: (N + 1,) decreasing.
        step: the step function.
        record: also return every step's :class:`StepOutput` (the RL rollout keeps them).
    """
    outputs = []
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="denoising", leave=False):
        t = sigmas[i].expand(x.shape[0]).to(x.device)
        out = step(x, velocity(x, t), sigmas[i], sigmas[i + 1])
        x = out.sample
        if record:
            outputs.append(out)
    return (x, outputs) if record else x
