"""docs/configuration.md is what `python -m parauni.config_reference` prints (regenerate it when it fails)."""

from __future__ import annotations

from pathlib import Path

from parauni.config_reference import reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_reference_lists_every_section_and_nested_key():
    text = reference_markdown()
    for key in (
        "`lim.layers`",
        "`train.lr`",
        "`rl.ldam.grad_gate`",
        "`rewards.pickscore`",
        "`world.rl.ldam.window`",
        "`world.parauni.stage1.steps`",
        "`world.rl.phases.1.epochs`",
    ):
        assert key in text, key


def test_a_nested_world_section_shows_the_worlds_defaults_not_the_library_class_defaults():
    text = reference_markdown()
    assert "| `world.parauni.stage1.lr` | `float` | `0.003` |" in text
    assert "| `train.lr` | `float` | `0.0001` |" in text
    assert "| `world.rl.ldam.window` | `int` | `3` |" in text and "| `rl.ldam.window` | `int` | `5` |" in text
    assert "| `world.rl.phases.0.rewards` | `dict[str, float]` | `{'aesthetic': 1.0}` |" in text


def test_committed_reference_is_current():
    assert DOC.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `python -m parauni.config_reference > docs/configuration.md`"
    )
