"""Stage III's options of issues 26 and 29: the EMA's schedule, per-reward LDAM monitoring and its combined
perturbation, and the short RL runs that use them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_rl_config

from parauni.config import ConfigError, TrainableConfig
from parauni.errors import DataError
from parauni.rl.config import PhaseConfig, RLConfig
from parauni.rl.grpo import _phase_ldams, _zone_positions, ema_decay, train_rl
from parauni.rl.ldam import LDAM, PAPER_REWARD_ZONES, LDAMConfig, Perturbation, perturbation_scale
from parauni.rl.prompts import PromptSource
from parauni.utils.run_files import RL_LOG


def _cfg(**kw) -> RLConfig:
    return tiny_rl_config(
        **{"phases": [PhaseConfig("p", {"bright": 1.0, "dark": 0.5}, 2, "deep", 0.02)], **kw}
    )


def _bright(images, prompts, metadata):
    return {"bright": images.mean(dim=(1, 2, 3)).tolist(), "dark": (-images.mean(dim=(1, 2, 3))).tolist()}


# ------------------------------------------------------------------------------------------- EMA
def test_ema_defaults_are_flow_grpos():
    c = RLConfig()
    assert (c.ema, c.ema_every) == (0.9, 8)


def test_ema_decay_every_nth_step_ramped_as_flow_grpo():
    c = _cfg(ema=0.9, ema_every=8)
    assert [ema_decay(c, s) for s in range(7)] == [None] * 7
    assert ema_decay(c, 7) == pytest.approx(8 / 17)
    assert ema_decay(c, 799) == pytest.approx(0.9)
    assert all(ema_decay(_cfg(ema=0.0), s) is None for s in range(20))
    every = _cfg(ema=0.5, ema_every=1)
    assert ema_decay(every, 0) == pytest.approx(0.1) and ema_decay(every, 100) == 0.5
    with pytest.raises(ConfigError, match="ema_every"):
        _cfg(ema_every=0)


def test_the_saved_model_is_the_ema(make_tiny, tmp_path):
    """ema_every=1, decay ramped from 0.1: the saved weights lie between the initial and the trained policy."""
    model = make_tiny()
    cfg = _cfg(ema=0.5, ema_every=1, lr=1e-2, ldam=LDAMConfig(enabled=False))
    model.set_trainable(cfg.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    policy = {}

    import parauni.rl.grpo as grpo

    save = grpo.save_model

    def keep_policy(acc, m, folder, values=None):
        policy.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return save(acc, m, folder, values)

    grpo.save_model = keep_policy
    try:
        train_rl(model, _bright, ["bright", "dark"], PromptSource([("a red circle", None)] * 2), cfg,
                 tmp_path / "rl", progress=False, log=lambda *a: None)  # fmt: skip
    finally:
        grpo.save_model = save
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    moved = [n for n in saved if not torch.equal(policy[n], before[n])]
    assert moved
    assert any(not torch.equal(saved[n], policy[n]) for n in moved)  # the EMA, not the policy


# ------------------------------------------------------------------------------------------- LDAM monitors
def test_ldam_monitor_and_reward_zones_are_checked():
    assert LDAMConfig().monitor == "reward" and LDAMConfig().reward_zones == PAPER_REWARD_ZONES
    with pytest.raises(ConfigError, match="monitor"):
        LDAMConfig(monitor="both")
    with pytest.raises(ConfigError, match="reward_zones"):
        _cfg(ldam=LDAMConfig(reward_zones={"clip": "deepest"}))


def test_per_reward_ldams_watch_their_own_zone(make_tiny):
    model = make_tiny()
    phase = PhaseConfig("p", {"aesthetic": 1.0, "clip": 1.0, "custom": 1.0}, 2, "shallow", 0.0)
    per_reward = _phase_ldams(model, _cfg(phases=[phase]), phase)
    assert list(per_reward) == ["aesthetic", "clip", "custom"]
    assert per_reward["aesthetic"].zone == _zone_positions(model, "middle")
    assert per_reward["clip"].zone == _zone_positions(model, "deep")
    assert per_reward["custom"].zone_name == "shallow"  # not in reward_zones: its phase's zone
    combined = _phase_ldams(model, _cfg(phases=[phase], ldam=LDAMConfig(monitor="phase")), phase)
    assert list(combined) == ["phase"] and combined["phase"].zone == _zone_positions(model, "shallow")


def _active(zone: list[int], gamma: float) -> LDAM:
    ldam = LDAM(LDAMConfig(), zone, 6)
    ldam.gamma, ldam.active_left = gamma, 1
    return ldam


def test_perturbation_of_one_ldam_is_that_ldams():
    one = _active([3, 4], 0.3)
    p = Perturbation([one, LDAM(LDAMConfig(), [0, 1], 6)])
    assert p.active and p.zone == [3, 4] and p.gamma == 0.3
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    gens2 = [torch.Generator().manual_seed(i) for i in range(2)]
    torch.testing.assert_close(p.noise((2, 6, 3, 4), gens), one.noise((2, 6, 3, 4), gens2))
    assert not Perturbation([LDAM(LDAMConfig(), [0], 6)]).active


def test_perturbation_of_overlapping_ldams_adds_their_variances():
    p = Perturbation([_active([2, 3], 0.3), _active([3, 4], 0.4)])
    assert p.zone == [2, 3, 4]
    torch.testing.assert_close(p.gamma, torch.tensor([0.3, 0.5, 0.4]))
    assert p.gamma_max == pytest.approx(0.5)
    eps = torch.randn(2, 3, 5, 7)
    scale = perturbation_scale(eps, p.gamma, p.zone, 6)
    torch.testing.assert_close(scale[:, 3], 1 + 0.5 * eps[:, 1])
    assert torch.all(scale[:, [0, 1, 5]] == 1)


@pytest.mark.parametrize("monitor", ["reward", "phase"])
def test_short_run_logs_each_monitor_and_resumes(make_tiny, tmp_path, monitor):
    ldam = LDAMConfig(window=2, drop_epochs=1, grad_gate=False, monitor=monitor,
                      reward_zones={"bright": "middle", "dark": "deep"})  # fmt: skip
    cfg = _cfg(
        ldam=ldam, save_every=1, phases=[PhaseConfig("p", {"bright": 1.0, "dark": 0.5}, 3, "deep", 0.02)]
    )
    prompts = PromptSource([("a red circle", None), ("a blue square", None)])
    model = make_tiny()
    result = train_rl(model, _bright, ["bright", "dark"], prompts, cfg, tmp_path / "rl", progress=False,
                      log=lambda *a: None)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "rl" / RL_LOG).read_text().splitlines()]
    signals = ["bright", "dark"] if monitor == "reward" else ["phase"]
    assert list(result.ldam[0]) == signals
    assert "ldam_triggered" in rows[0] and "ldam_triggers" in rows[0]
    if monitor == "reward":
        assert {"ldam_bright_triggered", "ldam_dark_drop_streak"} <= set(rows[0])
        assert rows[-1]["ldam_triggers"] == sum(s["triggers"] for s in result.ldam[0].values())
    # resume from the epoch-1 checkpoint: the same log as the uninterrupted run
    (tmp_path / "rl" / "model.safetensors").unlink()
    again = train_rl(make_tiny(), _bright, ["bright", "dark"], prompts, cfg, tmp_path / "rl", resume=True,
                     progress=False, log=lambda *a: None)  # fmt: skip
    assert [r["ldam_triggers"] for r in again.history] == [r["ldam_triggers"] for r in rows]


# ------------------------------------------------------------------------------------------- defaults
def test_default_run_is_the_papers_2000_steps():
    c = RLConfig()
    assert c.total_epochs * c.inner_epochs * c.updates_per_epoch == 2000
    assert [p.beta for p in c.phases] == [0.01, 0.02]  # Flow-GRPO's PickScore and CLIP-score betas


@pytest.mark.parametrize("decay_1d", [True, False])
def test_weight_decay_reaches_1d_tensors_by_default(make_tiny, tmp_path, decay_1d):
    """The full DiT has 1-D tensors (norms, biases): decayed as the paper's AdamW and Flow-GRPO's, unless not."""
    model = make_tiny()
    trainable = TrainableConfig(queries=False, lim=False, dit=True, dit_lora_rank=0)
    cfg = _cfg(trainable=trainable, lr=0.0, weight_decay=0.5, decay_1d=decay_1d, ema=0.0,
               ldam=LDAMConfig(enabled=False), lr_schedule="constant")  # fmt: skip
    model.set_trainable(trainable)
    one_d = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.dim() == 1}
    assert one_d
    # lr 0: AdamW's decay is lr * wd, so nothing moves; check the optimizer's groups instead
    import parauni.rl.grpo as grpo

    seen = {}
    adamw = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = groups
        return adamw(groups, **kw)

    grpo.torch.optim.AdamW = spy
    try:
        train_rl(model, _bright, ["bright", "dark"], PromptSource([("a red circle", None)]), cfg, tmp_path / "rl",
                 progress=False, log=lambda *a: None)  # fmt: skip
    finally:
        grpo.torch.optim.AdamW = adamw
    decays = {id(p): g["weight_decay"] for g in seen["groups"] for p in g["params"]}
    params = dict(model.named_parameters())
    assert {decays[id(params[n])] for n in one_d} == ({0.5} if decay_1d else {0.0})


# ------------------------------------------------------------------------------------------- plots, world recipe
def test_reward_rises_judge_each_optimised_reward_against_its_standard_error():
    from parauni.rl.plots import reward_rises, rise_verdict

    # phase p optimises a (rises by 1.0 an epoch, SE 0.5 per epoch mean) and b (by 0.033, the same SE)
    rows = [
        {
            "phase": "p",
            "reward_a": 1.0 + i,
            "reward_a_std": 2.0,
            "reward_b": 1.0 + i / 30,
            "reward_b_std": 2.0,
            "samples": 16,
        }
        for i in range(4)
    ] + [{"phase": "q", "reward_a": 9.0, "reward_a_std": 2.0, "samples": 16}]
    rises = reward_rises(rows, {"p": ["a", "b"], "q": ["a"], "absent": ["a"]})
    assert set(rises) == {"p", "q"}
    a = rises["p"]["a"]
    assert a["start"] == pytest.approx(1.5) and a["end"] == pytest.approx(3.5)
    assert a["se"] == pytest.approx(
        0.5
    )  # each side a mean of two epochs with SE 0.5: 0.354, and sqrt(2) x that
    assert rise_verdict(a) == "rose"  # 2.0 > 2 x 0.5
    assert rise_verdict(a, sigmas=5.0) == "within noise"
    assert rise_verdict(rises["p"]["b"]) == "within noise"  # 0.067
    assert rise_verdict({"start": 1.0, "end": 0.0, "se": 0.1}) == "fell"
    short = reward_rises(rows[:3], {"p": ["a"]})["p"]["a"]  # 3 epochs: the first against the last
    from parauni.rl.plots import phase_gains

    assert phase_gains([{**r, "phase_reward": r["reward_a"]} for r in rows[:2]]) == {"p": (1.0, 2.0)}
    assert (short["start"], short["end"]) == (1.0, 3.0) and short["se"] == pytest.approx(0.5 * 2**0.5)
    no_std = reward_rises([{k: v for k, v in r.items() if k != "samples"} for r in rows], {"p": ["a"]})
    assert rise_verdict(no_std["p"]["a"]) == "rose (noise unknown)"


def test_standard_errors_of_the_epoch_means():
    from parauni.rl.plots import standard_errors

    rows = [
        {"epoch": i, "phase": "p", "reward_a": 1.0 + i, "reward_a_std": 2.0, "samples": 16} for i in range(3)
    ]
    assert standard_errors(rows, "a") == [0.5, 0.5, 0.5]
    assert standard_errors([{k: v for k, v in r.items() if k != "samples"} for r in rows], "a") is None
    # the standard error over prompts, where the log has it, comes first
    assert standard_errors([{**r, "se_reward_a": 0.9} for r in rows], "a") == [0.9, 0.9, 0.9]


def test_prompt_standard_error_counts_each_prompt_group_once():
    from parauni.rl.objective import prompt_standard_error

    rewards = torch.tensor([1.0, 1.0, 3.0, 3.0])  # two prompts, two images each, alike within a prompt
    assert prompt_standard_error(rewards, 2) == pytest.approx(1.0)  # std of (1, 3) = sqrt(2), / sqrt(2)
    assert rewards.std(unbiased=False) / 4**0.5 == pytest.approx(0.5)  # per image: half the prompts' figure
    assert prompt_standard_error(rewards, 4) != prompt_standard_error(rewards, 4)  # one prompt: NaN
    pytest.importorskip("matplotlib")


def test_world_geneval_recipe_optimises_the_credit_alone():
    from parauni.world.config import world_rl_defaults
    from parauni.world.rl import world_geneval_rl

    base = world_rl_defaults()
    recipe = world_geneval_rl(base)
    assert [list(p.rewards) for p in recipe.phases] == [["geneval"]]
    assert recipe.trainable.dit and recipe.trainable.dit_lora_rank == 0
    assert not recipe.ldam.enabled and base.ldam.enabled  # the base is not changed
    assert recipe.samples_per_epoch == 128 and recipe.train_steps == 5 and recipe.phases[0].beta == 0
    assert recipe.objective == "grpo" and recipe.eta > 0  # Flow-GRPO's SDE, from the nft curriculum too


def test_world_nft_recipe_is_the_credit_recipe_with_diffusionnft_and_ode_rollouts():
    from parauni.world.config import world_paper_rl, world_rl_defaults
    from parauni.world.rl import RECIPES, world_geneval_rl

    base = world_rl_defaults()
    recipe = RECIPES["nft"](base)
    assert recipe.objective == "nft" and recipe.eta == 0 and recipe.stochastic_steps == [False] * recipe.steps
    assert [list(p.rewards) for p in recipe.phases] == [["geneval"]] and not recipe.ldam.enabled
    assert recipe.trainable == world_geneval_rl(base).trainable and world_geneval_rl(base).objective == "grpo"
    assert RECIPES["demo"](base) is base and RECIPES["geneval"](base) == world_geneval_rl(base)
    # the credit recipes are the same from either world curriculum
    for name in ("geneval", "nft"):
        assert RECIPES[name](base) == RECIPES[name](world_paper_rl())


def test_world_rl_recipe_is_the_base_that_rl_overrides_refine():
    from parauni.world.config import world_config, world_paper_rl, world_rl_defaults

    default = world_config().rl
    assert default == world_rl_defaults() and default.objective == "nft" and default.ldam.enabled
    assert [p.rewards for p in default.phases] == [{"aesthetic": 1.0}, {"clip": 0.5, "geneval": 1.0}]
    assert world_config(["--world.rl_recipe=paper"]).rl == world_paper_rl()
    assert world_paper_rl().objective == "grpo" and world_paper_rl().trainable.dit_lora_rank == 8
    for order in (["rl.lr=1e-4", "rl_recipe=paper"], ["rl_recipe=paper", "rl.lr=1e-4"]):
        cfg = world_config(order)
        assert cfg.rl.lr == 1e-4 and cfg.rl.objective == "grpo" and cfg.rl_recipe == "paper"
    with pytest.raises(ConfigError, match="rl_recipe='grpo'.*nft"):
        world_config(["rl_recipe=grpo"])


@pytest.mark.parametrize("same", [True, False])
def test_same_latent_shares_the_initial_noise_within_a_group(make_tiny, same):
    from parauni.rl.rollout import rollout

    model = make_tiny()
    cfg = _cfg(same_latent=same)
    items = [("a red circle", None), ("a red circle", None), ("two crosses", None), ("two crosses", None)]
    ro = rollout(model, items, [0, 0, 1, 1], [0, 1, 2, 3], cfg, epoch=0, ldam=None)
    x0 = ro.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) == same and torch.equal(x0[2], x0[3]) == same
    assert not torch.equal(x0[0], x0[2])
    assert not torch.equal(ro.latents[0, -1], ro.latents[1, -1])  # the SDE noise still differs


def test_sde_window_makes_the_other_steps_deterministic_and_trains_only_the_window(make_tiny, tmp_path):
    from parauni.rl.rollout import rollout

    model = make_tiny()
    cfg = _cfg(steps=4, sde_window=2, sde_window_start=1, same_latent=True, ldam=LDAMConfig(enabled=False))
    assert cfg.trained_steps == [1, 2] and cfg.stochastic_steps == [False, True, True, False]
    assert _cfg().trained_steps == [0, 1] and _cfg().stochastic_steps is None  # 0.99 of 3 steps
    items = [("a red circle", None)] * 2
    ro = rollout(model, items, [0, 0], [0, 1], cfg, epoch=0, ldam=None)
    assert (ro.log_probs[:, [0, 3]] == 0).all() and (ro.log_probs[:, [1, 2]] != 0).all()
    lat = ro.latents
    assert torch.equal(lat[0, 1], lat[1, 1])  # the same start and a deterministic first step
    assert not torch.equal(lat[0, 2], lat[1, 2])  # the window's noise differs per image
    calls = []
    import parauni.rl.grpo as grpo

    loss = grpo.grpo_loss

    def spy(logp, old, *a, **kw):
        calls.append(old.clone())
        return loss(logp, old, *a, **kw)

    grpo.grpo_loss = spy
    try:
        train_rl(model, _bright, ["bright", "dark"], PromptSource(items), cfg, tmp_path,
                 progress=False, log=lambda *a: None)  # fmt: skip
    finally:
        grpo.grpo_loss = loss
    assert calls and all((c != 0).all() for c in calls)  # only the window's (stochastic) steps are trained
    assert len(calls) == cfg.phases[0].epochs * cfg.updates_per_epoch * 2  # the window's 2 steps per update
    with pytest.raises(ConfigError, match="sde_window"):
        _cfg(steps=4, sde_window=3, sde_window_start=2)


# ------------------------------------------------------------------------------------------- DiffusionNFT
def test_nft_loss_has_no_gradient_on_policy_at_half_optimality_and_follows_r_otherwise():
    from parauni.rl.nft import forward_noised, nft_loss, optimality

    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.2, 0.5, 0.9])
    x_t = forward_noised(x0, sigma, noise)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    v_old = torch.randn(3, 4, 2, 2)
    assert torch.allclose(optimality(torch.tensor([-9.0, 0.0, 2.5]), 5.0), torch.tensor([0.0, 0.5, 0.75]))

    def grad(r):
        v = v_old.clone().requires_grad_(True)
        loss, stats = nft_loss(v, v_old, x_t, x0, sigma, torch.full((3,), r), beta=1.0)
        loss.backward()
        return v.grad, stats

    g, stats = grad(0.5)
    assert g.abs().max() < 1e-6 and stats["old_deviation"] == 0
    target = noise - x0  # the flow-matching velocity of the sample: r = 1 moves v toward it, r = 0 away
    for r, sign in ((1.0, 1), (0.0, -1)):
        g, _ = grad(r)
        step = -g  # a gradient-descent step
        assert sign * (step * (target - v_old)).sum() > 0


def test_nft_config_checks():
    assert _cfg(objective="nft", eta=0.0).stochastic_steps == [False, False, False]
    with pytest.raises(ConfigError, match="rl.eta=0.0"):
        _cfg(eta=0.0)
    with pytest.raises(ConfigError, match="rl.objective"):
        _cfg(objective="ppo")
    with pytest.raises(ConfigError, match="nft_beta"):
        _cfg(objective="nft", nft_beta=0.0)
    assert _cfg(objective="nft", eta=0.0, nft_time_range=0.5).nft_time_steps == 2  # round(3 x 0.5)
    with pytest.raises(ConfigError, match="nft_time_range=0.3 must be in"):
        _cfg(objective="nft", eta=0.0, nft_time_range=0.3)  # 1 time for the 2 trained at
    with pytest.raises(ConfigError, match="rl.sampler=dpm gives no log-probabilities"):
        _cfg(sampler="dpm")
    with pytest.raises(ConfigError, match="rl.sampler"):
        _cfg(objective="nft", sampler="ddim")


def test_dpm_rollout_draws_what_the_models_dpm_sampler_draws(make_tiny):
    from parauni.diffusion.sampling import sample
    from parauni.rl.rollout import rollout

    model = make_tiny()
    cfg = _cfg(objective="nft", eta=0.0, sampler="dpm")
    items = [("a red circle", None), ("two crosses", None)]
    ro = rollout(model, items, [0, 1], [0, 1], cfg, epoch=0, ldam=None)
    assert ro.log_probs is None and ro.latents.shape[1] == cfg.steps + 1
    with torch.no_grad():
        cond = model.condition(model.encode_prompts([p for p, _ in items]))
        uncond = model.condition(model.encode_prompts([None])).expand_as(cond)
        want = sample(model.velocity, cond, uncond, ro.latents[:, 0], sampler="dpm", steps=cfg.steps,
                      shift=cfg.shift, cfg=cfg.cfg)  # fmt: skip
    torch.testing.assert_close(ro.latents[:, -1], want, atol=1e-5, rtol=1e-4)
    euler = rollout(model, items, [0, 1], [0, 1], _cfg(objective="nft", eta=0.0), epoch=0, ldam=None)
    assert torch.equal(euler.latents[:, 0], ro.latents[:, 0])
    assert not torch.allclose(euler.latents[:, -1], ro.latents[:, -1])


@pytest.mark.parametrize(
    "updates,sampler,time_range", [(1, "sde", 1.0), (2, "sde", 1.0), (1, "dpm", 1.0), (1, "sde", 0.67)]
)
def test_nft_run_trains_the_lora_at_the_rollout_times_against_the_rollout_policy(
    make_tiny, tmp_path, updates, sampler, time_range
):
    import parauni.rl.grpo as grpo

    cfg = _cfg(
        objective="nft",
        eta=0.0,
        sampler=sampler,
        nft_time_range=time_range,
        updates_per_epoch=updates,
        ldam=LDAMConfig(enabled=False),
        ema=0.0,
    )
    items = [("a red circle", None), ("two crosses", None)]
    calls = []
    loss = grpo.nft_loss

    def spy(v, v_old, x_t, x0, sigma, r, beta):
        calls.append((sigma.clone(), r.clone(), float((v.detach() - v_old).abs().max())))
        return loss(v, v_old, x_t, x0, sigma, r, beta)

    model = make_tiny()
    model.set_trainable(cfg.trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grpo.nft_loss = spy
    try:
        train_rl(model, _bright, ["bright", "dark"], PromptSource(items), cfg, tmp_path / "a",
                 progress=False, log=lambda *a: None)  # fmt: skip
    finally:
        grpo.nft_loss = loss
    # 2 epochs x len(trained_steps) = 2 times per micro-batch; every sigma is one of the rollout's
    assert calls and len(calls) % 2 == 0
    from parauni.rl.rollout import rollout_sigmas

    sigmas = set(rollout_sigmas(cfg)[: cfg.nft_time_steps].tolist())  # time_range 0.67: the first 2 of 3
    assert all(set(s.tolist()) <= sigmas for s, _, _ in calls)
    assert {x for s, _, _ in calls for x in s.tolist()} == sigmas  # 2 epochs x 2 samples x 2 times cover them
    assert all(((r >= 0) & (r <= 1)).all() for _, r, _ in calls)
    assert calls[0][2] == 0  # the first step of an epoch is on the rollout policy
    if updates == 2:  # the second step compares with the rollout's weights, which it has left
        assert any(dev > 0 for _, _, dev in calls)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    rows = [json.loads(line) for line in (tmp_path / "a" / RL_LOG).read_text().splitlines()]
    assert "nft_loss" in rows[0] and "optimality_mean" in rows[0]


# ------------------------------------------------------------------------------------------- phase tags
def _row(tag: str, prompt: str) -> tuple[str, dict]:
    return prompt, {"tag": tag, "include": [{"class": "circle", "count": 1}], "prompt": prompt}


def test_phase_tags_are_geneval_tags():
    assert PhaseConfig("p", {"geneval": 1.0}, 1).tags == []
    tags = ["color_attr", "position"]
    assert PhaseConfig("p", {"geneval": 1.0}, 1, tags=tags).tags == tags
    with pytest.raises(ConfigError, match="colour_attr"):
        PhaseConfig("p", {"geneval": 1.0}, 1, tags=["colour_attr"])


def test_prompt_source_draws_only_the_phase_tags():
    rows = [_row("single_object", "a circle"), _row("color_attr", "a red circle and a blue square"),
            _row("position", "a circle left of a square"), ("a plain prompt", None)]  # fmt: skip
    source = PromptSource(rows)
    assert sorted(p for p, _ in source.epoch(0, 3, 4)) == sorted(p for p, _ in rows)  # no tags: every prompt
    drawn = source.epoch(0, 3, 6, ["color_attr", "position"])
    assert {m["tag"] for _, m in drawn} == {"color_attr", "position"} and len(drawn) == 6
    with pytest.raises(DataError, match="counting"):
        source.epoch(0, 0, 2, ["counting"])
    with pytest.raises(DataError, match="no metadata"):
        PromptSource([("a plain prompt", None)]).epoch(0, 0, 2, ["counting"])


def test_world_prompts_draw_the_phase_tags_and_are_unchanged_without():
    import numpy as np

    from parauni.scoring.geneval_rules import GENEVAL_TAGS
    from parauni.world.captions import metadata_for
    from parauni.world.rl import WorldPromptSource

    source = WorldPromptSource()
    rng = np.random.default_rng([5, 2, 11])  # the uniform draw of the six tags before tags existed
    before = [metadata_for(GENEVAL_TAGS[int(rng.integers(6))], rng)["prompt"] for _ in range(12)]
    assert [p for p, _ in source.epoch(5, 2, 12)] == before
    tagged = source.epoch(5, 2, 40, ["color_attr"])
    assert {m["tag"] for _, m in tagged} == {"color_attr"}
    assert source.epoch(5, 2, 40, ["color_attr"]) == tagged


def test_each_phase_draws_its_own_tags(make_tiny, tmp_path):
    """train_rl asks the prompt source for the tags of the phase each epoch is in."""
    asked: list[list[str]] = []

    class Recording(PromptSource):
        def epoch(self, seed, epoch, n, tags=()):
            asked.append(list(tags))
            return super().epoch(seed, epoch, n, tags)

    rows = [_row("single_object", "a circle"), _row("color_attr", "a red circle and a blue square")]
    phases = [PhaseConfig("a", {"bright": 1.0}, 1, "deep", 0.0),
              PhaseConfig("b", {"bright": 1.0}, 2, "deep", 0.0, tags=["color_attr"])]  # fmt: skip
    train_rl(make_tiny(), _bright, ["bright", "dark"], Recording(rows), _cfg(phases=phases), tmp_path / "rl",
             progress=False, log=lambda *a: None)  # fmt: skip
    assert asked == [[], ["color_attr"], ["color_attr"]]
