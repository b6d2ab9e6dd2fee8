"""Errors that name their file and line, warnings for what would be scored silently wrong, files that
teammates can read (issue 19, items 6 and 7)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.errors import TrainingDiverged
from parauni.eval.geneval import score_geneval
from parauni.utils.files import read_lines, save_safetensors, umask
from parauni.world.captions import single_object_row
from parauni.world.detector import world_classes, world_detector


def _layout(out: Path, rows: list[dict], metadata_text: list[str] | None = None) -> None:
    """A GenEval folder: one grey 32 px sample per prompt, its row as metadata.jsonl (or the given text)."""
    for i, row in enumerate(rows):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        Image.new("RGB", (32, 32), (128, 128, 128)).save(folder / "samples" / "0000.png")
        text = metadata_text[i] if metadata_text else json.dumps(row) + "\n"
        (folder / "metadata.jsonl").write_text(text)


def test_a_broken_metadata_file_in_a_geneval_folder_is_named_with_its_line(capsys, tmp_path):
    rows = [single_object_row("circle"), single_object_row("square")]
    _layout(tmp_path / "images", rows, [json.dumps(rows[0]) + "\n", "\n" + '{"tag": "single_object", "incl'])
    argv = ["eval", "geneval-score", "--images", str(tmp_path / "images"), "--detector", "world"]
    assert main([*argv, "--out", str(tmp_path / "scores.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{tmp_path / 'images' / '00001' / 'metadata.jsonl'}, line 2: bad metadata row" in err
    assert "delete its prompt folder and rerun" in err


def test_rows_with_classes_the_detector_does_not_know_are_warned_about(tmp_path):
    rows = [single_object_row("circle"), {**single_object_row("circle"), "prompt": "a photo of a dragon"}]
    rows[1]["include"] = [{"class": "dragon", "count": 1}]
    _layout(tmp_path / "images", rows)
    detector, colors = world_detector()
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) name object classes .* 00001 'a photo of a dragon'"):
        summary = score_geneval(
            tmp_path / "images", detector, colors, tmp_path / "r.jsonl", classes=world_classes()
        )
    assert summary["counts"]["single_object"] == 2


def test_read_lines_names_the_file_and_line_of_a_non_utf8_byte(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa\nb\n".encode() + b"c\xff\n")
    with pytest.raises(ValueError, match=r"p.txt, line 3: byte 0xff at column 2 is not UTF-8"):
        read_lines(path, "--prompts")
    path.write_bytes("\ufeffa\nb\n".encode())
    assert read_lines(path, "--prompts") == ["a", "b"]  # a UTF-8 byte-order mark is not part of line 1


def test_safetensors_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert stat.S_IMODE(out.stat().st_mode) == 0o644  # what open() gives every other file of a run
        os.umask(0o077)
        assert umask() == 0o077
        again = save_safetensors({"w": torch.ones(2)}, tmp_path / "private.safetensors")
        assert stat.S_IMODE(again.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not list(tmp_path.glob("*.tmp"))


def test_the_training_data_cache_is_readable_by_the_group(tmp_path):
    from parauni.training.data import FolderSource

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    old = os.umask(0o022)
    try:
        FolderSource(data, 16, progress=False)
    finally:
        os.umask(old)
    [cache] = (data / ".parauni_cache").glob("*.safetensors")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o644


def test_a_diverged_training_is_one_line(capsys, monkeypatch):
    import parauni.cli.generate

    def diverge(args, overrides):
        raise TrainingDiverged("5 steps in a row had a non-finite loss or gradient; lower train.lr")

    monkeypatch.setattr(parauni.cli.generate, "cmd_info", diverge)
    assert main(["info", "tiny"]) == 2
    assert capsys.readouterr().err == (
        "parauni info: error: 5 steps in a row had a non-finite loss or gradient; lower train.lr\n"
    )


@pytest.mark.parametrize(
    "bug", [TypeError("object of type 'int' has no len()"), ValueError("a bug"), KeyError("k")]
)
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    """Only the project's own errors become one line (issue 16): a built-in exception from a command is a bug
    and reaches the caller (Python prints its traceback), even a ValueError."""
    import parauni.cli.generate

    def broken(args, overrides):
        raise bug

    monkeypatch.setattr(parauni.cli.generate, "cmd_info", broken)
    with pytest.raises(type(bug)):
        main(["info", "tiny"])


def test_every_project_error_is_a_paraunierror():
    from parauni import errors
    from parauni.models.components import ComponentLoadError
    from parauni.scoring.clip import RewardModelError
    from parauni.serve import ServeError
    from parauni.training.streaming import CorruptSample
    from parauni.utils.files import OutputPathError
    from parauni.world.pretrain import Stage0Error
    from parauni.world.release import ReleaseError

    named = [getattr(errors, n) for n in dir(errors) if n.endswith(("Error", "Diverged"))]
    named += [ComponentLoadError, RewardModelError, ServeError, CorruptSample, OutputPathError, Stage0Error]
    named += [ReleaseError]
    for cls in named:
        assert issubclass(cls, errors.ParaUniError), cls
    # the built-in bases callers and tests catch stay
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DataError, ValueError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.WeightsError, OSError) and issubclass(errors.CheckpointError, RuntimeError)


def test_read_json_names_the_file_line_and_column(tmp_path):
    from parauni.utils.files import read_json

    path = tmp_path / "state.json"
    path.write_text('{\n  "step": 4,\n  "lr": \n')
    with pytest.raises(
        ValueError,
        match=r"checkpoint state .*state.json, line 4, column 1: not valid JSON \(Expecting value\)",
    ):
        read_json(path, "checkpoint state")
    path.write_text('{"step": 4}')
    assert read_json(path) == {"step": 4}
