"""DPG-Bench: the 2x2 grid layout and its resumable generation, the official scorer's rules (dependency graph,
per-crop mean, category pooling) on hand-computed values, a tiny random BLIP VQA model saved and loaded back
offline through the CLI, and the shared prompts file."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.eval.dpg import (
    CSV_COLUMNS,
    BlipVQA,
    Question,
    apply_dependencies,
    generate_dpg,
    read_dpg_csv,
    read_dpg_prompts,
    score_dpg,
    split_grid,
    tile_grid,
)
from parauni.pipeline import GenerationOptions
from parauni.scoring.clip import RewardModelError

# The official prompts live in ../shared beside the repository (never copied into it).
OFFICIAL_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dpg_bench" / "prompts.jsonl"

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}

# (item_id, proposition_id, dependency, category_broad, category_detailed, question), in the official schema.
QUESTIONS = [
    ("a", 1, "0", "entity", "whole", "Is there a red or green object?"),
    ("a", 2, "1", "attribute", "color", "Is the object blue, red or green?"),
    ("a", 3, "2", "attribute", "shape", "Is it blue or red?"),
    ("a", 4, "1,3", "relation", "spatial", "Is the white thing beside it, or is it red?"),
    ("a", 5, "0", "relation", "spatial", "Is anything white?"),
    ("b", 1, "0", "global", "", "Is it red?"),
    ("b", 2, "0", "other", "count", "Is it green?"),
    ("c", 1, "0", "entity", "whole", "Is there a cat?"),
]
PROMPTS = [
    {"item_id": "a", "prompt": "a red square"},
    {"item_id": "b", "prompt": "a blue circle"},
    {"item_id": "c", "prompt": "a cat"},
]


def write_csv(path: Path, questions=QUESTIONS) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for item_id, pid, dependency, broad, detailed, question in questions:
            tuple_ = f"{broad} - {detailed} (x)"
            writer.writerow(
                [item_id, f"prompt {item_id}", "kw", pid, dependency, broad, detailed, tuple_, question]
            )
    return path


def color_grid(names: list[str], size: int = 8) -> Image.Image:
    return tile_grid([Image.new("RGB", (size, size), COLORS[n]) for n in names])


def color_vqa(image: Image.Image, question: str) -> str:
    """Stand-in answerer: "yes" iff the question names the crop's (uniform) colour."""
    pixel = image.getpixel((0, 0))
    name = next(n for n, rgb in COLORS.items() if rgb == pixel)
    return "Yes " if name in re.findall(r"[a-z]+", question.lower()) else "no"


@pytest.fixture
def dpg_folder(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "grids"
    images.mkdir()
    color_grid(["red", "green", "blue", "white"]).save(images / "a.png")
    color_grid(["red"] * 4).save(images / "b.png")
    return images, write_csv(tmp_path / "dpg_bench.csv")


# ------------------------------------------------------------------------------------------------ inputs


def test_csv_parses_dependencies_and_categories(tmp_path):
    items = read_dpg_csv(write_csv(tmp_path / "q.csv"))
    assert list(items) == ["a", "b", "c"]
    a = items["a"]
    assert a.text == "prompt a" and [q.proposition_id for q in a.questions] == [1, 2, 3, 4, 5]
    assert a.questions[0].parents == () and a.questions[3].parents == (1, 3)
    assert a.questions[1].category == "attribute" and a.questions[1].category_detailed == "attribute - color"
    assert items["b"].questions[0].category_detailed == "global"


@pytest.mark.parametrize(
    "questions, message",
    [
        ([("a", 1, "0", "entity", "whole", "q"), ("a", 2, "3", "entity", "whole", "q")], r"depends on \[3\]"),
        (
            [("a", 1, "0", "entity", "whole", "q"), ("a", 1, "0", "entity", "whole", "q")],
            "proposition 1 twice",
        ),
        ([("a", 1, "one", "entity", "whole", "q")], "dependency 'one'"),
    ],
)
def test_bad_csv_rows_are_refused(tmp_path, questions, message):
    with pytest.raises(ValueError, match=message):
        read_dpg_csv(write_csv(tmp_path / "q.csv", questions))


def test_csv_without_the_official_columns_is_refused(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("item_id,text,question\na,b,c\n")
    with pytest.raises(ValueError, match="proposition_id"):
        read_dpg_csv(path)
    with pytest.raises(FileNotFoundError, match="ELLA"):
        read_dpg_csv(tmp_path / "missing.csv")


def test_prompts_file_checks(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"item_id": "x", "prompt": "p"}\n{"item_id": "x", "prompt": "q"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        read_dpg_prompts(path)
    path.write_text('{"item_id": "../x", "prompt": "p"}\n')
    with pytest.raises(ValueError, match="plain file name"):
        read_dpg_prompts(path)


def test_shared_prompts_file_parses_into_1065_prompts():
    if not OFFICIAL_PROMPTS.is_file():
        pytest.skip(f"the DPG-Bench prompts are not at {OFFICIAL_PROMPTS} (../shared beside the repository)")
    rows = read_dpg_prompts(OFFICIAL_PROMPTS)
    assert len(rows) == 1065 and len({r["item_id"] for r in rows}) == 1065
    assert all(len(r["prompt"]) > 20 for r in rows)


# ------------------------------------------------------------------------------------------------ rules


def test_grid_round_trip_in_the_official_crop_order():
    tiles = [Image.fromarray(np.full((6, 10, 3), 40 * j, dtype=np.uint8)) for j in range(4)]
    grid = tile_grid(tiles)
    assert grid.size == (20, 12)
    assert grid.getpixel((15, 2)) == (40, 40, 40)  # image 1 is top-right
    assert grid.getpixel((2, 8)) == (80, 80, 80)  # image 2 is bottom-left
    for tile, crop in zip(tiles, split_grid(grid), strict=True):
        np.testing.assert_array_equal(np.asarray(crop), np.asarray(tile))
    with pytest.raises(ValueError, match="even sides"):
        split_grid(Image.new("RGB", (9, 8)))


def test_dependency_rule_zeroes_children_and_chains_in_order():
    q = [
        Question(1, (), "entity", "entity - whole", ""),
        Question(2, (1,), "attribute", "attribute - color", ""),
        Question(3, (2,), "attribute", "attribute - shape", ""),
        Question(4, (1, 5), "relation", "relation - spatial", ""),
        Question(5, (), "entity", "entity - whole", ""),
    ]
    assert apply_dependencies(q, [1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1]
    assert apply_dependencies(q, [0, 1, 1, 1, 1]) == [0, 0, 0, 0, 1]  # 3 fails through its zeroed parent 2
    assert apply_dependencies(q, [1, 1, 1, 1, 0]) == [1, 1, 1, 0, 0]  # any failed parent zeroes
    # Parents are read as they stand when the child comes (official loop order): 5 is zeroed after 4 is checked.
    later = [Question(4, (5,), "x", "x", ""), Question(5, (1,), "x", "x", ""), Question(1, (), "x", "x", "")]
    assert apply_dependencies(later, [1, 1, 0]) == [1, 0, 0]


def test_hand_computed_scores(dpg_folder, tmp_path):
    images, csv_path = dpg_folder
    summary = score_dpg(images, read_dpg_csv(csv_path), color_vqa, tmp_path / "out" / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["item_id"] for r in rows] == ["a", "b"]
    a, b = rows
    # Item a, crops red / green / blue / white, raw answers per question:
    #   q1 red|green: 1 1 0 0   q2 blue|red|green (parent 1): 1 1 1 0 -> 1 1 0 0
    #   q3 blue|red (parent 2): 1 0 1 0 -> 1 0 0 0 (blue: parent 2 was zeroed)   q4 white|red (parents 1, 3):
    #   1 0 0 1 -> 1 0 0 0   q5 white: 0 0 0 1
    assert [q["raw"] for q in a["questions"]] == [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 0, 1, 0],
        [1, 0, 0, 1],
        [0, 0, 0, 1],
    ]
    assert [q["scores"] for q in a["questions"]][1:4] == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert a["crop_scores"] == pytest.approx([4 / 5, 2 / 5, 0, 1 / 5])
    assert a["score"] == pytest.approx(7 / 20)
    assert a["questions"][0]["answers"] == ["Yes ", "Yes ", "no", "no"] and a["prompt"] == "prompt a"
    assert b["crop_scores"] == [0.5] * 4 and b["score"] == 0.5
    assert summary["dpg"] == pytest.approx(100 * (7 / 20 + 0.5) / 2)
    assert summary["prompts"] == 2 and summary["unscored"] == 1  # item c has no grid
    # Official categories: raw answers of the LAST crop (white for a, red for b).
    assert summary["category_crops"] == "last"
    assert summary["categories"] == pytest.approx(
        {"global": 100, "entity": 0, "attribute": 0, "relation": 100, "other": 0}
    )
    assert list(summary["categories"]) == ["global", "entity", "attribute", "relation", "other"]
    assert summary["category_counts"] == {"global": 1, "entity": 1, "attribute": 2, "relation": 2, "other": 1}
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_categories_over_all_crops(dpg_folder, tmp_path):
    images, csv_path = dpg_folder
    summary = score_dpg(images, read_dpg_csv(csv_path), color_vqa, tmp_path / "r.jsonl", category_crops="all")
    assert summary["categories"] == pytest.approx(
        {"global": 100, "entity": 50, "attribute": 100 * 5 / 8, "relation": 100 * 3 / 8, "other": 0}
    )
    assert summary["categories_detailed"]["attribute - color"] == pytest.approx(75)
    assert summary["category_counts"]["attribute"] == 8
    assert summary["dpg"] == pytest.approx(100 * (7 / 20 + 0.5) / 2)  # the DPG score does not change


def test_a_grid_without_questions_is_an_error(dpg_folder, tmp_path):
    images, csv_path = dpg_folder
    color_grid(["red"] * 4).save(images / "zzz.png")
    with pytest.raises(ValueError, match="zzz.png"):
        score_dpg(images, read_dpg_csv(csv_path), color_vqa, tmp_path / "r.jsonl")


# ------------------------------------------------------------------------------------------ generation


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_generation_layout_and_resume(tiny_model, tmp_path):
    out = tmp_path / "dpg"
    options = GenerationOptions(seed=3, batch_size=8, steps=1)
    assert generate_dpg(tiny_model, PROMPTS[:2], out, options=options, progress=False) == {
        "generated": 2,
        "skipped": 0,
    }
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    with Image.open(out / "a.png") as img:
        assert img.format == "PNG" and img.size == (128, 128)  # 2 x 2 tiles of the tiny preset's 64 px
        crops = [np.asarray(c) for c in split_grid(img.convert("RGB"))]
    assert all(not np.array_equal(crops[0], c) for c in crops[1:])  # four different seeds

    before = _mtimes(out)
    original = np.asarray(Image.open(out / "b.png"))
    (out / "b.png").unlink()
    assert generate_dpg(tiny_model, PROMPTS, out, options=replace(options, batch_size=4), progress=False) == {
        "generated": 2,
        "skipped": 1,
    }
    after = _mtimes(out)
    assert after["a.png"] == before["a.png"] and sorted(after) == ["a.png", "b.png", "c.png"]
    # Prompt b's seeds come from its index, not from the run that made it.
    assert np.abs(np.asarray(Image.open(out / "b.png")).astype(int) - original).max() <= 1


# ------------------------------------------------------------------------------------ BLIP VQA and CLI


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    """A tiny random ``BlipForQuestionAnswering`` with a WordPiece tokenizer and PIL image processor."""
    import transformers as tf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "yes", "no", "is", "it", "red", "?"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]",
    )  # fmt: skip
    text = dict(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=5, sep_token_id=3,
    )  # fmt: skip
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=8)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20)
        model = tf.BlipForQuestionAnswering(tf.BlipConfig(text_config=text, vision_config=vision))
    processor = tf.BlipProcessor(image_processor=tf.BlipImageProcessorPil(size={"height": 16, "width": 16}),
                                 tokenizer=tokenizer)  # fmt: skip
    folder = tmp_path_factory.mktemp("blip_vqa")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_vqa_answers_with_words_of_its_vocabulary(blip_dir):
    vqa = BlipVQA.from_pretrained(blip_dir)
    answer = vqa(Image.new("RGB", (20, 20), (255, 0, 0)), "is it red?")
    assert isinstance(answer, str) and answer == vqa(Image.new("RGB", (20, 20), (255, 0, 0)), "is it red?")
    assert set(answer.split()) <= {"yes", "no", "is", "it", "red", "?", "[UNK]"}


def test_missing_vqa_folder_names_the_path_and_the_repo(tmp_path):
    with pytest.raises(RewardModelError, match=r"missing_vqa does not exist.*Salesforce/blip-vqa-base"):
        BlipVQA.from_pretrained(tmp_path / "missing_vqa")


def test_cli_generates_and_scores_with_a_blip_vqa(blip_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    csv_path = write_csv(tmp_path / "dpg_bench.csv")
    out = tmp_path / "dpg"
    args = ["eval", "dpg", "--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--steps", "1"]
    score = ["--csv", str(csv_path), "--vqa", str(blip_dir), "--device", "cpu", "--quiet"]
    assert main([*args, "--limit", "2", *score]) == 0
    printed = capsys.readouterr().out
    assert "DPG-Bench: 2 grid(s) generated" in printed and "1 prompt(s) of" in printed
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    for row in rows:  # the scores follow the answers by the rules
        questions = [Question(q["proposition_id"], tuple(q["parents"]), "", "", "") for q in row["questions"]]
        for q in row["questions"]:
            assert q["raw"] == [float(a.strip().lower() == "yes") for a in q["answers"]]
        per_crop = [apply_dependencies(questions, [q["raw"][c] for q in row["questions"]]) for c in range(4)]
        assert row["crop_scores"] == pytest.approx([sum(s) / len(s) for s in per_crop])
    assert summary["dpg"] == pytest.approx(100 * np.mean([r["score"] for r in rows]))

    # The separate scorer over the same folder gives the same summary.
    assert (
        main(["eval", "dpg-score", "--images", str(out), *score, "--out", str(tmp_path / "s" / "r.jsonl")])
        == 0
    )
    assert json.loads((tmp_path / "s" / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "scoring needs --csv dpg_bench.csv"),
        (["--no-score", "--csv", "x.csv"], "--no-score skips scoring"),
        (["--csv", "nope.csv", "--vqa", "Salesforce/blip-vqa-base"], "nope.csv does not exist"),
    ],
)
def test_cli_argument_errors_exit_2_before_generating(tmp_path, capsys, extra, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n")
    argv = ["eval", "dpg", "--model", "tiny", "--prompts", str(prompts), "--out", str(tmp_path / "o"), *extra]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "parauni eval dpg: error:" in err and message in err
    assert not (tmp_path / "o").exists()
