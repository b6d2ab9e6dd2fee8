"""Fixtures of the world tests: one quick Stage-0 cache for the whole session (each run trains it once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from parauni.world.config import WorldConfig
from parauni.world.pretrain import run_stage0


@pytest.fixture(scope="session")
def quick_cache(tmp_path_factory) -> Path:
    """A Stage-0 cache folder holding the quick world's artefacts (``WorldConfig().quick()``)."""
    cache = tmp_path_factory.mktemp("world_cache")
    run_stage0(WorldConfig().quick(), cache, progress=False, log=lambda *_: None)
    return cache
