"""Stage I / II training: schedule, own-data folders, what trains, checkpoints and exact resume, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.diffusion.flow import Distillation, assign_teacher_tokens, condition_match_loss, pair_loss
from parauni.errors import ConfigError, TrainingDiverged
from parauni.models.parauni import ParaUni
from parauni.training.checkpoint import RAW_FILE, intact_checkpoint
from parauni.training.config import TrainConfig, stage_config
from parauni.training.data import DataError, FolderSource, scan_folder
from parauni.training.trainer import MAX_BAD_STEPS, lr_at, train


def _write_images(folder, n, jsonl=True, bad=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if jsonl:
            rows.append({"image": f"{i}.png", "caption": f"a photo of thing number {i}"})
        else:
            (folder / f"{i}.txt").write_text(f"a photo of thing number {i}")
    for j in range(bad):
        (folder / f"bad{j}.png").write_bytes(b"\x89PNG but truncated")
        if jsonl:
            rows.append({"image": f"bad{j}.png", "caption": "broken"})
        else:
            (folder / f"bad{j}.txt").write_text("broken")
    if jsonl:
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_stage_defaults_follow_the_paper():
    s1, s2 = stage_config(1), stage_config(2)
    assert (s1.lr, s1.batch_size, s1.steps, s1.warmup) == (1e-4, 512, 100_000, 1_000)
    assert (s2.lr, s2.steps, s2.warmup) == (1e-5, 10_000, 100)
    assert (s1.betas, s1.weight_decay, s1.grad_clip, s1.caption_dropout) == ([0.9, 0.95], 0.05, 1.0, 0.1)


def test_scan_folder_jsonl_and_pairs(tmp_path):
    assert len(scan_folder(_write_images(tmp_path / "a", 3))) == 3
    assert len(scan_folder(_write_images(tmp_path / "b", 4, jsonl=False))) == 4
    with pytest.raises(DataError, match="no image-caption pairs"):
        scan_folder((tmp_path / "empty").mkdir() or tmp_path / "empty")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(DataError, match="x.jsonl:1"):
        scan_folder(tmp_path / "c")


def test_folder_source_skips_corrupt_images_and_caches(tmp_path):
    folder = _write_images(tmp_path / "d", 5, bad=2)
    calls = []

    def encode(x):
        calls.append(len(x))
        return x * 0.5

    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        src = FolderSource(folder, 16, encode=encode, cache_key="half", progress=False)
    assert len(src) == 5 and len(src.skipped) == 2
    inputs, captions = src.examples([0, 1, 7])
    assert inputs.shape == (3, 3, 16, 16) and inputs.abs().max() <= 0.5
    assert all(c.startswith("a photo of thing") for c in captions)
    assert sum(calls) == 5
    with pytest.warns(UserWarning):
        again = FolderSource(folder, 16, encode=encode, cache_key="half", progress=False)
    assert sum(calls) == 5, "the second source must come from the cache"
    assert torch.equal(again.examples([3])[0], src.examples([3])[0])
    # the order differs per epoch but each epoch visits every item once
    epoch0 = sorted(src.examples(list(range(5)))[1])
    assert epoch0 == sorted(src.captions)


def _tiny_run(
    make_tiny,
    tmp_path,
    steps=4,
    stage=1,
    resume=False,
    out="run",
    model=None,
    save_every=2,
    teacher=None,
    **overrides,
):
    model = model or make_tiny()
    src = FolderSource(
        _write_images(tmp_path / "data", 6), 64, encode=model.encode_images, cache_key="tiny", progress=False
    )
    cfg = stage_config(
        stage,
        {
            "steps": steps,
            "batch_size": 4,
            "warmup": 1,
            "save_every": save_every,
            "image_size": 64,
            "log_every": 1,
            **overrides,
        },
    )
    return model, train(model, src, cfg, tmp_path / out, resume=resume, progress=False, teacher=teacher)


def test_stage1_trains_queries_and_lim_only(make_tiny, tmp_path):
    model = make_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, result = _tiny_run(make_tiny, tmp_path, model=model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert "queries" in changed and any(n.startswith("lim.") for n in changed)
    assert not any(n.startswith(("vlm.", "dit.", "vae.")) for n in changed)
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert (result.model_dir / "model.safetensors").is_file()
    assert intact_checkpoint(result.model_dir, "step").name == "step_0000002"


def test_stage2_also_trains_the_dit_and_saves_it(make_tiny, tmp_path):
    model = make_tiny()
    dit_before = {n: p.detach().clone() for n, p in model.dit.named_parameters()}
    model, result = _tiny_run(make_tiny, tmp_path, stage=2, model=model)
    assert any(not torch.equal(dit_before[n], p) for n, p in model.dit.named_parameters())
    assert (result.model_dir / "transformer").is_dir()
    loaded = ParaUni.from_pretrained(result.model_dir)
    for (n, a), (_, b) in zip(model.dit.state_dict().items(), loaded.dit.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resume_continues_exactly(make_tiny, tmp_path):
    full, _ = _tiny_run(make_tiny, tmp_path, steps=6, out="full", save_every=3)
    _tiny_run(make_tiny, tmp_path, steps=6, out="broken", save_every=3)
    # simulate a crash after the step-3 checkpoint: keep only that checkpoint and nothing else
    broken = tmp_path / "broken"
    for name in ("model.safetensors", "config.yaml"):
        (broken / name).unlink()
    resumed, _ = _tiny_run(make_tiny, tmp_path, steps=6, out="broken", resume=True, save_every=3)
    a, b = full.trained_state_dict(), resumed.trained_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_weights_are_saved_and_resume_exactly(make_tiny, tmp_path):
    """train.ema: the model folder holds the EMA, the run folder the last raw weights, and a resumed run
    (EMA restored from the checkpoint) ends with the same EMA as an uninterrupted one."""
    from safetensors.torch import load_file

    full, result = _tiny_run(make_tiny, tmp_path, steps=6, out="full", save_every=3, ema=0.5)
    raw = load_file(str(result.model_dir / RAW_FILE))
    ema = full.trained_state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if k in ema)
    assert (intact_checkpoint(result.model_dir, "step") / "ema.safetensors").is_file()
    _tiny_run(make_tiny, tmp_path, steps=6, out="broken", save_every=3, ema=0.5)
    broken = tmp_path / "broken"
    for name in ("model.safetensors", "config.yaml", RAW_FILE):
        (broken / name).unlink()
    resumed, _ = _tiny_run(make_tiny, tmp_path, steps=6, out="broken", resume=True, save_every=3, ema=0.5)
    again = resumed.trained_state_dict()
    assert all(torch.equal(ema[k], again[k]) for k in ema)
    with pytest.raises(ValueError, match="train.ema=1.0 must be in"):
        stage_config(1, {"ema": 1.0})


def test_non_finite_steps_are_skipped_logged_and_stop_the_run(make_tiny, tmp_path):
    model = make_tiny()
    velocity = model.velocity
    model.velocity = lambda *args: velocity(*args) * float("nan")  # every loss and gradient is NaN
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=f"{MAX_BAD_STEPS} steps in a row had a non-finite loss"):
        _tiny_run(make_tiny, tmp_path, steps=20, model=model, save_every=0)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [True] * MAX_BAD_STEPS
    assert [r["bad_in_a_row"] for r in log] == list(range(1, MAX_BAD_STEPS + 1))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), (
        "a skipped step changed weights"
    )


def test_activation_checkpointing_recomputes_and_trains_the_same(make_tiny, tmp_path):
    def run(out, on):
        model = make_tiny()
        calls = []
        model.dit.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.append("dit"))
        model.lim.connector.layers[0].register_forward_pre_hook(lambda *_: calls.append("lim"))
        _tiny_run(make_tiny, tmp_path, stage=2, steps=2, out=out, model=model, activation_checkpointing=on)
        assert model.dit.gradient_checkpointing == on and model.lim.connector.gradient_checkpointing == on
        return model, calls

    plain, plain_calls = run("plain", False)
    ckpt, ckpt_calls = run("ckpt", True)
    # the blocks run again in the backward pass: twice the forward calls
    assert ckpt_calls.count("dit") == 2 * plain_calls.count("dit") > 0
    assert ckpt_calls.count("lim") == 2 * plain_calls.count("lim") > 0
    a, b = plain.trained_state_dict(), ckpt.trained_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_trains(make_tiny, tmp_path):
    from accelerate.state import AcceleratorState

    model = make_tiny()
    before = {k: v.clone() for k, v in model.trained_state_dict().items()}
    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a process-wide singleton
    try:
        _, result = _tiny_run(make_tiny, tmp_path, steps=2, model=model, mixed_precision="bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert not any(r["skipped"] for r in log) and all(math.isfinite(r["loss"]) for r in log)
    after = model.trained_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_cli_train_then_generate(tmp_path, capsys):
    data = _write_images(tmp_path / "data", 5, jsonl=False, bad=1)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--stage",
            "1",
            "--data",
            str(data),
            "--model",
            "tiny",
            "--out",
            str(run),
            "--image-size",
            "64",
            "--quiet",
            "--train.steps=2",
            "--train.batch_size=2",
            "--train.warmup=1",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "5 image-caption pairs" in out and "skipped 1 unreadable" in out
    code = main(
        [
            "generate",
            "--model",
            str(run),
            "--prompt",
            "a photo of thing number 1",
            "--out",
            str(tmp_path / "x.png"),
            "--steps",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    assert Image.open(tmp_path / "x.png").size == (64, 64)


def test_cli_train_bad_inputs(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                str(tmp_path / "nope"),
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "nope does not exist; give a folder" in capsys.readouterr().err
    data = _write_images(tmp_path / "data", 2)
    assert (
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                str(data),
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "r"),
                "--train.batch_size=3",
                "--train.grad_accum=2",
            ]
        )
        == 2
    )
    assert "not divisible" in capsys.readouterr().err


def test_condition_match_loss_counts_only_the_teachers_real_tokens():
    cond = torch.zeros(2, 4, 3)
    states = torch.ones(2, 6, 3)  # longer than the condition: only its first 4 tokens can be matched
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert float(condition_match_loss(cond, states, mask)) == pytest.approx(1.0)
    states[0, 2:] = 100.0  # padding of the first caption: ignored
    assert float(condition_match_loss(cond, states, mask)) == pytest.approx(1.0)
    cond[1, 0] = 1.0  # one of the 6 real tokens matched exactly
    assert float(condition_match_loss(cond, states, mask)) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="channel"):
        condition_match_loss(cond, torch.ones(2, 6, 5), mask)


def test_condition_match_loss_asks_for_the_teachers_variation_across_prompts():
    g = torch.Generator().manual_seed(0)
    states, mask = torch.randn(4, 3, 5, generator=g), torch.ones(4, 3)
    mse = lambda c: float((c - states).pow(2).mean())  # noqa: E731
    same = states.mean(0, keepdim=True).expand(4, 3, 5)  # the best condition that ignores the prompt
    assert float(condition_match_loss(same, states, mask)) == pytest.approx(mse(same) + 1.0, rel=1e-5)
    shifted = states + 0.5  # varies as the teacher does: only the plain error is left
    assert float(condition_match_loss(shifted, states, mask)) == pytest.approx(0.25, rel=1e-5)
    mask[0, 2] = 0  # a padded token takes part in neither the error nor the batch means
    padded = shifted.clone()
    padded[0, 2] = 1e3
    assert float(condition_match_loss(padded, states, mask)) == pytest.approx(0.25, rel=1e-5)


def test_condition_distill_pulls_the_condition_to_the_teacher(make_tiny, tmp_path):
    """``train.condition_distill`` needs a teacher; with one, Stage I moves the condition toward its states."""
    with pytest.raises(ValueError, match="condition_distill=1.0 needs a teacher"):
        _tiny_run(make_tiny, tmp_path, steps=1, condition_distill=1.0, out="none")
    seen = []
    width = make_tiny().dit.config.caption_channels

    def teacher(captions):
        seen.append(list(captions))
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(captions), 3, width, generator=g), torch.ones(len(captions), 3)

    target, mask = teacher(["x"] * 4)
    seen.clear()

    def gap(model):
        with torch.no_grad():
            cond = model.condition(model.encode_prompts(["a photo of thing number 1"] * 4))
        return float(condition_match_loss(cond, target, mask))

    torch.manual_seed(0)
    plain, _ = _tiny_run(make_tiny, tmp_path, steps=8, lr=3e-3, out="plain")
    torch.manual_seed(0)
    pulled, _ = _tiny_run(make_tiny, tmp_path, steps=8, lr=3e-3, condition_distill=10.0, teacher=teacher)
    assert len(seen) == 8 and all(len(c) == 4 for c in seen)  # one call per step, dropped captions as None
    assert gap(pulled) < 0.7 * gap(plain), (gap(pulled), gap(plain))


def test_assignment_match_ignores_the_order_of_the_teachers_tokens():
    """``distill_match=assignment``: the DiT reads its condition as a set, so a reordered teacher costs nothing."""
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 5, 4, generator=g)
    order = torch.stack([torch.randperm(5, generator=g) for _ in range(3)])
    states = cond.gather(1, order[..., None].expand(3, 5, 4))  # the same tokens, each caption reordered
    mask = torch.ones(3, 5)
    assert float(condition_match_loss(cond, states, mask)) > 0.5
    assert float(condition_match_loss(cond, states, mask, match="assignment")) == pytest.approx(0.0, abs=1e-6)
    aligned, kept = assign_teacher_tokens(cond, states, mask)
    assert torch.equal(aligned, cond) and torch.equal(kept, mask)
    # padding tokens are never assigned; condition tokens beyond the real ones stay free (mask 0)
    mask[0, 3:] = 0
    aligned, kept = assign_teacher_tokens(cond, states, mask)
    assert kept[0].sum() == 3 and kept[1:].sum() == 10
    assert set(aligned[0][kept[0].bool()].flatten().tolist()) == set(states[0, :3].flatten().tolist())
    with pytest.raises(ConfigError, match="unknown condition match 'nearest'"):
        condition_match_loss(cond, states, mask, match="nearest")


def test_flow_weight_and_distill_match_are_checked():
    with pytest.raises(ConfigError, match="flow_weight=-1"):
        TrainConfig(flow_weight=-1)
    with pytest.raises(ConfigError, match="nothing to learn"):
        TrainConfig(flow_weight=0)  # no condition_distill
    with pytest.raises(ConfigError, match="nothing to learn"):
        TrainConfig(stage=2, flow_weight=0, condition_distill=1.0)
    with pytest.raises(ConfigError, match="distill_match"):
        TrainConfig(distill_match="nearest")
    assert TrainConfig(flow_weight=0, condition_distill=1.0).flow_weight == 0


def test_distillation_alone_never_runs_the_dit(make_tiny, tmp_path):
    """``flow_weight=0``: Stage I learns from the teacher only and skips the DiT's forward and backward."""
    model = make_tiny()
    width = model.dit.config.caption_channels
    calls = []
    real = model.velocity
    model.velocity = lambda *a: calls.append(1) or real(*a)

    def teacher(captions):
        g = torch.Generator().manual_seed(0)
        return torch.randn(len(captions), 3, width, generator=g), torch.ones(len(captions), 3)

    _, result = _tiny_run(
        make_tiny,
        tmp_path,
        steps=3,
        model=model,
        teacher=teacher,
        flow_weight=0.0,
        condition_distill=1.0,
        distill_match="assignment",
    )
    assert calls == [] and math.isfinite(result.final_loss)


def test_pair_loss_asks_the_condition_to_see_a_swap_as_the_teacher_does():
    g = torch.Generator().manual_seed(0)
    states, mask = torch.randn(4, 3, 5, generator=g), torch.ones(4, 3)
    pairs = torch.tensor([[0, 2], [1, 3]])
    blind = states.clone()
    blind[2], blind[3] = states[0], states[1]  # the twins' conditions equal their originals'
    assert float(pair_loss(blind, states, mask, pairs)) == pytest.approx(1.0)
    assert float(pair_loss(states + 0.3, states, mask, pairs)) == pytest.approx(0.0, abs=1e-6)
    plain = Distillation(states, mask, 2.0, "assignment").loss(blind)
    twins = Distillation(states, mask, 2.0, "assignment", pairs, 0.5).loss(blind)
    assert float(twins) > float(plain)
    assert float(Distillation(states, mask, 2.0, "position", pairs, 0.5).loss(states)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_distill_twins_is_checked_and_needs_a_source_with_twins(make_tiny, tmp_path):
    with pytest.raises(ConfigError, match="distill_twins=-1"):
        TrainConfig(distill_twins=-1, condition_distill=1.0)
    with pytest.raises(ConfigError, match="only with condition_distill > 0"):
        TrainConfig(distill_twins=1.0)
    with pytest.raises(ConfigError, match="needs a data source with twin"):
        _tiny_run(
            make_tiny, tmp_path, steps=1, condition_distill=1.0, distill_twins=1.0, teacher=lambda c: None
        )


def test_distill_twins_join_the_step_and_reach_the_teacher(make_tiny, tmp_path, monkeypatch):
    """With ``distill_twins`` each caption's twin (when the source has one) is distilled beside it."""
    monkeypatch.setattr(
        FolderSource, "twin", staticmethod(lambda c: c.replace("number", "No.")), raising=False
    )
    width = make_tiny().dit.config.caption_channels
    seen = []

    def teacher(captions):
        seen.append(list(captions))
        return torch.randn(len(captions), 3, width), torch.ones(len(captions), 3)

    _, result = _tiny_run(
        make_tiny,
        tmp_path,
        steps=2,
        teacher=teacher,
        condition_distill=1.0,
        distill_twins=1.0,
        caption_dropout=0.0,
    )
    assert math.isfinite(result.final_loss)
    assert all(len(c) == 8 and c[4:] == [x.replace("number", "No.") for x in c[:4]] for c in seen)


# ------------------------------------------------------------------------------------------- lim.whiten
WHITEN = ["lim.whiten=true", "lim.whiten_captions=12"]


def test_whitening_makes_each_layers_prompt_variation_white(make_tiny):
    model = make_tiny(WHITEN)
    lim = model.lim
    n, layers, q, d = 200, len(lim.layer_ids), model.queries.shape[0], model.queries.shape[1]
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-1, 0.9, d)  # variances 10^3.8 apart (within lim.whiten_floor, 10^-4)
    states = torch.randn(n, layers, q, d, generator=gen) * scales + torch.randn(layers, q, d, generator=gen)
    plain = lim.per_layer(states)  # not fitted yet: the identity
    lim.whiten = False
    assert torch.equal(plain, lim.per_layer(states))
    lim.whiten = True
    lim.fit_whitening(states)
    assert lim.whitened and int(lim.whiten_samples) == n
    z = (
        torch.einsum("blqd,lde->blqe", states - lim.whiten_mean, lim.whiten_matrix)
        .transpose(0, 1)
        .flatten(1, 2)
    )
    cov = z.mT @ z / z.shape[1]  # (L_sel, D, D)
    torch.testing.assert_close(cov, torch.eye(d).expand_as(cov), atol=0.05, rtol=0)
    with pytest.raises(ConfigError, match="lim.whiten=true"):
        make_tiny().lim.fit_whitening(states)


def test_stage1_with_whitening_fits_before_training_saves_and_resumes(make_tiny, tmp_path):
    fresh = make_tiny(WHITEN)
    assert not fresh.lim.whitened
    full, result = _tiny_run(make_tiny, tmp_path, steps=6, out="full", save_every=3, model=fresh)
    assert full.lim.whitened and int(full.lim.whiten_samples) == 12
    loaded = ParaUni.from_pretrained(result.model_dir)
    for name in ("whiten_mean", "whiten_matrix", "whiten_samples"):
        assert torch.equal(getattr(loaded.lim, name), getattr(full.lim, name)), name
    _tiny_run(make_tiny, tmp_path, steps=6, out="broken", save_every=3, model=make_tiny(WHITEN))
    for name in ("model.safetensors", "config.yaml"):
        (tmp_path / "broken" / name).unlink()
    resumed, _ = _tiny_run(
        make_tiny, tmp_path, steps=6, out="broken", resume=True, save_every=3, model=make_tiny(WHITEN)
    )
    a, b = full.trained_state_dict(), resumed.trained_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and "lim.whiten_matrix" in a
