"""The ``parauni`` command line, called in-process (plus one run of the installed script)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parauni.cli import main

FAST = ["--steps", "2", "--quiet"]


def _counts(text: str) -> dict[str, tuple[int, int]]:
    """The (trainable, frozen) columns of the parameter table printed by ``parauni info``."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s+(vlm|queries|lim|dit|vae|total)\s+([\d,]+)\D.*?\s([\d,]+)(\s|$)", line)
        if m:
            rows[m.group(1)] = (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
    return rows


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def _write_image(path: Path, size=(40, 30), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------ info


def test_info_tiny(capsys, tiny_model):
    assert main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "ParaUni model 'tiny'" in out and "meta device" in out
    assert "4 decoder layers, width 64" in out and "Q = 8" in out
    assert "layers 'all': 4 of 4 [0, 1, 2, 3]" in out and "connector 2 x 64 (4 heads)" in out
    rows = _counts(out)
    expected = tiny_model.parameter_counts()
    for name in ("vlm", "queries", "lim", "dit", "vae"):
        assert rows[name] == (expected[name]["trainable"], expected[name]["frozen"]), name
    assert rows["lim"] == (69_088, 0) and rows["queries"] == (512, 0)


def test_info_paper_reports_the_paper_sizes(capsys, tmp_path):
    assert main(["info", "paper", "--json", str(tmp_path / "info.json")]) == 0
    out = capsys.readouterr().out
    assert "28 decoder layers, width 1536" in out and "Q = 256" in out
    assert "caption_channels 2304" in out and "AutoencoderDC f32c32" in out
    rows = _counts(out)
    assert 1.85e9 < rows["vlm"][1] < 1.87e9 and rows["vlm"][0] == 0
    assert 1.59e9 < rows["dit"][1] < 1.61e9 and rows["dit"][0] == 0
    assert rows["queries"] == (256 * 1536, 0)
    assert re.search(r"vlm\s+0\s+1,85\d,\d{3},\d{3} \(1\.86B\)", out)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["num_layers"] == 28 and info["num_queries"] == 256
    assert info["parameters"]["vlm"]["frozen"] == rows["vlm"][1]
    assert info["parameters"]["dit"]["frozen"] == rows["dit"][1]


def test_info_with_overrides(capsys):
    assert main(["info", "tiny", "--lim.layers=interval", "--lim.use_layernorm=false"]) == 0
    out = capsys.readouterr().out
    assert "layers 'interval': 2 of 4 [1, 3]" in out and "LayerNorm off" in out


def test_unknown_override_key_exits_2_naming_it(capsys):
    assert main(["info", "tiny", "--lim.bogus=3"]) == 2
    err = capsys.readouterr().err
    assert "lim.bogus" in err and "unknown config key" in err


def test_a_stray_argument_exits_2(capsys):
    assert main(["info", "tiny", "--verbose"]) == 2
    assert "--verbose" in capsys.readouterr().err


def test_unknown_preset_exits_2(capsys):
    assert main(["info", "no_such_preset"]) == 2
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ generate


def test_generate_writes_pngs_of_the_requested_size(capsys, tmp_path):
    out = tmp_path / "out"
    args = ["generate", "--model", "tiny", "--prompt", "a red circle", "--prompt", "a cat", "--out", str(out)]
    assert main([*args, "--height", "32", "--width", "48", *FAST]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0000.png", "0001.png"]
    for name in files:
        pixels = _png(out / name)
        assert pixels.shape == (32, 48, 3) and pixels.std() > 0
    assert "wrote 2 image(s)" in capsys.readouterr().out


def test_generate_to_a_single_png_with_overrides(tmp_path):
    target = tmp_path / "sub" / "one.png"
    args = ["generate", "--model", "tiny", "--prompt", "a cat", "--out", str(target), *FAST]
    assert main([*args, "--sampling.height=40", "--sampling.width=24", "--sampler", "euler"]) == 0
    assert _png(target).shape == (40, 24, 3)


def test_generate_from_prompt_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a red circle\n\n  a blue square  \nthree dogs\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a cat", "tag": "x"}\n\n{"prompt": "a dog"}\n')
    common = ["--height", "32", "--width", "32", "--batch-size", "2", *FAST]
    assert (
        main(
            ["generate", "--model", "tiny", "--prompts-file", str(txt), "--out", str(tmp_path / "a"), *common]
        )
        == 0
    )
    assert len(list((tmp_path / "a").glob("*.png"))) == 3
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--prompts-file",
                str(jsonl),
                "--out",
                str(tmp_path / "b"),
                *common,
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["0000.png", "0001.png"]


def test_bad_prompt_files_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"text": "no prompt key"}\n')
    assert (
        main(["generate", "--model", "tiny", "--prompts-file", str(bad), "--out", str(tmp_path / "o")]) == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert (
        main(["generate", "--model", "tiny", "--prompts-file", str(missing), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "missing.txt does not exist" in capsys.readouterr().err


def test_generate_image_to_image(tmp_path):
    single = _write_image(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--image",
                str(single),
                "--out",
                str(out),
                "--height",
                "32",
                "--width",
                "32",
                *FAST,
            ]
        )
        == 0
    )
    assert _png(out).shape == (32, 32, 3)
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        _write_image(folder / f"{i}.png", seed=i)
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--image",
                str(folder),
                "--out",
                str(tmp_path / "many"),
                "--height",
                "24",
                "--width",
                "40",
                *FAST,
            ]
        )
        == 0
    )
    files = sorted((tmp_path / "many").iterdir())
    assert len(files) == 3 and all(_png(f).shape == (24, 40, 3) for f in files)


def test_generate_from_a_saved_model_folder(tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "x.png"
    assert (
        main(
            [
                "generate",
                "--model",
                str(folder),
                "--prompt",
                "a cat",
                "--out",
                str(out),
                "--height",
                "16",
                "--width",
                "16",
                *FAST,
            ]
        )
        == 0
    )
    assert _png(out).shape == (16, 16, 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a cat", "--height", "30"], "height=30 does not fit"),
        (["--prompt", ""], "prompt 0 is empty"),
        ([], "nothing to generate"),
        (["--prompt", "a cat", "--lim.connector_heads=3"], "not divisible by lim.connector_heads=3"),
    ],
)
def test_generate_errors_exit_2(capsys, tmp_path, extra, message):
    assert main(["generate", "--model", "tiny", "--out", str(tmp_path / "o"), *extra, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_unreadable_image_exits_2_naming_the_file(capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("this is not a PNG")
    assert (
        main(["generate", "--model", "tiny", "--image", str(bad), "--out", str(tmp_path / "o"), *FAST]) == 2
    )
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot be read" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_image_and_prompt_exclude_each_other(capsys, tmp_path):
    img = _write_image(tmp_path / "in.png")
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny",
                "--image",
                str(img),
                "--prompt",
                "x",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "exclude each other" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ installed script


def test_installed_script_generates(tmp_path):
    script = shutil.which("parauni") or str(Path(sys.executable).parent / "parauni")
    assert Path(script).exists(), "the parauni console script is not installed"
    out = tmp_path / "img.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [script, "generate", "--model", "tiny", "--prompt", "a red circle", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--height", "32", "--width", "40", *FAST], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 image(s)" in proc.stdout
    assert _png(out).shape == (32, 40, 3)


def test_info_on_a_saved_model_folder(capsys, tmp_path, tiny_model):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    assert main(["info", str(folder)]) == 0
    meta = capsys.readouterr().out
    assert "ParaUni model 'tiny'" in meta and "meta device" in meta
    assert main(["info", str(folder), "--load"]) == 0
    loaded = capsys.readouterr().out
    assert "meta device" not in loaded and str(folder / "vlm") in loaded
    assert _counts(meta) == _counts(loaded) and _counts(loaded)["lim"] == (69_088, 0)
    assert main(["info", str(tmp_path)]) == 2  # a folder without config.yaml
    assert "config.yaml" in capsys.readouterr().err
