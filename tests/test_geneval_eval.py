"""GenEval on the command line: the official layout, resumable generation, scoring with the world's detector
and with precomputed detections, and `parauni eval geneval` end to end on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parauni.cli import main
from parauni.eval.geneval import (
    PrecomputedDetections,
    decode_rle,
    generate_geneval,
    score_geneval,
)
from parauni.pipeline import GenerationOptions
from parauni.scoring.geneval_rules import GENEVAL_TAGS
from parauni.world.captions import (
    color_attr_row,
    colors_row,
    counting_row,
    make_eval_metadata,
    position_row,
    read_metadata,
    scene_for,
    single_object_row,
    two_object_row,
    write_eval_metadata,
)
from parauni.world.detector import world_detector
from parauni.world.scene import render

# The official GenEval metadata lives in ../shared beside the repository (never copied into it).
OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"

ROWS = [single_object_row("circle"), colors_row("square", "red"), counting_row("triangle", 2)]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img)


def _mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _generate(model, out, batch_size=4, rows=ROWS):
    return generate_geneval(
        model,
        rows,
        out,
        images_per_prompt=2,
        options=GenerationOptions(seed=5, batch_size=batch_size, steps=1),
        progress=False,
    )


# ------------------------------------------------------------------------------------------- generation


def test_official_layout(tiny_model, tmp_path):
    out = tmp_path / "geneval"
    assert _generate(tiny_model, out) == {"generated": 3, "skipped": 0}
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    for i, row in enumerate(ROWS):
        folder = out / f"{i:05d}"
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == [row]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert _png(folder / "samples" / "0000.png").shape == (64, 64, 3)
    # The two images of a prompt have different noise seeds.
    assert not np.array_equal(_png(out / "00000/samples/0000.png"), _png(out / "00000/samples/0001.png"))


def test_resume_skips_complete_prompts_and_redoes_only_the_incomplete_one(tiny_model, tmp_path):
    out = tmp_path / "geneval"
    _generate(tiny_model, out)
    before = _mtimes(out)
    assert _generate(tiny_model, out) == {"generated": 0, "skipped": 3}
    assert _mtimes(out) == before

    removed = out / "00001/samples/0001.png"
    original = _png(removed)
    removed.unlink()
    assert _generate(tiny_model, out) == {"generated": 1, "skipped": 2}
    after = _mtimes(out)
    for name, mtime in before.items():
        assert (after[name] == mtime) == (not name.startswith("00001")), name
    np.testing.assert_array_equal(_png(removed), original)

    # A crash before metadata.jsonl was written leaves the prompt incomplete.
    (out / "00002/metadata.jsonl").unlink()
    assert _generate(tiny_model, out) == {"generated": 1, "skipped": 2}
    assert (out / "00002/metadata.jsonl").is_file()


def test_an_output_folder_of_other_metadata_is_refused(tiny_model, tmp_path):
    out = tmp_path / "geneval"
    _generate(tiny_model, out, rows=ROWS[:1])
    with pytest.raises(ValueError, match="another metadata file"):
        _generate(tiny_model, out, rows=ROWS[1:])


def test_invalid_rows_are_refused_before_generating(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown tag 'shapes'"):
        _generate(tiny_model, tmp_path / "g", rows=[{**ROWS[0], "tag": "shapes"}])
    assert not (tmp_path / "g").exists()


def test_images_do_not_depend_on_the_batch_size(tiny_model, tmp_path):
    _generate(tiny_model, tmp_path / "b1", batch_size=1)
    _generate(tiny_model, tmp_path / "b3", batch_size=3)
    _generate(tiny_model, tmp_path / "b8", batch_size=8)
    for name in _mtimes(tmp_path / "b1"):
        if name.endswith(".png"):
            ref = _png(tmp_path / "b1" / name).astype(int)
            for other in ("b3", "b8"):
                # Equal up to one grey level (batched matmuls may round differently).
                assert np.abs(_png(tmp_path / other / name).astype(int) - ref).max() <= 1, (other, name)


# ---------------------------------------------------------------------------------------------- scoring


def _write_layout(out: Path, rows: list[dict], images: list[list[np.ndarray]]) -> None:
    for i, (row, samples) in enumerate(zip(rows, images, strict=True)):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        for j, image in enumerate(samples):
            Image.fromarray(image).save(folder / "samples" / f"{j:04d}.png")
        (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")


def test_world_renders_score_one_with_the_world_detector(tmp_path):
    rows = [
        single_object_row("circle"),
        two_object_row("square", "cross"),
        counting_row("triangle", 3),
        colors_row("circle", "blue"),
        position_row("circle", "left of", "square"),
        color_attr_row("cross", "yellow", "triangle", "purple"),
    ]
    rng = np.random.default_rng(0)
    images = [[render(scene_for(row, rng, 64)) for _ in range(2)] for row in rows]
    _write_layout(tmp_path / "images", rows, images)
    detector, classify_colors = world_detector()
    summary = score_geneval(
        tmp_path / "images", detector, classify_colors, tmp_path / "scores" / "results.jsonl"
    )
    assert summary["overall"] == 1.0
    assert summary["tags"] == {tag: 1.0 for tag in GENEVAL_TAGS}
    assert summary["counts"] == {tag: 2 for tag in GENEVAL_TAGS}
    results = [json.loads(line) for line in (tmp_path / "scores" / "results.jsonl").read_text().splitlines()]
    assert [r["filename"] for r in results[:2]] == ["00000/samples/0000.png", "00000/samples/0001.png"]
    assert all(r["correct"] and r["reason"] == "" for r in results)
    assert len(results[4]["detections"]["triangle"]) == 3  # the counting row's first image
    assert json.loads((tmp_path / "scores" / "summary.json").read_text()) == summary


def _rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def test_rle_round_trip():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:6] = True
    np.testing.assert_array_equal(decode_rle(_rle(mask)), mask)
    with pytest.raises(ValueError, match="compressed"):
        decode_rle({"size": [5, 7], "counts": "abc"})


def _det(label, score, box=(2, 2, 10, 10), **extra):
    return {"label": label, "score": score, "box": list(box), **extra}


def test_precomputed_detections_give_the_known_per_tag_scores(tmp_path):
    counting = {
        "tag": "counting",
        "include": [{"class": "cup", "count": 2}],
        "exclude": [{"class": "cup", "count": 3}],
        "prompt": "a photo of two cups",
    }
    rows = [single_object_row("dog"), colors_row("car", "red"), counting]
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    _write_layout(tmp_path / "images", rows, [[blank, blank], [blank], [blank]])
    mask = np.zeros((32, 32), dtype=bool)
    mask[3:9, 4:12] = True
    entries = [
        ("00000/samples/0000.png", [_det("dog", 0.95, mask_rle=_rle(mask))]),  # correct
        ("00000/samples/0001.png", [_det("dog", 0.2)]),  # below 0.3: wrong
        ("00001/samples/0000.png", [_det("car", 0.9, color="blue")]),  # wrong colour
        # Counting keeps scores above 0.9: two cups, the third (0.5) does not trigger "fewer than 3".
        (
            "00002/samples/0000.png",
            [_det("cup", 0.95), _det("cup", 0.92, (15, 15, 25, 25)), _det("cup", 0.5)],
        ),
    ]
    path = tmp_path / "detections.jsonl"
    path.write_text("".join(json.dumps({"filename": f, "detections": d}) + "\n" for f, d in entries))
    detections = PrecomputedDetections(path)
    summary = score_geneval(tmp_path / "images", detections, detections.classify_colors, tmp_path / "r.jsonl")
    assert summary["tags"] == {"single_object": 0.5, "colors": 0.0, "counting": 1.0}
    assert summary["counts"] == {"single_object": 2, "colors": 1, "counting": 1}
    assert summary["overall"] == pytest.approx(0.5)
    results = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in results] == [True, False, False, True]
    assert "expected red car>=1, found 0 red" in results[2]["reason"]

    # The RLE mask is used as given; without one the mask is the filled box.
    dog = detections(blank, "00000/samples/0000.png")[0]
    np.testing.assert_array_equal(dog.mask, mask)
    assert detections(blank, "00000/samples/0001.png")[0].mask.sum() == 8 * 8

    path.write_text(json.dumps({"filename": entries[0][0], "detections": entries[0][1]}) + "\n")
    partial = PrecomputedDetections(path)
    with pytest.raises(ValueError, match="no detections for 00000/samples/0001.png"):
        score_geneval(tmp_path / "images", partial, partial.classify_colors, tmp_path / "x.jsonl")


def test_bad_detection_lines_are_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"filename": "00000/samples/0000.png", "detections": [{"label": "dog"}]}) + "\n"
    )
    with pytest.raises(ValueError, match=r"d.jsonl, line 1: a detection needs 'label', 'score' and 'box'"):
        PrecomputedDetections(path)


def test_scoring_an_unfinished_prompt_is_an_error(tmp_path):
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    _write_layout(tmp_path / "images", ROWS[:1], [[blank]])
    (tmp_path / "images" / "00000" / "metadata.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="prompt 00000 is unfinished"):
        score_geneval(tmp_path / "images", *world_detector(), tmp_path / "r.jsonl")


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_generates_and_scores_on_the_tiny_preset(capsys, tmp_path):
    metadata = tmp_path / "metadata.jsonl"
    write_eval_metadata(metadata, make_eval_metadata(per_tag=1))
    out = tmp_path / "geneval"
    args = ["eval", "geneval", "--model", "tiny", "--metadata", str(metadata), "--out", str(out)]
    args += ["--images-per-prompt", "2", "--steps", "1", "--limit", "3", "--detector", "world", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 prompt(s) generated" in printed and "overall" in printed
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["00000", "00001", "00002"]
    assert _png(out / "00002/samples/0001.png").shape == (64, 64, 3)
    results = (out / "results.jsonl").read_text().splitlines()
    assert len(results) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tags"]) == set(GENEVAL_TAGS[:3])

    # Rerunning skips everything; geneval-score rescores the folder with the same result.
    assert main(args) == 0
    assert "0 prompt(s) generated, 3 already complete" in capsys.readouterr().out
    score_args = ["eval", "geneval-score", "--images", str(out), "--detector", "world", "--quiet"]
    assert main([*score_args, "--out", str(tmp_path / "s" / "r.jsonl")]) == 0
    assert "overall" in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--metadata", "missing.jsonl", "--detector", "world"], "--metadata missing.jsonl does not exist"),
        (["--metadata", "{meta}", "--detector", "file"], "--detector file needs --detections FILE"),
        (["--metadata", "{meta}"], "give --detector world"),
        (["--metadata", "{meta}", "--no-score", "--detector", "world"], "--no-score skips scoring"),
        (["--metadata", "{bad}", "--no-score"], "line 1: bad metadata row"),
        (
            ["--metadata", "{meta}", "--detector", "file", "--detections", "nope.jsonl"],
            "nope.jsonl does not exist",
        ),
    ],
)
def test_cli_errors_exit_2(capsys, tmp_path, extra, message):
    meta, bad = tmp_path / "m.jsonl", tmp_path / "bad.jsonl"
    write_eval_metadata(meta, ROWS)
    bad.write_text(json.dumps({"tag": "shapes", "include": [], "prompt": "x"}) + "\n")
    extra = [e.format(meta=meta, bad=bad) for e in extra]
    assert main(["eval", "geneval", "--model", "tiny", "--out", str(tmp_path / "o"), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "parauni eval geneval: error:" in err and message in err
    assert not (tmp_path / "o").exists()


def test_cli_score_of_a_missing_folder_exits_2(capsys, tmp_path):
    args = ["eval", "geneval-score", "--images", str(tmp_path / "none"), "--detector", "world"]
    assert main([*args, "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- official metadata


def test_the_official_metadata_validates():
    if not OFFICIAL.is_file():
        pytest.skip(f"the official GenEval metadata is not at {OFFICIAL} (../shared beside the repository)")
    rows = read_metadata(OFFICIAL)
    assert len(rows) == 553
    tags = [row["tag"] for row in rows]
    assert {tag: tags.count(tag) for tag in GENEVAL_TAGS} == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
