"""Reward models: tiny random CLIP models saved and reloaded offline, the aesthetic MLP files, GenEval partial
credit, the combination, and the world's CLIP / aesthetic training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from parauni.rl.rewards import (
    Aesthetic,
    AestheticMLP,
    CLIPScore,
    CombinedReward,
    GenEvalReward,
    PickScore,
    Reward,
    RewardModelError,
)
from parauni.scoring.geneval_rules import Detection, color_from_detection, filter_detections, partial_credit
from parauni.world.captions import colors_row, counting_row, position_row, scene_for, two_object_row
from parauni.world.reward_models import ShapesEvalReward
from parauni.world.scene import render

PROMPTS = ["a photo of a red circle", "two blue squares", "a green cross above a cat"]


def _images(n: int = 3, size: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


def test_clip_score_and_pickscore_return_one_float_per_image_and_follow_their_formulas(clip_dir):
    images = _images()
    clip = CLIPScore.from_pretrained(clip_dir, batch_size=2)
    pick = PickScore.from_pretrained(clip_dir, clip_dir)
    for reward in (clip, pick):
        scores = reward(images, PROMPTS, None)
        assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    e = clip.embedder
    with torch.no_grad():
        cos = (e.embed_images(images) * e.embed_texts(PROMPTS)).sum(-1)
    np.testing.assert_allclose(clip(images, PROMPTS), (100 * cos / 30).tolist(), rtol=1e-4, atol=1e-5)
    scale = float(pick.embedder.model.logit_scale.exp())
    np.testing.assert_allclose(pick(images, PROMPTS), (scale * cos / 26).tolist(), rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_scores(clip_dir):
    images = _images(5)
    prompts = PROMPTS + ["a cross", "three circles"]
    a = CLIPScore.from_pretrained(clip_dir, batch_size=5)(images, prompts)
    b = CLIPScore.from_pretrained(clip_dir, batch_size=2)(images, prompts)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_aesthetic_loads_safetensors_and_pth_weights_only(clip_dir, tmp_path):
    torch.manual_seed(0)
    mlp = AestheticMLP((16, 12, 8, 1), (0.2, 0.1))
    st, pth = tmp_path / "mlp.safetensors", tmp_path / "mlp.pth"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(st))
    torch.save(mlp.state_dict(), pth)
    images = _images()
    results = []
    for path in (st, pth):
        reward = Aesthetic.from_pretrained(path, clip_dir)
        assert reward.mlp.dims == [16, 12, 8, 1]
        results.append(reward(images, PROMPTS))
    assert len(results[0]) == 3
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_laion_key_layout_is_understood():
    state = AestheticMLP((768, 1024, 128, 64, 16, 1), (0.2, 0.2, 0.1)).state_dict()
    assert {k.rsplit(".", 1)[0] for k in state} == {f"layers.{i}" for i in (0, 2, 4, 6, 7)}
    assert AestheticMLP.from_state_dict(state).dims == [768, 1024, 128, 64, 16, 1]


def test_missing_weights_give_errors_that_name_the_path(tmp_path):
    missing = tmp_path / "no-such-clip"
    with pytest.raises(RewardModelError, match="no-such-clip"):
        CLIPScore.from_pretrained(missing)
    with pytest.raises(RewardModelError, match="missing.pth"):
        AestheticMLP.from_file(tmp_path / "missing.pth")


class _Const(Reward):
    def __init__(self, value: float) -> None:
        super().__init__(batch_size=2)
        self.value = value

    def score(self, images, prompts, metadata):
        return [self.value] * len(images)


def test_combined_reward_weights_and_reports_each_reward():
    combined = CombinedReward({"a": _Const(1.0), "b": _Const(2.0)}, {"a": 0.5})
    total, per = combined(_images(), PROMPTS, None)
    assert total == [0.5] * 3 and per == {"a": [1.0] * 3, "b": [2.0] * 3}
    with pytest.raises(ValueError, match="unknown rewards"):
        CombinedReward({"a": _Const(1.0)}, {"c": 1.0})
    with pytest.raises(ValueError, match="one prompt per image"):
        combined(_images(), PROMPTS[:2], None)


# ------------------------------------------------------------------------------------------- GenEval credit


def _det(label: str, box: tuple, color: str) -> Detection:
    mask = np.zeros((32, 32), dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return Detection(label=label, score=1.0, box=box, mask=mask, color=color)


def _credit(dets: list[Detection], row: dict) -> float:
    return partial_credit(filter_detections(dets, row["tag"]), row, color_from_detection)


def test_partial_credit_on_hand_built_detections():
    row = colors_row("circle", "red")
    assert _credit([_det("circle", (2, 2, 10, 10), "red")], row) == 1.0
    assert _credit([_det("circle", (2, 2, 10, 10), "blue")], row) == 0.5  # count right, colour wrong
    assert _credit([], row) == 0.0
    count = counting_row("square", 2)
    assert _credit([_det("square", (2, 2, 8, 8), "red")], count) == 0.5
    pos = position_row("circle", "left of", "square")  # "a circle left of a square"
    left, right = _det("circle", (1, 10, 8, 17), "red"), _det("square", (22, 10, 29, 17), "red")
    assert _credit([left, right], pos) == 1.0
    swapped = [_det("circle", (22, 10, 29, 17), "red"), _det("square", (1, 10, 8, 17), "red")]
    assert 0 < _credit(swapped, pos) < 1.0


def test_shapeseval_reward_gives_full_credit_to_ground_truth_renders():
    rng = np.random.default_rng(0)
    rows = [two_object_row("circle", "cross"), colors_row("triangle", "green"), counting_row("square", 3)]
    images = torch.stack(
        [torch.from_numpy(render(scene_for(r, rng, 32))).permute(2, 0, 1).float() / 127.5 - 1 for r in rows]
    )
    scores = ShapesEvalReward()(images, [r["prompt"] for r in rows], rows)
    assert scores == [1.0, 1.0, 1.0]
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert max(ShapesEvalReward()(noise, [r["prompt"] for r in rows], rows)) < 0.5
    # the strict reward is ShapesEval's own rule: 1 for the renders, 0 where the partial credit is partial
    strict = ShapesEvalReward(strict=True)
    assert strict(images, [r["prompt"] for r in rows], rows) == [1.0, 1.0, 1.0]
    wrong = rows[:2] + [counting_row("square", 2)]  # three squares drawn, two asked
    partial = ShapesEvalReward()(images, [r["prompt"] for r in wrong], wrong)
    assert 0 < partial[2] < 1 and strict(images, [r["prompt"] for r in wrong], wrong)[2] == 0.0
    with pytest.raises(ValueError, match="metadata"):
        GenEvalReward(lambda image: [], color_from_detection)(images, [r["prompt"] for r in rows], [None] * 3)


# ------------------------------------------------------------------------------------------- world rewards


def test_world_reward_models_train_save_and_score(tmp_path):
    from parauni.world.config import WorldConfig
    from parauni.world.pretrain import pretrain
    from parauni.world.reward_models import world_rewards

    cfg = WorldConfig().quick()
    metrics = pretrain(cfg, tmp_path, phases=["rewards"], progress=False, log=lambda *a: None)["rewards"]
    assert 0 <= metrics["heldout_retrieval_top1"] <= 1 and "aesthetic" in metrics
    rewards = world_rewards(tmp_path)
    assert sorted(rewards) == ["aesthetic", "clip", "geneval", "geneval_strict"]
    rows = [colors_row("circle", "red"), two_object_row("square", "cross")]
    images = _images(2, 32)
    for reward in rewards.values():
        scores = reward(images, [r["prompt"] for r in rows], rows)
        assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def test_cli_rl_runs_with_a_local_clip_and_names_missing_rewards(clip_dir, tmp_path, capsys):
    from parauni.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    common = ["rl", "--model", "tiny", "--prompts", str(prompts), "--quiet"]
    phases = "--rl.phases=[{name: c, rewards: {clip: 1.0}, epochs: 2, zone: deep, beta: 0.01}]"
    small = [
        "--rl.prompts_per_epoch=2",
        "--rl.group_size=2",
        "--rl.steps=2",
        "--rl.height=32",
        "--rl.width=32",
    ]
    one_epoch = "--rl.phases.0.epochs=1"  # a list item by its position, after the list itself
    rc = main(
        common + ["--out", str(tmp_path / "run"), f"--rewards.clip={clip_dir}", phases, one_epoch, *small]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "clip: first epoch" in out and (tmp_path / "run" / "model.safetensors").is_file()
    assert len((tmp_path / "run" / "rl_log.jsonl").read_text().splitlines()) == 1
    card = (tmp_path / "run" / "README.md").read_text()  # an RL folder carries its model card too
    assert "# ParaUni Stage 3 model" in card and "| RL epochs | 1 |" in card and "final reward clip" in card
    held_out = ["--rl.eval_prompts=2", "--rl.eval_images=2"]  # the same prompts before and after, paired
    rc = main(
        common
        + ["--out", str(tmp_path / "alone"), f"--rewards.clip={clip_dir}", phases, one_epoch, *small]
        + ["--self-contained", *held_out]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "the folder stands alone" in out and "clip: held-out 2 prompts x 2 images" in out
    assert len((tmp_path / "alone" / "rl_eval.jsonl").read_text().splitlines()) == 2
    # a phase that uses a reward nobody configured is refused with the names
    bad = "--rl.phases=[{name: p, rewards: {pickscore: 1.0}, epochs: 1, zone: middle, beta: 0.01}]"
    rc = main(common + ["--out", str(tmp_path / "bad"), f"--rewards.clip={clip_dir}", bad, *small])
    assert rc == 2 and "pickscore" in capsys.readouterr().err
    rc = main(common + ["--out", str(tmp_path / "none"), *small])
    assert rc == 2 and "no reward model is configured" in capsys.readouterr().err


def test_cli_rl_world_without_stage0_says_to_run_the_demo(tmp_path, capsys):
    from parauni.cli import main

    rc = main(["rl", "--world", "--cache", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "run `parauni demo` first" in capsys.readouterr().err


def test_cli_rl_world_overrides_reach_the_world_config_and_need_world(tmp_path, capsys, monkeypatch):
    from parauni.cli import main
    from parauni.world import rl as world_rl
    from parauni.world.config import world_paper_rl

    rc = main(["rl", "--out", str(tmp_path / "o"), "--world.rl_recipe=paper", "--model", "tiny", "--quiet"])
    assert rc == 2 and "--world.* overrides ['rl_recipe=paper'] need --world" in capsys.readouterr().err
    seen = {}

    def stop(request, log):  # the RL defaults --world gives, without training anything
        seen["rl"] = world_rl._defaults(request, log)[0]
        raise world_rl.ConfigError("stopped")

    monkeypatch.setattr(world_rl, "run_rl_request", lambda request, *a: stop(request, print))
    monkeypatch.chdir(tmp_path)
    args = ["rl", "--world", "--model", str(tmp_path), "--out", str(tmp_path / "o2"), "--quiet"]
    assert main([*args, "--world.rl_recipe=paper"]) == 2
    assert seen["rl"] == dataclasses.asdict(world_paper_rl())
