"""The command line fails early and in one line (issues 17 and 19): output locations, generation values,
memory, decompression bombs, files named with their line, and a self-describing CLI.

Every refusal below must come before any model is loaded (``ParaUni.load`` is replaced by one that fails the
test), so a mistake costs nothing, and must be one line on stderr naming the value and the fix.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import parauni.pipeline
from parauni.cli import main
from parauni.models.parauni import ParaUni

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (its checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(ParaUni, "load", refuse)


def _error(capsys) -> str:
    """The command's stderr, which must be exactly one line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _generate(tmp_path: Path, out: str | Path, *extra: str) -> int:
    return main(["generate", "--model", "tiny", "--prompt", "a red circle", "--out", str(out), *extra, *FAST])


def _write_image(path: Path, size=(40, 30)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _bomb_png(path: Path, side: int = 14000) -> Path:
    """A 1-bit PNG that says it is side x side (196 M pixels at 14000, over twice PIL's MAX_IMAGE_PIXELS)
    in a few bytes: PIL refuses it from the header, before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + side // 8) * 16)  # a few rows; PIL never gets that far
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )
    return path


# ------------------------------------------------------------------------------------------- output paths


def test_an_existing_file_as_out_folder_is_refused_before_any_work(capsys, tmp_path, no_model):
    existing = tmp_path / "notes"
    existing.write_text("keep me")
    start = time.perf_counter()
    assert _generate(tmp_path, existing) == 2
    assert time.perf_counter() - start < 1.0
    assert "is an existing file, not a folder" in _error(capsys)
    assert existing.read_text() == "keep me"
    assert _generate(tmp_path, existing / "x.png") == 2  # a file where a parent folder must go
    assert f"{existing} is a file, not a folder" in _error(capsys)


def test_an_existing_image_is_replaced_only_with_overwrite(capsys, tmp_path):
    target = _write_image(tmp_path / "x.png")
    before = target.read_bytes()
    assert _generate(tmp_path, target) == 2
    assert "already exists; pass --overwrite" in _error(capsys)
    assert target.read_bytes() == before
    assert _generate(tmp_path, target, "--overwrite") == 0
    assert target.read_bytes() != before


def test_out_with_an_image_suffix_writes_that_format_and_no_folder(tmp_path):
    assert _generate(tmp_path, tmp_path / "x.jpg") == 0
    assert (tmp_path / "x.jpg").is_file()
    with Image.open(tmp_path / "x.jpg") as img:
        assert img.format == "JPEG"


def test_an_unknown_suffix_and_a_folder_with_a_dot(capsys, tmp_path, no_model):
    assert _generate(tmp_path, tmp_path / "x.gif") == 2
    err = _error(capsys)
    assert "--out" in err and ".gif is not an image type" in err and "end it with /" in err
    assert not (tmp_path / "x.gif").exists()


def test_images_already_in_the_out_folder_are_not_replaced(capsys, tmp_path, no_model):
    out = tmp_path / "imgs"
    out.mkdir()
    _write_image(out / "0000.png")
    assert _generate(tmp_path, out) == 2
    assert "0000.png already exists; pass --overwrite" in _error(capsys)


def test_a_read_only_output_folder_is_refused(capsys, tmp_path, no_model, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: make the write check see a read-only folder
            import tempfile

            def read_only(*args, dir=None, **kwargs):
                raise PermissionError(13, "Permission denied", str(dir))

            monkeypatch.setattr(tempfile, "mkstemp", read_only)
        assert _generate(tmp_path, ro / "out") == 2
        assert f"cannot write in {ro} (Permission denied); choose a folder you can write to" in _error(capsys)
        assert main(["info", "tiny", "--json", str(ro / "info.json")]) == 2
        assert "cannot write in" in _error(capsys)
    finally:
        ro.chmod(0o755)


def test_every_writing_command_checks_its_out_first(capsys, tmp_path, no_model):
    existing = tmp_path / "file"
    existing.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    commands = [
        (["import-openuni", str(existing), "--out", str(full)], "already holds files; pass --overwrite"),
        (["eval", "reconstruct", "--model", "tiny", "--images", str(tmp_path), "--out", str(existing)], "not a folder"),
        (["eval", "geneval-score", "--images", str(tmp_path), "--detector", "world", "--out", str(full)], "is a folder"),
        (["eval", "dpg-score", "--images", str(tmp_path), "--out", str(existing)], "already exists"),
        (["analyze", "layers", "--model", "tiny", "--world", "--out", str(full)], "already holds files"),
        (["eval", "geneval", "--model", "tiny", "--metadata", str(existing), "--out", str(existing)], "not a folder"),
        (["info", "tiny", "--json", str(existing)], "already exists; pass --overwrite"),
        (["demo", "--out", str(full)], "already holds files; pass --overwrite"),
        (["train", "--stage", "1", "--data", str(tmp_path), "--model", "tiny", "--out", str(existing)], "not a folder"),
    ]  # fmt: skip
    for argv, message in commands:
        assert main(argv) == 2, argv
        assert message in _error(capsys), argv
    assert existing.read_text() == "x" and (full / "something").read_text() == "x"


def test_a_run_folder_needs_resume_or_overwrite(capsys, tmp_path, no_model):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("")
    argv = ["train", "--stage", "1", "--data", str(tmp_path), "--model", "tiny", "--out", str(run)]
    assert main(argv) == 2
    assert "already holds a run (checkpoints); pass --resume to continue it, --overwrite" in _error(capsys)
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "give one" in _error(capsys)


# ---------------------------------------------------------------------------------------- generation values


@pytest.mark.parametrize("cfg", ["nan", "inf", "-5"])
def test_non_finite_or_negative_cfg_is_refused(capsys, tmp_path, no_model, cfg):
    assert _generate(tmp_path, tmp_path / "o.png", f"--cfg={cfg}") == 2
    assert f"--cfg {float(cfg)}: must be a finite number >= 0" in _error(capsys)
    assert not (tmp_path / "o.png").exists()


def test_the_pipeline_refuses_nan_cfg_everywhere(tiny_model):
    for cfg in (float("nan"), float("inf"), -5.0):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            parauni.pipeline.generate(tiny_model, ["a cat"], cfg=cfg, steps=1, progress=False)


def test_dpm_steps_past_the_bound_are_refused(capsys, tmp_path):
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--out", str(tmp_path / "o.png"), "--quiet"]
    assert main([*argv, "--steps", "400"]) == 2
    assert "steps=400 is more than the DPM-Solver++ sampler takes at shift 3 (at most 350" in _error(capsys)


def test_a_huge_size_is_refused_with_the_memory_figure(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(parauni.pipeline, "available_memory", lambda device: 16 * 10**9)
    assert _generate(tmp_path, tmp_path / "o.png", "--height", "20000", "--width", "20000") == 2
    # the tiny DC-AE's first decoder block: 2 x 16 channels x 20000^2 pixels x 4 bytes = 51.2 GB
    assert (
        "20000x20000 images in batches of 1 need at least 51.2 GB of activations, more than the 16.0 GB free "
        "on cpu; lower --height / --width" in _error(capsys)
    )


def test_memory_estimate(tiny_model):
    from parauni.pipeline import estimate_memory

    assert estimate_memory(tiny_model, 64, 64, batch=1) == 2 * 16 * 64 * 64 * 4  # the decoder's first block
    assert estimate_memory(tiny_model, 64, 64, batch=3) == 3 * estimate_memory(tiny_model, 64, 64, batch=1)


# -------------------------------------------------------------------------------------------- input files


def test_a_decompression_bomb_in_generate_is_a_one_line_error(capsys, tmp_path, no_model):
    bomb = _bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 30_000
    assert (
        main(["generate", "--model", "tiny", "--image", str(bomb), "--out", str(tmp_path / "o"), *FAST]) == 2
    )
    err = _error(capsys)
    assert str(bomb) in err and "too large to read safely" in err


def test_a_non_utf8_prompts_file_names_the_file_and_line(capsys, tmp_path, no_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\na caf\xe9\n")
    argv = ["generate", "--model", "tiny", "--prompts-file", str(prompts), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert f"{prompts}, line 2: byte 0xe9 at column 6 is not UTF-8; save the file as UTF-8" in _error(capsys)


def test_train_takes_a_jsonl_file_and_skips_a_decompression_bomb(capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"image": _write_image(data / f"{i}.png").name, "caption": f"a red circle {i}"} for i in range(4)]
    rows.append({"image": _bomb_png(data / "bomb.png").name, "caption": "a bomb"})
    jsonl = data / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    argv = ["train", "--stage", "1", "--data", str(jsonl), "--model", "tiny", "--out", str(run), "--quiet"]
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        code = main(
            [*argv, "--image-size", "32", "--train.steps=1", "--train.batch_size=2", "--train.warmup=1"]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert f"data (folder): 4 image-caption pairs from {jsonl}; skipped 1 unreadable" in out
    assert (run / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- self-describing


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("parauni 0.")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--train.steps" in text and "(default: 100000 at stage 1, 10000 at stage 2)" in text
    assert "--train.batch_size" in text and "--train.lr" in text
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: 4)" in " ".join(capsys.readouterr().out.split())  # --batch-size


def test_a_missing_model_folder_says_so(capsys, tmp_path):
    assert _generate(tmp_path, tmp_path / "o.png", "--model", "/no/such/dir") == 2
    err = _error(capsys)
    assert "--model /no/such/dir: the folder does not exist" in err and "tiny" in err


def test_rl_world_without_model_names_the_folder_it_reads(capsys, tmp_path, monkeypatch, no_model):
    """`parauni rl --world` without --model trains parauni demo's Stage-II model in the working directory;
    where there is none, it says which folder it looked for and what to do (issue 16)."""
    monkeypatch.chdir(tmp_path)
    assert main(["rl", "--world", "--out", str(tmp_path / "rl"), "--quiet"]) == 2
    err = _error(capsys)
    assert "parauni-demo/stage2" in err and str(tmp_path) in err and "--model DIR" in err
