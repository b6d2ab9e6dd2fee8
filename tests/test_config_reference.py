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
        "`world.rl.ldam`",
    ):
        assert key in text, key


def test_committed_reference_is_current():
    assert DOC.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `python -m parauni.config_reference > docs/configuration.md`"
    )
