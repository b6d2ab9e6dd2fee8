"""Reconstruction evaluation: PSNR / SSIM against hand-computed values, CLIP similarity with a tiny random
CLIP saved and reloaded offline, `reconstruct_folder` on the tiny preset, and ``parauni eval reconstruct``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.eval.reconstruct import (
    SSIM_SIGMA,
    clip_similarity,
    psnr,
    read_image_folder,
    reconstruct_folder,
    side_by_side,
    ssim,
)
from parauni.pipeline import GenerationOptions
from parauni.scoring.clip import CLIPEmbedder

C1 = (0.01 * 2) ** 2
C2 = (0.03 * 2) ** 2


def _rand(n: int = 2, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _noisy(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ PSNR


def test_psnr_is_inf_for_identical_images_and_follows_the_formula_for_a_constant_offset():
    x = _rand().double() * 0.5  # float64 so that x + d is exact enough for rtol 1e-9
    assert torch.isinf(psnr(x, x)).all()
    for d in (0.1, 0.25, 0.5):
        expected = 10 * math.log10(4 / d**2)
        np.testing.assert_allclose(psnr(x, x + d).numpy(), [expected, expected], rtol=1e-9)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :, :-1])


# ------------------------------------------------------------------------------------------------ SSIM


def test_ssim_is_one_for_identical_images():
    x = _rand()
    np.testing.assert_allclose(ssim(x, x).numpy(), [1.0, 1.0], atol=1e-12)


def test_ssim_of_constant_images_is_the_luminance_term():
    for c1, c2 in ((0.2, -0.3), (0.5, 0.5), (-0.9, 0.1)):
        a, b = torch.full((1, 3, 16, 16), c1), torch.full((1, 3, 16, 16), c2)
        expected = (2 * c1 * c2 + C1) / (c1**2 + c2**2 + C1)  # variances and covariance are 0
        np.testing.assert_allclose(ssim(a, b).item(), expected, rtol=1e-6)


def test_ssim_on_an_11px_image_is_one_gaussian_weighted_window():
    """At 11 x 11 the valid region is the single centre position: the statistics are plain weighted sums."""
    a, b = _rand(1, 11, seed=3), _rand(1, 11, seed=4)
    r = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * SSIM_SIGMA**2))
    w = w / w.sum()
    values = []
    for ch in range(3):
        x, y = a[0, ch].double(), b[0, ch].double()
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
        cxy = (w * (x - mx) * (y - my)).sum()
        values.append(((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2)))
    np.testing.assert_allclose(ssim(a, b).item(), torch.stack(values).mean().item(), rtol=1e-9)


def test_ssim_is_symmetric_below_one_for_noise_and_decreases_with_more_noise():
    x = _rand(2, 32) * 0.5
    scores = [ssim(x, _noisy(x, std)) for std in (0.05, 0.2, 0.5)]
    for s in scores:
        assert (s < 1).all()
    assert (scores[0] > scores[1]).all() and (scores[1] > scores[2]).all()
    y = _noisy(x, 0.2)
    np.testing.assert_allclose(ssim(x, y).numpy(), ssim(y, x).numpy(), rtol=1e-12)


def test_ssim_on_images_smaller_than_the_window_uses_an_odd_window_of_the_image_size():
    x = _rand(1, 8)
    assert ssim(x, x).item() == pytest.approx(1.0)
    assert ssim(x, _noisy(x, 0.3)).item() < 1
    a, b = torch.full((1, 3, 5, 8), 0.4), torch.full((1, 3, 5, 8), -0.2)
    expected = (2 * 0.4 * -0.2 + C1) / (0.4**2 + 0.2**2 + C1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def clip(clip_dir):
    return CLIPEmbedder.from_pretrained(clip_dir, text=False)


def test_clip_similarity_is_one_for_identical_images_and_the_embedding_cosine_otherwise(clip):
    x, y = _rand(3, 40, seed=5), _rand(3, 40, seed=6)
    np.testing.assert_allclose(clip_similarity(clip, x, x).numpy(), np.ones(3), atol=1e-5)
    with torch.no_grad():
        ea, eb = (clip.model.get_image_features(pixel_values=clip.preprocess(im)) for im in (x, y))
    # Newer transformers return an output object whose pooler_output holds the projected features.
    ea, eb = (getattr(e, "pooler_output", e) for e in (ea, eb))
    expected = torch.nn.functional.cosine_similarity(ea, eb, dim=-1)
    np.testing.assert_allclose(clip_similarity(clip, x, y, batch_size=2).numpy(), expected.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ folders


def _image_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 64), (80, 60), (50, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "corrupt.png").write_bytes(b"not a png at all")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (64, 64)
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).double() / 127.5 - 1


def test_reconstruct_folder_writes_pngs_and_metrics_and_skips_unreadable_files(tmp_path, tiny_model, clip):
    images = _image_folder(tmp_path / "in")
    result = reconstruct_folder(
        tiny_model,
        images,
        tmp_path / "out",
        options=GenerationOptions(steps=2, batch_size=2),
        clip=clip,
        progress=False,
    )
    assert result.files == ["img0.png", "img1.png", "img2.png"]
    assert [s["file"] for s in result.skipped] == ["corrupt.png"] and "corrupt" in result.skipped[0]["error"]
    assert result.inputs.shape == result.outputs.shape == (3, 3, 64, 64)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["skipped"] == result.skipped
    # The metrics are those of the written PNGs against the resized inputs.
    written = torch.stack([_read_png(tmp_path / "out" / r["output"]) for r in metrics["per_image"]])
    expected_psnr = psnr(result.inputs, written.float())
    expected_ssim = ssim(result.inputs, written.float())
    for i, row in enumerate(metrics["per_image"]):
        assert row["psnr"] == pytest.approx(expected_psnr[i].item(), rel=1e-5)
        assert row["ssim"] == pytest.approx(expected_ssim[i].item(), abs=1e-6)
        assert -1 <= row["clip_similarity"] <= 1
    for key in ("psnr", "ssim", "clip_similarity"):
        assert metrics["mean"][key] == pytest.approx(
            np.mean([r[key] for r in metrics["per_image"]]), rel=1e-6
        )
    # Reconstruction is reproducible from the seed.
    options = GenerationOptions(steps=2, batch_size=3)
    again = reconstruct_folder(tiny_model, images, tmp_path / "again", options=options, progress=False)
    torch.testing.assert_close(again.outputs, result.outputs, atol=2 / 255, rtol=0)
    assert "clip_similarity" not in again.metrics["mean"]


def test_read_image_folder_errors_name_the_folder(tmp_path):
    from parauni.utils.images import ImageReadError

    with pytest.raises(ImageReadError, match="does not exist"):
        read_image_folder(tmp_path / "missing", 64, 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(ImageReadError, match="no readable image"):
        read_image_folder(tmp_path / "bad", 64, 64)


def test_side_by_side_writes_a_png_and_checks_columns(tmp_path):
    x = _rand(2, 16)
    path = side_by_side({"input": x, "model": _noisy(x, 0.1)}, tmp_path / "fig.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
    with pytest.raises(ValueError, match="same number"):
        side_by_side({"input": x, "model": x[:1]}, tmp_path / "bad.png")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_eval_reconstruct_compares_models(tmp_path, capsys, clip_dir, make_tiny):
    """An all-layer preset against a saved last-layer model, then the same model twice (index-named)."""
    images = _image_folder(tmp_path / "in")
    last = make_tiny(["lim.layers=last"]).save_pretrained(tmp_path / "last")
    out = tmp_path / "out"
    args = ["eval", "reconstruct", "--model", "tiny", "--model", str(last), "--images", str(images)]
    assert main([*args, "--out", str(out), "--clip", str(clip_dir), "--steps", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "SSIM" in text and "CLIP sim" in text and "corrupt.png" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("tiny ", "last "))]
    assert [r[:2] for r in rows] == [["tiny", "3"], ["last", "3"]]
    assert all(-1 <= float(r[4]) <= 1 for r in rows)  # CLIP similarity column
    for name in ("tiny", "last"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["img0.png", "img1.png", "img2.png", "metrics.json"]
    with Image.open(out / "side_by_side.png") as img:
        assert img.format == "PNG"
    summary = json.loads((out / "reconstruct.json").read_text())
    assert [(m["name"], m["lim_layers"]) for m in summary["models"]] == [("tiny", "all"), ("last", "last")]
    assert summary["skipped"][0]["file"] == "corrupt.png"
    for row, model in zip(rows, summary["models"], strict=True):
        assert float(row[2]) == pytest.approx(model["mean"]["psnr"], abs=1e-4)

    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "eval",
                "reconstruct",
                "--model",
                "tiny",
                "--model",
                "tiny",
                "--images",
                str(images),
                "--out",
                str(out2),
                "--steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )  # the same model twice
    summary = json.loads((out2 / "reconstruct.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["0_tiny", "1_tiny"]
    # The same model and seed reconstruct the same way.
    assert summary["models"][0]["mean"] == pytest.approx(summary["models"][1]["mean"], rel=1e-6)


def test_cli_eval_reconstruct_errors(tmp_path, capsys):
    base = ["eval", "reconstruct", "--model", "tiny", "--out", str(tmp_path / "out")]
    assert main([*base, "--images", str(tmp_path / "missing")]) == 2
    assert "parauni eval reconstruct: error:" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    assert main([*base, "--images", str(tmp_path / "bad")]) == 2
    assert "no readable image" in capsys.readouterr().err
