"""``parauni reproduce``: row selection, the mean +- std table, and a quick resumable run."""

from __future__ import annotations

import json

import pytest

from parauni.cli import main
from parauni.world.reproduce import ROW_NAMES, format_table, run_reproduce, select_rows, summarise


def test_rows_are_checked_and_rl_rows_bring_their_starting_point():
    assert [r.name for r in select_rows(None)] == list(ROW_NAMES)
    assert [r.name for r in select_rows(["full", "last_layer"])] == ["last_layer", "all_layers", "full"]
    assert [r.name for r in select_rows(["no_deep"])] == ["no_deep"]
    with pytest.raises(ValueError, match="bogus.*choose from"):
        select_rows(["bogus"])


def _unit(row: str, seed: int, overall: float) -> dict:
    tags = {
        t: overall for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    }
    tags["colors"] = overall / 2
    return {"row": row, "seed": seed, "shapeseval": {"overall": overall, "tags": tags}}


def test_summary_is_mean_and_population_std_over_seeds():
    table = summarise({"last_layer": [_unit("last_layer", 0, 0.2), _unit("last_layer", 1, 0.6)]})
    row = table["last_layer"]
    assert row["overall"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.2), "n": 2}
    assert row["tags"]["colors"]["mean"] == pytest.approx(0.2)
    assert row["paper"]["overall"] == 0.86
    text = format_table(table)
    assert "last layer only" in text and "**0.400 ± 0.200**" in text and "0.86" in text


def test_last_layer_rows_are_openuni_and_the_layernorm_variant_with_the_papers_source():
    from parauni.world.reproduce import ROWS

    rows = {r.name: r for r in ROWS}
    assert rows["last_layer"].lim == {"layers": "last", "use_layernorm": False}  # as OpenUni builds it
    assert rows["last_layer_ln"].lim == {"layers": "last", "use_layernorm": True}
    assert not rows["last_layer_ln"].paper
    assert "OpenUni" in rows["last_layer"].label and "LayerNorm" in rows["last_layer_ln"].label
    table = summarise({n: [_unit(n, 0, 0.3)] for n in ("last_layer", "last_layer_ln", "no_deep")})
    text = format_table(table)
    assert "0.86 (OpenUni in the main table)" in text and "0.84 (ablation table)" in text


def test_quick_reproduce_writes_the_table_and_resumes(tmp_path, quick_cache, capsys):
    out = tmp_path / "rep"
    args = [
        "reproduce",
        "--quick",
        "--quiet",
        "--seeds",
        "0",
        "1",
        "--rows",
        "last_layer",
        "ldam_no_grad_gate",
    ]
    assert main(args + ["--out", str(out), "--stage0", "scratch", "--cache", str(quick_cache)]) == 0
    assert "expected duration" in capsys.readouterr().out
    report = json.loads((out / "reproduce.json").read_text())
    assert list(report["table"]) == ["last_layer", "all_layers", "ldam_no_grad_gate"]
    for row in report["table"].values():
        assert row["overall"]["n"] == 2 and 0.0 <= row["overall"]["mean"] <= 1.0
        assert set(row["tags"]) == {
            "single_object",
            "two_object",
            "counting",
            "colors",
            "position",
            "color_attr",
        }
    rl_units = report["units"]["ldam_no_grad_gate"]
    assert all(u["rl_epochs"] == 2 for u in rl_units)
    assert set(report["reconstruction"]) == {"last_layer", "all_layers"}
    assert set(report["reconstruction"]["all_layers"]) == {"psnr", "ssim", "clip_similarity"}
    assert set(report["layer_analysis"]["zone_drop"]) == {"shallow", "middle", "deep"}
    for name in ["reproduce.md", "reconstruction/side_by_side.png", "layers/layer_similarity.png"]:
        assert (out / name).is_file(), name
    md = (out / "reproduce.md").read_text()
    assert "(6) LDAM without grad-norm gate" in md and "Reconstruction" in md

    # a second run finds every unit complete and trains nothing
    messages: list[str] = []
    again = run_reproduce(
        out,
        seeds=[0, 1],
        rows=["last_layer", "ldam_no_grad_gate"],
        cache_dir=quick_cache,
        stage0="scratch",
        quick=True,
        analyses=False,
        progress=False,
        log=messages.append,
    )
    assert any("(0 units to run)" in m for m in messages)
    assert again["units"] == report["units"]


def test_reproduce_rows_keep_the_papers_lim_whatever_the_worlds_defaults():
    from parauni.world.release import world_stage0
    from parauni.world.reproduce import ROWS, _model_config

    cfg, stage0 = world_stage0("release", [], progress=False, log=lambda *a: None)
    assert cfg.parauni.whiten and not cfg.parauni.use_layernorm  # the demo's departures
    rows = {r.name: r for r in ROWS}
    lim = _model_config(cfg, stage0, rows["all_layers"], seed=0).lim
    assert lim.use_layernorm and not lim.whiten
    assert not _model_config(cfg, stage0, rows["no_layernorm"], seed=0).lim.use_layernorm


def test_the_world_lim_base_builds_rows_on_the_demos_lim_and_drops_the_row_it_makes_redundant(tmp_path):
    from parauni.config import ConfigError
    from parauni.world.release import world_stage0
    from parauni.world.reproduce import ROWS, _model_config, distinct_rows, row_lim

    cfg, stage0 = world_stage0("release", [], progress=False, log=lambda *a: None)
    rows = {r.name: r for r in ROWS}
    world = _model_config(cfg, stage0, rows["all_layers"], seed=0, lim="world").lim
    assert world.whiten and not world.use_layernorm  # the demo's LIM
    assert _model_config(cfg, stage0, rows["layernorm"], seed=0, lim="world").lim.use_layernorm
    assert row_lim(cfg, rows["last_layer_ln"], "world")["use_layernorm"]
    names = lambda kept: [r.name for r in kept]  # noqa: E731
    # on the world's LIM "no_layernorm" is all_layers' model; on the paper's, "layernorm" is
    assert "no_layernorm" not in names(distinct_rows(cfg, list(ROWS), "world", named=False))
    assert "layernorm" not in names(distinct_rows(cfg, list(ROWS), "paper", named=False))
    assert len(distinct_rows(cfg, list(ROWS), "world", named=False)) == len(ROWS) - 1
    with pytest.raises(ConfigError, match="no_layernorm.*same model as 'all_layers'.*--lim world"):
        distinct_rows(cfg, [rows["no_layernorm"], rows["all_layers"]], "world", named=True)
    with pytest.raises(ConfigError, match="choose one of"):
        row_lim(cfg, rows["all_layers"], "mine")
    (tmp_path / "lim_base.txt").write_text("paper\n")
    with pytest.raises(ConfigError, match="'paper' LIM; give --lim paper to continue it, or another --out"):
        run_reproduce(tmp_path, rows=["all_layers"], lim="world", progress=False, log=lambda *a: None)
