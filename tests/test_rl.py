"""Stage III: the SDE step, rollout / recomputation, advantages, the clipped loss, LDAM and a short RL run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_rl_config

from parauni.config import TrainableConfig
from parauni.diffusion.sampling import euler_step, flow_sigmas, sde_step
from parauni.errors import TrainingDiverged
from parauni.rl.config import PhaseConfig, RLConfig
from parauni.rl.grpo import MAX_BAD_STEPS, _zone_positions, train_rl
from parauni.rl.ldam import LDAM, LDAMConfig, grad_norm_gate, ldam_gamma, perturbation_scale, reward_gate
from parauni.rl.objective import PolicyStep, group_advantages, grpo_loss
from parauni.rl.prompts import PromptSource
from parauni.rl.rollout import PromptConditions, rollout
from parauni.utils.run_files import RL_LOG

# ------------------------------------------------------------------------------------------- SDE step


def test_sde_step_with_zero_noise_level_is_the_euler_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    sigmas = flow_sigmas(10, 3.0)
    for i in range(10):
        out = sde_step(x, v, sigmas[i], sigmas[i + 1], eta=0.0, sigma_max=float(sigmas[1]))
        assert torch.equal(out.sample, euler_step(x, v, sigmas[i], sigmas[i + 1]).sample)


def test_sde_step_log_prob_is_the_gaussian_density_of_the_sample():
    g = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    sigmas = flow_sigmas(10, 3.0)
    for i in (0, 4, 9):  # sigma == 1 uses sigma_max; the last step goes to 0
        out = sde_step(x, v, sigmas[i], sigmas[i + 1], eta=0.7, sigma_max=float(sigmas[1]), noise=noise)
        assert torch.isfinite(out.log_prob).all()
        expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.sample).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
        again = sde_step(
            x, v, sigmas[i], sigmas[i + 1], eta=0.7, sigma_max=float(sigmas[1]), prev_sample=out.sample
        )
        assert torch.equal(again.log_prob, out.log_prob)
    with pytest.raises(ValueError, match="noise"):
        sde_step(x, v, sigmas[1], sigmas[2], eta=0.7, sigma_max=0.9)


# ------------------------------------------------------------------------------------------- objective


def test_group_advantages_have_zero_mean_per_group_and_are_clipped():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 0.0, 5.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    for std in ("global", "group"):
        a = group_advantages(r, groups, std, clip=100.0)
        for g in range(3):
            assert abs(float(a[groups == g].sum())) < 1e-5
    a = group_advantages(r, groups, "global", clip=100.0)
    torch.testing.assert_close(a[:3], torch.tensor([-1.0, 0.0, 1.0]) / (r.std(unbiased=False) + 1e-4))
    assert torch.all(a[3:6] == 0)
    rare = torch.zeros(200)
    rare[0] = 1.0  # one success among 200: (1 - 0.5) / global std ~ 7 -> clipped to 5
    clipped = group_advantages(rare, torch.arange(200) // 2, "global", clip=5.0)
    assert float(clipped.max()) == 5.0 and float(clipped.min()) == -5.0


def test_clipped_loss_on_hand_computed_cases():
    eps = 0.2
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = grpo_loss(new, old, adv, eps)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2;  A<0, r=1.5: max(1.5, 1.2) = 1.5
    # A>0, r=0.5: max(-0.5, -0.8) = -0.5;  A<0, r=0.5: max(0.5, 0.8) = 0.8
    assert math.isclose(float(loss), (-1.2 + 1.5 - 0.5 + 0.8) / 4, rel_tol=1e-6)
    assert stats["clipfrac"] == 1.0 and stats["kl"] == 0.0
    mean, ref = torch.zeros(4, 1, 2, 2), torch.full((4, 1, 2, 2), 0.1)
    loss_kl, stats = grpo_loss(new, old, adv, eps, mean, ref, torch.tensor(0.5), beta=0.1)
    assert math.isclose(stats["kl"], 0.01 / (2 * 0.25), rel_tol=1e-5)
    assert math.isclose(float(loss_kl - loss), 0.1 * stats["kl"], rel_tol=1e-5)


# ------------------------------------------------------------------------------------------- LDAM


def test_gamma_formula():
    assert math.isclose(ldam_gamma([0.5, 0.4, 0.3], [1.0, 3.0, 2.0], 0.1), 0.1 * ((3 - 1) + (0.5 - 0.3)))
    assert ldam_gamma([], [], 0.1) == 0.0


def test_reward_gate_fires_on_consecutive_drops_only():
    assert reward_gate([5, 4, 3, 2, 1, 0], 5)
    assert not reward_gate([4, 3, 2, 1, 0], 5)  # too short
    assert not reward_gate([5, 4, 3, 3, 1, 0], 5)  # a flat epoch breaks the run
    assert not reward_gate([1, 2, 3, 4, 5, 6], 5)


def test_grad_norm_gate_fires_on_spikes_only():
    calm = [1.0, 1.1, 0.9, 1.0, 1.05]
    assert grad_norm_gate(calm + [3.0], 5, 2.0)
    assert not grad_norm_gate(calm + [1.1], 5, 2.0)
    assert not grad_norm_gate(calm, 5, 2.0)  # needs a full previous window


def _feed(ldam: LDAM, rewards, norms):
    return [ldam.update(r, g) for r, g in zip(rewards, norms, strict=True)]


def test_ldam_triggers_when_both_gates_fire_then_cools_down():
    cfg = LDAMConfig(window=5, drop_epochs=5, cooldown=5)
    ldam = LDAM(cfg, zone=[1, 2], num_layers=4)
    rewards = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    norms = [1.0, 1.1, 0.9, 1.0, 1.05, 4.0]
    states = _feed(ldam, rewards, norms)
    assert [s["triggered"] for s in states] == [False] * 5 + [True]
    assert ldam.active and ldam.gamma == pytest.approx(0.1 * ((4.0 - 0.9) + (0.9 - 0.5)))
    # the same stall continues: no new trigger while cooling (5 epochs), then one again
    more = _feed(ldam, [0.4, 0.3, 0.2, 0.1, 0.0, -0.1], [1.0, 1.0, 1.0, 1.0, 1.0, 9.0])
    assert [s["triggered"] for s in more] == [False] * 5 + [True]
    assert not more[0]["perturb_next"]  # one perturbed rollout per trigger by default


def test_ldam_gates_can_be_switched_off():
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    spike = [1.0, 1.1, 0.9, 1.0, 1.05, 4.0]
    falling = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    flat = [1.0] * 6
    only_grad = LDAM(LDAMConfig(reward_gate=False), [0], 2)
    assert _feed(only_grad, rising, spike)[-1]["triggered"]
    only_reward = LDAM(LDAMConfig(grad_gate=False), [0], 2)
    assert _feed(only_reward, falling, flat)[-1]["triggered"]
    both = LDAM(LDAMConfig(), [0], 2)
    assert not any(s["triggered"] for s in _feed(both, rising, spike))
    assert not any(s["triggered"] for s in _feed(LDAM(LDAMConfig(), [0], 2), falling, flat))
    off = LDAM(LDAMConfig(enabled=False), [], 2)
    assert not any(s["triggered"] for s in _feed(off, falling, spike))


def test_perturbation_scale_touches_only_the_zone():
    eps = torch.randn(2, 2, 3, 4)
    scale = perturbation_scale(eps, 0.5, [1, 3], 4)
    assert scale.shape == (2, 4, 3, 4)
    assert torch.all(scale[:, [0, 2]] == 1)
    torch.testing.assert_close(scale[:, [1, 3]], 1 + 0.5 * eps)
    assert perturbation_scale(None, 0.5, [1], 4) is None


# ------------------------------------------------------------------------------------------- rollout


def _rl_config(**kw) -> RLConfig:
    # the saved model is the policy itself (the EMA has its own tests)
    return tiny_rl_config(**{"ema": 0.0, **kw})


def _recomputed_log_probs(model, ro, cfg, zone):
    policy = PolicyStep(model, cfg, zone)
    assert policy.sigma_max == float(ro.sigmas[1])  # the rollout's SDE scale
    uncond = model.condition(model.encode_prompts([None]))
    batch = PromptConditions(batch=model.encode_prompts(ro.prompts))
    out = []
    with torch.no_grad():
        for j in range(cfg.steps):
            logp, _, _ = policy(
                batch,
                uncond,
                ro.latents[:, j],
                ro.latents[:, j + 1],
                ro.sigmas[j],
                ro.sigmas[j + 1],
                ro.ldam_eps,
                ro.gamma,
            )
            out.append(logp)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("with_ldam", [False, True])
def test_recomputed_log_probs_equal_the_rollout(make_tiny, with_ldam):
    model = make_tiny()
    cfg = _rl_config()
    items = [("a red circle", None), ("two squares", None)]
    ldam = None
    zone = _zone_positions(model, "deep")
    if with_ldam:
        ldam = LDAM(LDAMConfig(), zone, len(model.lim.layers))
        ldam.gamma, ldam.active_left = 0.3, 1
    groups = [0, 0, 1, 1]
    ro = rollout(model, [items[g] for g in groups], groups, [0, 1, 2, 3], cfg, epoch=0, ldam=ldam)
    assert ro.latents.shape[:2] == (4, cfg.steps + 1) and ro.log_probs.shape == (4, cfg.steps)
    assert (ro.ldam_eps is not None) == with_ldam
    recomputed = _recomputed_log_probs(model, ro, cfg, zone)
    assert torch.equal(recomputed, ro.log_probs)  # ratio exactly 1 on-policy
    if with_ldam:  # the stored noise matters: without it the log-probabilities differ
        ro.ldam_eps = torch.zeros_like(ro.ldam_eps)
        assert not torch.allclose(_recomputed_log_probs(model, ro, cfg, zone), ro.log_probs)


def test_rollout_is_independent_of_batching(make_tiny):
    model = make_tiny()
    items = [("a red circle", None)] * 4
    a = rollout(model, items, [0, 0, 1, 1], [0, 1, 2, 3], _rl_config(rollout_batch=4), 3, None)
    b = rollout(model, items[2:], [1, 1], [2, 3], _rl_config(rollout_batch=1), 3, None)
    torch.testing.assert_close(a.latents[2:], b.latents, rtol=1e-4, atol=1e-4)


def _bright(images, prompts, metadata):
    return {"bright": images.mean(dim=(1, 2, 3)).tolist(), "dark": (-images.mean(dim=(1, 2, 3))).tolist()}


def test_short_rl_run_changes_the_trained_parameters_and_nothing_else(make_tiny, tmp_path):
    model = make_tiny()
    cfg = _rl_config(
        phases=[
            PhaseConfig("bright", {"bright": 1.0}, 2, "middle", 0.02),
            PhaseConfig("dark", {"dark": 1.0}, 1, "deep", 0.0),
        ],
        ldam=LDAMConfig(window=2, drop_epochs=1, grad_gate=False),
        save_every=1,
        lr=1e-3,
    )
    model.set_trainable(cfg.trainable)  # attaches the LoRA; train_rl keeps it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    prompts = PromptSource([("a red circle", None), ("a blue square", None), ("two crosses", None)])
    result = train_rl(
        model, _bright, ["bright", "dark"], prompts, cfg, tmp_path / "rl", progress=False, log=lambda *a: None
    )
    rows = [json.loads(line) for line in (tmp_path / "rl" / RL_LOG).read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["bright", "bright", "dark"]
    for key in (
        "reward_bright",
        "reward_dark",
        "grad_norm",
        "kl",
        "clipfrac",
        "ratio_mean",
        "ldam_reward_gate",
        "ldam_gamma",
    ):
        assert key in rows[0]
    assert {n for n, _ in model.named_parameters()} == set(before)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert (result.model_dir / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "rl" / "checkpoints").glob("epoch_*"))  # kept checkpoints


def test_rl_resume_continues_exactly(make_tiny, tmp_path):
    cfg = _rl_config(
        phases=[PhaseConfig("p", {"bright": 1.0}, 3, "deep", 0.02)], save_every=1, keep_last=5, lr=1e-3
    )
    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    full = make_tiny()
    train_rl(full, _bright, ["bright"], prompts, cfg, tmp_path / "full", progress=False, log=lambda *a: None)
    part = make_tiny()
    short = _rl_config(
        phases=[PhaseConfig("p", {"bright": 1.0}, 3, "deep", 0.02)], save_every=1, keep_last=5, lr=1e-3
    )
    train_rl(
        part, _bright, ["bright"], prompts, short, tmp_path / "part", progress=False, log=lambda *a: None
    )
    # drop the last epoch's result: resume from the epoch-2 checkpoint (epochs 0, 1 done)
    import shutil

    for ckpt in sorted((tmp_path / "part" / "checkpoints").glob("epoch_*"))[1:]:
        shutil.rmtree(ckpt)
    resumed = make_tiny()
    train_rl(
        resumed,
        _bright,
        ["bright"],
        prompts,
        short,
        tmp_path / "part",
        resume=True,
        progress=False,
        log=lambda *a: None,
    )
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if "lora_" in n:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rl_config_errors():
    with pytest.raises(ValueError, match="group_size"):
        _rl_config(group_size=1)
    with pytest.raises(ValueError, match="trains nothing"):
        _rl_config(trainable=TrainableConfig(queries=False, lim=False, dit=False))
    with pytest.raises(ValueError, match="zone"):
        PhaseConfig("x", {"clip": 1.0}, 1, "top", 0.0)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_update_is_exactly_on_policy_in_the_training_loop(make_tiny, tmp_path, precision):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a process-wide singleton
    cfg = _rl_config(updates_per_epoch=1, micro_batch=4, rollout_batch=4, mixed_precision=precision)
    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    result = train_rl(
        make_tiny(),
        _bright,
        ["bright", "dark"],
        prompts,
        cfg,
        tmp_path,
        progress=False,
        log=lambda *a: None,
        accelerator=Accelerator(mixed_precision=precision),
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    for row in result.history:
        assert row["ratio_min"] == row["ratio_max"] == 1.0 and row["clipfrac"] == 0.0


def test_rl_skips_non_finite_updates_logs_them_and_stops(make_tiny, tmp_path):
    model = make_tiny()
    cfg = _rl_config(phases=[PhaseConfig("p", {"bright": 1.0}, 5, "deep", 0.02)], updates_per_epoch=2)
    model.set_trainable(cfg.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def nan_reward(images, prompts, metadata):
        return {"bright": [float("nan")] * len(prompts)}

    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    with pytest.raises(TrainingDiverged, match="RL updates in a row had a non-finite gradient"):
        train_rl(model, nan_reward, ["bright"], prompts, cfg, tmp_path, progress=False, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / RL_LOG).read_text().splitlines()]
    # two updates an epoch, all skipped: the run stops after the epoch that reaches MAX_BAD_STEPS
    assert [r["skipped_updates"] for r in rows] == [2] * math.ceil(MAX_BAD_STEPS / 2)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_rl_with_activation_checkpointing_stays_on_policy(make_tiny, tmp_path):
    model = make_tiny()
    cfg = _rl_config(
        phases=[PhaseConfig("p", {"bright": 1.0}, 1, "deep", 0.02)],
        updates_per_epoch=1,  # one update: its ratios are on-policy
        activation_checkpointing=True,
    )
    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    result = train_rl(model, _bright, ["bright"], prompts, cfg, tmp_path, progress=False, log=lambda *a: None)
    assert model.dit.gradient_checkpointing and model.lim.connector.gradient_checkpointing
    assert result.history[0]["ratio_min"] == result.history[0]["ratio_max"] == 1.0
    assert result.history[0]["skipped_updates"] == 0


# ------------------------------------------------------------------ issue 15: Flow-GRPO's KL, schedule, groups


def test_kl_term_divides_by_flow_grpos_std_computed_from_sigma_and_eta():
    """The KL scale is eta sqrt(sigma / (1 - sigma)) (Flow-GRPO's std_dev_t), not the step std."""
    from parauni.rl.objective import kl_std

    eta, sigma, sigma_next, sigma_max = 0.7, 0.6, 0.45, 0.95
    mean, ref = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.05)
    zero = torch.zeros(2)
    std = kl_std(torch.tensor(sigma), torch.tensor(sigma_next), eta, sigma_max)
    _, stats = grpo_loss(zero, zero, zero, 1e-4, mean, ref, std, beta=0.04)
    hand = 0.05**2 / (2 * (eta * math.sqrt(sigma / (1 - sigma))) ** 2)  # = 0.0025 / 1.47
    assert stats["kl"] == pytest.approx(hand, rel=1e-5)
    step = kl_std(torch.tensor(sigma), torch.tensor(sigma_next), eta, sigma_max, "step")
    _, exact = grpo_loss(zero, zero, zero, 1e-4, mean, ref, step, beta=0.04)
    assert exact["kl"] == pytest.approx(hand / (sigma - sigma_next), rel=1e-5)  # 1/|dt| times stronger
    # sigma = 1 uses the schedule's second sigma in place of 1 - sigma
    first = kl_std(torch.tensor(1.0), torch.tensor(0.9), eta, sigma_max)
    assert float(first) == pytest.approx(eta * math.sqrt(1 / (1 - sigma_max)), rel=1e-6)


def test_policy_step_hands_the_kl_flow_grpos_std(make_tiny):
    model = make_tiny()
    cfg = _rl_config()
    items = [("a red circle", None)] * 2
    ro = rollout(model, items, [0, 0], [0, 1], cfg, epoch=0, ldam=None)
    policy = PolicyStep(model, cfg, [])
    assert policy.sigma_max == float(ro.sigmas[1])  # the rollout's SDE scale
    uncond = model.condition(model.encode_prompts([None]))
    src = PromptConditions(batch=model.encode_prompts(ro.prompts))
    for j in range(cfg.steps):
        sigma = float(ro.sigmas[j])
        with torch.no_grad():
            _, _, std = policy(src, uncond, ro.latents[:, j], ro.latents[:, j + 1], ro.sigmas[j],
                               ro.sigmas[j + 1], None, 0.0)  # fmt: skip
        inner = float(ro.sigmas[1]) if sigma == 1.0 else sigma
        assert float(std) == pytest.approx(cfg.eta * math.sqrt(sigma / (1 - inner)), rel=1e-5)


def test_rewarded_image_is_nearly_noise_free_at_the_default_rollout_schedule():
    """The last SDE step (never trained) adds noise to the image the rewards score: std < 0.01."""
    from parauni.rl.rollout import rollout_sigmas

    def residual_std(cfg: RLConfig) -> float:
        sigmas = rollout_sigmas(cfg)
        x = torch.zeros(4000, 1, 4, 4)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        out = sde_step(x, x, sigmas[-2], sigmas[-1], eta=cfg.eta, sigma_max=float(sigmas[1]), noise=noise)
        return float((out.sample - out.mean).std())

    default = RLConfig()
    assert default.schedule == "flow_match" and default.steps == 10 and default.shift == 3.0
    assert residual_std(default) < 0.01
    assert residual_std(RLConfig(schedule="uniform")) > 0.1  # the Euler schedule's 0.25 -> 0 step: ~0.2


def test_reference_schedule_matches_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from parauni.diffusion.sampling import flow_match_sigmas

    for steps, shift in ((10, 3.0), (20, 3.0), (4, 1.0), (7, 2.5)):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        ref.set_timesteps(steps)
        torch.testing.assert_close(flow_match_sigmas(steps, shift), ref.sigmas.float(), rtol=0, atol=1e-6)
    s = flow_match_sigmas(10, 3.0)
    assert float(s[-2]) == pytest.approx(0.008929, abs=1e-6) and float(s[-3]) == pytest.approx(
        0.27805, abs=1e-4
    )


def test_first_sigma_is_exactly_one_for_any_steps_and_shift():
    from parauni.diffusion.sampling import flow_match_sigmas

    rng = torch.Generator().manual_seed(0)
    steps = torch.randint(1, 60, (2000,), generator=rng)
    shifts = 0.1 + 9.9 * torch.rand(2000, generator=rng, dtype=torch.float64)
    for n, shift in zip(steps.tolist(), shifts.tolist(), strict=True):
        for make in (flow_sigmas, flow_match_sigmas):
            s = make(n, shift)
            assert s[0].item() == 1.0 and s[-1].item() == 0.0, (make.__name__, n, shift)
            assert bool((s[1:] < s[:-1]).all())


def test_groups_are_formed_by_prompt_text():
    from parauni.rl.grpo import prompt_groups

    groups = prompt_groups(["a", "a", "b", "b", "a", "a", "c", "c"])
    assert groups.tolist() == [0, 0, 1, 1, 0, 0, 2, 2]
    r = torch.tensor([1.0, 2.0, 5.0, 7.0, 3.0, 4.0, 0.0, 1.0])
    adv = group_advantages(r, groups, "global", clip=100.0)
    # "a" is one group of four: its mean is 2.5, not 1.5 and 3.5 as two groups by index would have
    torch.testing.assert_close(adv[[0, 1, 4, 5]], (r[[0, 1, 4, 5]] - 2.5) / (r.std(unbiased=False) + 1e-4))


def test_zero_advantage_samples_are_dropped_with_equal_counts_per_process():
    from parauni.rl.grpo import update_samples

    adv = torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0])  # process 0: 2 kept, process 1: 1 kept
    g = torch.Generator().manual_seed(0)
    assert update_samples(adv, 4, 0, True, g) == [1, 2]
    one = update_samples(adv, 4, 1, True, g)
    assert len(one) == 2 and 3 in one  # topped up with one of its zero-advantage samples
    assert update_samples(adv, 4, 0, False, g) == [0, 1, 2, 3]
    assert update_samples(torch.zeros(8), 4, 0, True, g) == []
    assert update_samples(torch.tensor([float("nan")] * 4), 4, 0, True, g) == [0, 1, 2, 3]


def test_rl_optimiser_defaults_are_the_papers_and_cosine_reaches_zero():
    from parauni.rl.grpo import _lr

    cfg = _rl_config(phases=[PhaseConfig("p", {"bright": 1.0}, 4, "deep", 0.0)], updates_per_epoch=2)
    assert cfg.betas == [0.9, 0.95] and cfg.weight_decay == 0.05 and cfg.lr_schedule == "cosine"
    lrs = [_lr(cfg, e, 0, u) for e in range(4) for u in range(2)]
    assert lrs[0] == cfg.lr and all(b < a for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    assert lrs[-1] == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    flat = _rl_config(lr_schedule="constant")
    assert _lr(flat, 1, 0, 1) == flat.lr


# ------------------------------------------------------------------ issue 15: LDAM per round, cooling


@pytest.mark.parametrize("cooldown", [0, 1, 2, 5])
def test_ldam_cooling_blocks_exactly_n_epochs(cooldown):
    """A gate open every round: triggers come every cooldown + 1 rounds, i.e. cooldown rounds blocked."""
    cfg = LDAMConfig(window=2, drop_epochs=1, grad_gate=False, cooldown=cooldown)
    ldam = LDAM(cfg, [0], 2)
    states = _feed(ldam, [-float(i) for i in range(20)], [1.0] * 20)  # the reward falls every round
    fired = [i for i, s in enumerate(states) if s["triggered"]]
    assert all(s["reward_gate"] for s in states[1:])
    assert fired == list(range(1, 20, cooldown + 1))


def test_ldam_drop_streak_counts_consecutive_drops_per_round():
    ldam = LDAM(LDAMConfig(drop_epochs=3, grad_gate=False, cooldown=0), [0], 2)
    states = _feed(ldam, [5, 4, 3, 3.5, 3, 2, 1, 0], [1.0] * 8)
    assert [s["drop_streak"] for s in states] == [0, 1, 2, 0, 1, 2, 3, 4]
    assert [s["triggered"] for s in states] == [False] * 6 + [True, True]
    assert states[-1]["zone"] == ""
    named = LDAM(LDAMConfig(), [0], 2, zone_name="deep")
    assert named.update(1.0, 1.0)["zone"] == "deep"


def test_ldam_gate_logic_any_fires_on_either_gate():
    spike = [1.0, 1.1, 0.9, 1.0, 1.05, 4.0]
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    either = LDAM(LDAMConfig(gate_logic="any"), [0], 2)
    assert _feed(either, rising, spike)[-1]["triggered"]
    with pytest.raises(ValueError, match="gate_logic"):
        LDAMConfig(gate_logic="both")


def test_ldam_state_round_trips_with_the_drop_streak():
    a = LDAM(LDAMConfig(drop_epochs=2, grad_gate=False), [0], 2)
    _feed(a, [3.0, 2.0, 1.0], [1.0] * 3)
    b = LDAM(LDAMConfig(drop_epochs=2, grad_gate=False), [0], 2)
    b.load_state_dict(a.state_dict())
    assert b.drop_streak == a.drop_streak == 2
    old = {k: v for k, v in a.state_dict().items() if k != "drop_streak"}  # a checkpoint from before
    c = LDAM(LDAMConfig(drop_epochs=2, grad_gate=False), [0], 2)
    c.load_state_dict(old)
    assert c.drop_streak == 2


# ------------------------------------------------------------------ issue 15: conditions once per epoch


def _count_vlm_calls(model) -> list[int]:
    calls: list[int] = []
    inner = model.vlm.query_states

    def counted(batch, queries):
        calls.append(batch.input_ids.shape[0])
        return inner(batch, queries)

    model.vlm.query_states = counted
    return calls


@pytest.mark.parametrize("train_lim", [False, True])
def test_cached_conditions_leave_the_log_probs_unchanged(make_tiny, train_lim):
    from parauni.rl.grpo import ConditionCache

    model = make_tiny()
    model.set_trainable(TrainableConfig(queries=False, lim=train_lim, dit=False, dit_lora_rank=4))
    cfg = _rl_config(rollout_batch=6)  # the recomputation below is one batch of 6 too
    items = [("a red circle", None), ("two squares", None), ("a red circle", None)]
    groups = [0, 0, 1, 1, 2, 2]
    zone = _zone_positions(model, "deep")
    ldam = LDAM(LDAMConfig(), zone, len(model.lim.layers))
    ldam.gamma, ldam.active_left = 0.3, 1
    calls = _count_vlm_calls(model)
    plain = rollout(model, [items[g] for g in groups], groups, list(range(6)), cfg, 0, ldam)
    # without the cache the VLM still runs once per distinct prompt of a batch (ParaUni.condition) + uncond
    assert sum(calls) == 2 + 1
    calls.clear()
    cache = ConditionCache(model, [items[g][0] for g in groups], 1)  # the VLM on one prompt at a time
    cached = rollout(model, [items[g] for g in groups], groups, list(range(6)), cfg, 0, ldam, cache=cache)
    assert sum(calls) == 2 + 1 and cache.vlm_forwards == 3  # one forward per distinct prompt + uncond
    assert cache.frozen_lim == (not train_lim)
    torch.testing.assert_close(cached.log_probs, plain.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.latents, plain.latents, rtol=1e-5, atol=1e-6)
    # the update's recomputation from the cache gives the rollout's log-probabilities exactly
    policy = PolicyStep(model, cfg, zone)
    assert policy.sigma_max == float(cached.sigmas[1])  # the rollout's SDE scale
    src = cache.select(cached.prompts)
    for j in range(cfg.steps):
        with torch.no_grad():
            logp, _, _ = policy(src, cache.uncond, cached.latents[:, j], cached.latents[:, j + 1],
                                cached.sigmas[j], cached.sigmas[j + 1], cached.ldam_eps, cached.gamma)  # fmt: skip
        assert torch.equal(logp, cached.log_probs[:, j])


def test_rl_epoch_runs_the_vlm_once_per_prompt(make_tiny, tmp_path):
    model = make_tiny()
    calls = _count_vlm_calls(model)
    cfg = _rl_config(phases=[PhaseConfig("p", {"bright": 1.0}, 1, "deep", 0.02)], updates_per_epoch=1)
    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    result = train_rl(model, _bright, ["bright"], prompts, cfg, tmp_path, progress=False, log=lambda *a: None)
    assert sum(calls) == 2 + 1 and result.history[0]["cached_conditions"]
    assert result.history[0]["ratio_min"] == result.history[0]["ratio_max"] == 1.0


def test_trigger_summary_and_plot_mark_each_trigger_with_its_zone(tmp_path):
    from parauni.rl.plots import plot_reward_curves, trigger_summary

    rows = [
        {"epoch": i, "phase": "a" if i < 3 else "b", "phase_reward": 0.1 * i, "reward_x": 0.1 * i}
        for i in range(6)
    ]
    rows[1].update(ldam_triggered=True, ldam_zone="middle")
    rows[4].update(ldam_triggered=True, ldam_zone="deep")
    assert trigger_summary(rows) == "2 (middle at epoch 1; deep at epoch 4)"
    assert trigger_summary(rows[:1]) == "0"
    assert plot_reward_curves({"run": rows}, tmp_path / "c.png").is_file()


def test_configuration_reference_shows_the_rl_trainable_defaults():
    from parauni.config_reference import reference_markdown

    text = reference_markdown()
    assert "| `rl.trainable.queries` | `bool` | `False` |" in text
    assert "| `rl.trainable.dit_lora_rank` | `int` | `32` |" in text
