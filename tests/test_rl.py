"""Stage III: the SDE step, rollout / recomputation, advantages, the clipped loss, LDAM and a short RL run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from parauni.config import TrainableConfig
from parauni.diffusion.sampling import euler_step, flow_sigmas, sde_step
from parauni.rl.config import PhaseConfig, RLConfig
from parauni.rl.grpo import (
    LOG_FILE,
    MAX_BAD_STEPS,
    PolicyStep,
    PromptSource,
    _zone_positions,
    group_advantages,
    grpo_loss,
    rollout,
    train_rl,
)
from parauni.rl.ldam import LDAM, LDAMConfig, grad_norm_gate, ldam_gamma, perturbation_scale, reward_gate

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
    base = dict(
        phases=[PhaseConfig("p", {"bright": 1.0}, 2, "deep", 0.02)],
        prompts_per_epoch=2,
        group_size=2,
        steps=3,
        cfg=2.0,
        height=32,
        width=32,
        micro_batch=4,
        rollout_batch=4,
        trainable=TrainableConfig(queries=False, lim=False, dit=False, dit_lora_rank=4, dit_lora_alpha=8.0),
        save_every=0,
    )
    base.update(kw)
    return RLConfig(**base)


def _recomputed_log_probs(model, ro, cfg, zone):
    policy = PolicyStep(model, cfg, zone)
    policy._sigma_max = float(ro.sigmas[1])
    uncond = model.condition(model.encode_prompts([None]))
    batch = model.encode_prompts(ro.prompts)
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
    rows = [json.loads(line) for line in (tmp_path / "rl" / LOG_FILE).read_text().splitlines()]
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
    with pytest.raises(RuntimeError, match="RL updates in a row had a non-finite gradient"):
        train_rl(model, nan_reward, ["bright"], prompts, cfg, tmp_path, progress=False, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
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
