"""Own images and an own language model (issue 18): model folders that travel, runs that do not mix, data
caches keyed by what made them, counted data surprises, the backbone traps, and docs/own-data.md run quickly."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image

from parauni.cli import main, split_overrides
from parauni.config import ConfigError, SamplingConfig, load_model_config
from parauni.models.components import ComponentLoadError, load_vlm, portable_path, resolve_path
from parauni.models.parauni import ParaUni, distinct_prompts
from parauni.models.tokenizer import BASIC_CORPUS, train_bpe_tokenizer
from parauni.training.data import FolderSource
from parauni.training.latents import encoder_key

DOC = Path(__file__).parent.parent / "docs" / "own-data.md"
QUICK = ["--train.steps=2", "--train.batch_size=4", "--train.warmup=1", "--train.log_every=1"]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny bidirectional encoder (``BertModel``) with a locally trained tokenizer, saved as a HF folder."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("bert")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        model = tf.BertModel(
            tf.BertConfig(
                vocab_size=512,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
            )
        )
    model.save_pretrained(folder)
    train_bpe_tokenizer(BASIC_CORPUS, vocab_size=512).save_pretrained(folder)
    return folder


def _digits_folder(folder: Path, n: int = 8, uncaptioned: int = 0) -> Path:
    """``n`` 32x32 images with captions as name.png + name.txt, and images without (one with an empty .txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n + uncaptioned):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        if i < n:
            (folder / f"{i:02d}.txt").write_text(f"a handwritten digit {i % 10}")
        elif i == n:
            (folder / f"{i:02d}.txt").write_text("  \n")
    return folder


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--stage", "1", "--data", str(data), "--model", "tiny", "--out", str(out), "--quiet"]
                + QUICK + list(extra))  # fmt: skip


# ------------------------------------------------------------------------------------- item 2: folders travel
def test_paths_are_folder_relative(tmp_path, monkeypatch):
    (tmp_path / "lm").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_path("lm", None) == str(tmp_path / "lm")  # cwd-relative becomes absolute
    assert resolve_path("org/model-id", None) == "org/model-id"  # a Hugging Face id is left alone
    assert portable_path(str(tmp_path / "run" / "vlm"), tmp_path / "run") == str(tmp_path / "run" / "vlm")
    (tmp_path / "run" / "vlm").mkdir(parents=True)
    assert portable_path(str(tmp_path / "run" / "vlm"), tmp_path / "run") == "vlm"
    assert portable_path("lm", tmp_path / "run") == "../lm"  # outside: relative too, pinned by sha256


def test_stage2_folder_loads_from_any_cwd_and_after_moving(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = ParaUni.from_config(tiny_config()).save_pretrained("runs/s1")  # VLM / VAE copied in: vlm/, vae/
    s1 = ParaUni.from_pretrained("runs/s1")
    s1.save_pretrained("runs/s2")
    cfg = yaml.safe_load((tmp_path / "runs/s2/config.yaml").read_text())
    assert cfg["vlm"]["path"] == "../s1/vlm"  # outside the folder: relative, and its files' sha256 recorded
    assert yaml.safe_load((first / "config.yaml").read_text())["vlm"]["path"] == "vlm"  # inside: relative
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = ParaUni.from_pretrained(tmp_path / "runs/s2")
    torch.testing.assert_close(again.queries, s1.queries, rtol=0, atol=0)
    # a folder with its components inside moves whole
    shutil.move(tmp_path / "runs/s1", tmp_path / "moved_s1")
    moved = ParaUni.from_pretrained(tmp_path / "moved_s1")
    torch.testing.assert_close(moved.queries, s1.queries, rtol=0, atol=0)


def test_weights_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        folder = ParaUni.from_config(tiny_config()).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------- item 3: runs do not mix
def test_resume_without_checkpoint_fails_and_log_holds_each_step_once(tmp_path, capsys):
    data = _digits_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert _train(data, run, "--train.save_every=0", "--resume") == 2
    assert "--resume" in capsys.readouterr().err  # an empty folder: nothing to continue
    assert _train(data, run, "--train.steps=3", "--train.save_every=2") == 0
    assert _train(data, run) == 2
    assert "already holds a run" in capsys.readouterr().err  # a fresh run into a used folder is refused
    shutil.rmtree(run / "checkpoints")
    assert _train(data, run, "--train.steps=3", "--resume") == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert _train(data, run, "--train.steps=4", "--train.save_every=2", "--overwrite") == 0
    log = run / "train_log.jsonl"
    # a run killed after step 3 was logged (its last checkpoint: step 2)
    capsys.readouterr()
    assert _train(data, run, "--train.steps=5", "--train.save_every=2", "--resume") == 0
    assert "steps 2-5 of 5" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4


# ------------------------------------------------------------------------------------- item 4: data caches
def test_cache_key_hashes_the_vae_weights_and_cache_dir_is_used(tmp_path):
    a = ParaUni.from_config(tiny_config())
    b = ParaUni.from_config(tiny_config(["--seed=5"]))  # same arch, other weights
    assert encoder_key(a.vae) == encoder_key(ParaUni.from_config(tiny_config()).vae)
    assert encoder_key(a.vae) != encoder_key(b.vae) and encoder_key(None) == "pixels"
    data = _digits_folder(tmp_path / "data", n=3)
    cache = tmp_path / "cache"
    for model in (a, b):
        FolderSource(data, 32, model.encode_images, encoder_key(model.vae), cache_dir=cache, progress=False)
    assert len(list(cache.glob("*.safetensors"))) == 2 and not (data / ".parauni_cache").exists()
    again = FolderSource(data, 32, None, encoder_key(b.vae), cache_dir=cache, progress=False)
    with torch.no_grad():
        expected = b.encode_images(FolderSource(data, 32, progress=False, cache_dir=tmp_path / "px").inputs)
    torch.testing.assert_close(again.inputs, expected)  # b's latents, read back from the cache


# ------------------------------------------------------------------------------------- item 5: data surprises
def test_uncaptioned_images_counted_and_image_size_from_the_model(tmp_path, capsys):
    data = _digits_folder(tmp_path / "data", n=6, uncaptioned=3)
    with pytest.warns(UserWarning, match="left out 3 image"):
        assert _train(data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "6 image-caption pairs" in out and "left out 3 image(s) without a caption" in out
    assert "training at 64 px" in out  # the tiny preset samples at 64: no 1024 default
    with pytest.warns(UserWarning, match="left out 3 image"):
        assert _train(data, tmp_path / "run32", "--image-size", "32") == 0
    cfg = yaml.safe_load((tmp_path / "run32/config.yaml").read_text())
    assert cfg["sampling"]["height"] == cfg["sampling"]["width"] == 32  # generate samples at the trained size
    assert _train(tmp_path / "data", tmp_path / "run_bad", "--sampling.width=32") == 2
    assert "give --image-size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- item 6: backbone traps
def test_path_override_drops_the_presets_arch_and_text_fields_are_raw():
    cfg = load_model_config(
        "tiny", ["--vlm.kind=causal_lm", "--vlm.path=/some/lm", "--vlm.template=Draw: {caption}"]
    )
    assert cfg.vlm.arch is None and cfg.vlm.template == "Draw: {caption}"
    assert load_model_config("tiny", ["--vlm.template={caption}"]).vlm.template == "{caption}"
    kept = load_model_config("tiny", ["--vlm.path=/x", "--vlm.arch.text_config.hidden_size=64"])
    assert kept.vlm.arch is not None  # an arch given with the path stays
    assert "<|im_start|>" not in cfg.vlm.template + cfg.vlm.uncond_template  # no Qwen chat tokens for any LM


def test_info_with_an_own_lm_on_a_preset_that_has_an_arch(bert_dir, capsys):
    assert main(["info", "tiny", "--vlm.kind=text_encoder", f"--vlm.path={bert_dir}"]) == 0
    assert "text_encoder" in capsys.readouterr().out


def test_bidirectional_encoder_refused_as_causal_lm(bert_dir, llama_lm_dir):
    cfg = load_model_config("own_small", ["--vlm.kind=causal_lm", f"--vlm.path={bert_dir}"])
    with pytest.raises(ComponentLoadError, match="--vlm.kind=text_encoder"):
        load_vlm(cfg.vlm)
    load_vlm(load_model_config("own_small", [f"--vlm.path={llama_lm_dir}"]).vlm)  # a decoder is accepted
    enc = load_vlm(load_model_config("own_small", ["--vlm.kind=text_encoder", f"--vlm.path={bert_dir}"]).vlm)
    states = enc.query_states(enc.encode_prompts(["a red circle", None]), torch.randn(3, 32))
    assert states.shape == (2, 3, 3, 32)


def test_seed_override_accepted_and_nonfinite_refused():
    assert split_overrides(["--seed=1", "--name=mine"]) == ["--seed=1", "--name=mine"]
    with pytest.raises(ConfigError):
        split_overrides(["--stepz=3"])
    for bad in (math.nan, math.inf):
        with pytest.raises(ConfigError, match="finite"):
            SamplingConfig(cfg=bad)
        with pytest.raises(ConfigError, match="finite"):
            SamplingConfig(shift=bad)


def test_quiet_turns_off_transformers_progress_bars(tmp_path):
    import diffusers
    import huggingface_hub
    import transformers

    argv = [
        "train",
        "--stage",
        "1",
        "--data",
        str(tmp_path / "none"),
        "--model",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    hub_was_off = huggingface_hub.utils.are_progress_bars_disabled()
    try:
        assert main([*argv, "--quiet"]) == 2  # the data is missing; --quiet acted before anything else
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert huggingface_hub.utils.are_progress_bars_disabled()
    finally:  # back as before (conftest turns the hub's bars off through its environment variable)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not hub_was_off:
                huggingface_hub.utils.enable_progress_bars()
            transformers.utils.logging.enable_progress_bar()
            diffusers.utils.logging.enable_progress_bar()


def test_distinct_prompts_give_the_same_condition(tiny_model):
    captions = ["a red circle", None, "a red circle", "a blue square", None]
    batch = tiny_model.encode_prompts(captions)
    unique, rows = distinct_prompts(batch)
    assert len(unique.input_ids) == 3 and rows.tolist()[0] == rows.tolist()[2]
    with torch.no_grad():
        each = tiny_model.lim(tiny_model.vlm.query_states(batch, tiny_model.queries))
        torch.testing.assert_close(tiny_model.condition(batch), each, rtol=1e-5, atol=1e-5)


def test_lm_teacher_tells_prompts_apart(tiny_model):
    from parauni.training.teacher import lm_teacher

    teacher = lm_teacher(tiny_model)
    states, mask = teacher(["a red circle", "a blue square", None, "a red circle"])
    q, c = tiny_model.queries.shape[0], tiny_model.dit.config.caption_channels
    assert states.shape == (4, q, c) and mask.shape == (4, q)  # a target for every query token
    torch.testing.assert_close(states[0], states[3])
    assert (states[0] - states[1]).norm() > 0.1 * states[0].norm()
    assert (states[0, 0] - states[0, 1]).norm() > 0.5 * states[0, 0].norm()  # one projection per token
    assert 0.5 < states.pow(2).mean().sqrt() < 2.0  # about unit RMS per channel


def spread(states: torch.Tensor) -> float:
    """Mean distance of (N, Q, C) targets from their mean over N, relative to their mean norm."""
    return float((states - states.mean(0)).norm(dim=-1).mean() / states.norm(dim=-1).mean())


def test_lm_teacher_standardised_over_the_training_captions(tiny_model):
    """What the captions share is removed: their targets differ at about the scale of the targets themselves."""
    from parauni.training.teacher import lm_teacher

    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five")]
    plain = lm_teacher(tiny_model)(captions)[0]
    fitted = lm_teacher(tiny_model, captions=captions * 3)(captions)[0]  # repeats count once
    assert spread(plain) < 0.5 and spread(fitted) > 0.7, (spread(plain), spread(fitted))
    assert 0.5 < fitted.pow(2).mean().sqrt() < 2.0
    again = lm_teacher(tiny_model, captions=list(reversed(captions)))(captions)[0]  # order does not matter
    torch.testing.assert_close(fitted, again)


def test_own_small_dit_has_positions():
    """own_small's DiT gets sin-cos positions (SANA has none; a 4-layer DiT from scratch needs them)."""
    from parauni.models.components import load_dit

    dit = load_dit(load_model_config("own_small").dit, meta=True)
    assert dit.config.interpolation_scale == 1 and dit.patch_embed.pos_embed is not None


def test_cli_teacher_gets_the_training_captions(tmp_path, monkeypatch, bert_dir):
    import parauni.training.teacher as teacher_module

    seen = {}
    real = teacher_module.lm_teacher

    def spy(model, seed=0, captions=None, **kw):
        seen["captions"] = captions
        return real(model, seed=seed, captions=captions, **kw)

    monkeypatch.setattr(teacher_module, "lm_teacher", spy)
    data = _digits_folder(tmp_path / "digits", n=6)
    argv = ["train", "--stage", "2", "--data", str(data), "--model", "own_small", "--out", str(tmp_path / "run"),
            "--quiet"]  # fmt: skip
    argv += ["--vlm.kind=text_encoder", f"--vlm.path={bert_dir}", "--train.condition_distill=1.0"]
    assert main(argv + QUICK) == 0
    expected = sorted(f"a handwritten digit {i}" for i in range(6))
    assert sorted(seen["captions"]) == expected


# ------------------------------------------------------------------------------------- the worked example
def doc_commands() -> list[str]:
    """The ``parauni`` lines of docs/own-data.md's worked example (the block after 'worked example')."""
    text = DOC.read_text()
    block = re.search(r"<!-- worked example -->\s*```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("parauni ")]


def test_docs_worked_example_runs_quickly(tmp_path, monkeypatch, bert_dir, capsys):
    data = _digits_folder(tmp_path / "digits", n=10)
    monkeypatch.chdir(tmp_path)
    env = {"$DATA": str(data), "$LM": str(bert_dir)}
    commands = doc_commands()
    assert any(c.startswith("parauni train") for c in commands) and any("generate" in c for c in commands)
    for command in commands:
        for name, value in env.items():
            command = command.replace(name, value)
        argv = shlex.split(command)[1:]
        if argv[0] == "train":
            argv += QUICK  # later overrides win: the doc's other options (condition_distill) stay
        if argv[0] == "generate":
            argv += ["--steps", "2"]
        assert main(argv) == 0, capsys.readouterr().err
