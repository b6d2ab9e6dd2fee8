"""Stage III's held-out evaluation (``rl.eval_prompts``): when it runs, that it repeats the same prompts and noise
so two evaluations differ by the training alone, its paired comparison, and its place in a resumed run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_rl_config

from parauni.config import ConfigError
from parauni.rl.config import PhaseConfig, RLConfig
from parauni.rl.evaluate import EVAL_DRAW, eval_epochs
from parauni.rl.grpo import train_rl
from parauni.rl.plots import paired_rise, reward_rises, rise_basis, rise_verdict
from parauni.rl.prompts import PromptSource
from parauni.rl.rollout import rollout
from parauni.utils.run_files import RL_EVAL_LOG

PROMPTS = PromptSource([("a red circle", None), ("a blue square", None), ("two green triangles", None)])


def _cfg(**kw) -> RLConfig:
    phases = [
        PhaseConfig("a", {"bright": 1.0}, 2, "deep", 0.0),
        PhaseConfig("b", {"dark": 1.0}, 1, "deep", 0.0),
    ]
    return tiny_rl_config(
        **{"phases": phases, "lr": 1e-2, "eval_prompts": 3, "eval_images": 2, "ema": 0.0, **kw}
    )


def _bright(images, prompts, metadata):
    return {"bright": images.mean(dim=(1, 2, 3)).tolist(), "dark": (-images.mean(dim=(1, 2, 3))).tolist()}


def _train(model, cfg, out, **kw):
    return train_rl(
        model, _bright, ["bright", "dark"], PROMPTS, cfg, out, progress=False, log=lambda *a: None, **kw
    )


def test_evaluations_come_before_the_first_epoch_at_each_phase_end_and_every_n():
    assert eval_epochs(_cfg()) == [0, 2, 3]
    assert eval_epochs(_cfg(eval_every=1)) == [0, 1, 2, 3]
    assert eval_epochs(_cfg(eval_prompts=0, eval_every=1)) == []
    with pytest.raises(ConfigError, match="rl.eval_prompts=-1"):
        _cfg(eval_prompts=-1)
    with pytest.raises(ConfigError, match="rl.eval_images=0"):
        _cfg(eval_images=0)


def test_the_held_out_set_repeats_its_prompts_and_noise_so_only_training_moves_it(make_tiny, tmp_path):
    still = _train(make_tiny(), _cfg(lr=0.0), tmp_path / "still")
    assert [e["epochs_done"] for e in still.evals] == [0, 2, 3]
    first, *rest = still.evals
    assert first["prompts"] == 3 and first["images"] == 2 and len(first["prompt_means_bright"]) == 3
    for e in rest:  # no training: every evaluation is the first, bit for bit
        assert e["prompt_means_bright"] == first["prompt_means_bright"]
        assert e["prompt_means_dark"] == first["prompt_means_dark"]
    rows = [json.loads(line) for line in (tmp_path / "still" / RL_EVAL_LOG).read_text().splitlines()]
    assert [r["epochs_done"] for r in rows] == [0, 2, 3]
    rises = reward_rises(still.history, {"a": ["bright"], "b": ["dark"]}, evals=still.evals)
    assert rises["a"]["bright"]["se"] == 0 and rises["a"]["bright"]["paired"]
    assert rise_verdict(rises["b"]["dark"]) == "within noise"
    assert rise_basis(rises).startswith("the held-out prompts")

    moved = _train(make_tiny(), _cfg(), tmp_path / "moved")
    assert moved.evals[0]["prompt_means_bright"] == first["prompt_means_bright"]  # the same start
    assert moved.evals[-1]["prompt_means_bright"] != first["prompt_means_bright"]  # trained since
    unmeasured = _train(
        make_tiny(), _cfg(eval_prompts=0), tmp_path / "unmeasured"
    )  # measuring changes nothing
    assert unmeasured.evals == [] and not (tmp_path / "unmeasured" / RL_EVAL_LOG).exists()
    assert [r["reward_bright"] for r in unmeasured.history] == [r["reward_bright"] for r in moved.history]


def test_with_an_ema_the_evaluation_sees_the_ema_and_the_policy_trains_on(make_tiny, tmp_path):
    plain = _train(make_tiny(), _cfg(), tmp_path / "plain")
    # an EMA that never updates (every 100 steps) holds the starting weights: so does every evaluation
    held = _train(make_tiny(), _cfg(ema=0.9, ema_every=100), tmp_path / "ema")
    assert all(e["prompt_means_dark"] == held.evals[0]["prompt_means_dark"] for e in held.evals)
    assert held.evals[0]["prompt_means_dark"] == plain.evals[0]["prompt_means_dark"]
    assert [r["reward_dark"] for r in held.history] == [r["reward_dark"] for r in plain.history]


def test_held_out_evaluations_survive_a_resume_without_repeats(make_tiny, tmp_path):
    cfg = _cfg(save_every=1)
    whole = _train(make_tiny(), cfg, tmp_path / "rl")
    (tmp_path / "rl" / "model.safetensors").unlink()
    again = _train(make_tiny(), cfg, tmp_path / "rl", resume=True)
    assert [e["epochs_done"] for e in again.evals] == [0, 2, 3]
    assert again.evals[-1]["prompt_means_dark"] == whole.evals[-1]["prompt_means_dark"]
    rows = (tmp_path / "rl" / RL_EVAL_LOG).read_text().splitlines()
    assert [json.loads(r)["epochs_done"] for r in rows] == [0, 2, 3]


def test_the_evaluation_samples_with_the_ode_whatever_the_sde_noise(make_tiny):
    model = make_tiny()
    items = [("a red circle", None)] * 2
    sde, ode = _cfg(eta=1.0), _cfg(objective="nft", eta=0.0)
    a = rollout(model, items, [0, 0], [0, 1], sde, EVAL_DRAW, None, ode=True)
    b = rollout(model, items, [0, 0], [0, 1], ode, EVAL_DRAW, None)
    c = rollout(model, items, [0, 0], [0, 1], sde, EVAL_DRAW, None)
    torch.testing.assert_close(a.images, b.images)
    assert not torch.allclose(a.images, c.images)  # the SDE's noise moves the same start elsewhere


def test_paired_rise_is_the_mean_per_prompt_difference_with_its_standard_error():
    start = {"reward_r": 2.0, "prompt_means_r": [1.0, 2.0, 3.0]}
    end = {"reward_r": 2.5, "prompt_means_r": [1.5, 2.25, 3.75]}
    rise = paired_rise(start, end, "r")
    d = torch.tensor([0.5, 0.25, 0.75], dtype=torch.float64)
    assert rise["end"] - rise["start"] == pytest.approx(float(d.mean()))
    assert rise["se"] == pytest.approx(float(d.std() / math.sqrt(3)))
    assert rise_verdict(rise) == "rose"  # 0.5 > 2 x 0.144
    with pytest.raises(ValueError, match="cannot be paired"):
        paired_rise(start, {"reward_r": 0.0, "prompt_means_r": [1.0]}, "r")
