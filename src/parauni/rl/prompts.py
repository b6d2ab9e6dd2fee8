"""Where Stage III's prompts come from: any object with ``epoch(seed, epoch, n)`` (:class:`Prompts`), e.g. a
fixed list read from a file (:class:`PromptSource`) or the shapes world's endless generator
(:class:`parauni.world.rl.WorldPromptSource`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError

# (prompt, its GenEval metadata row or None)
PromptItem = tuple[str, dict | None]


class Prompts(Protocol):
    """A source of RL prompts: ``n`` (prompt, metadata) items for one epoch, the same for the same seed; with
    ``tags``, only prompts whose GenEval metadata has one of those tags."""

    def epoch(self, seed: int, epoch: int, n: int, tags: Sequence[str] = ()) -> list[PromptItem]: ...


class PromptSource:
    """Prompts for RL: a list of (prompt, GenEval metadata or None); an epoch draws ``n`` of them."""

    def __init__(self, items: list[PromptItem]) -> None:
        if not items:
            raise DataError("the RL prompt set is empty; give a prompt file with at least one prompt")
        self.items = items

    @classmethod
    def from_file(cls, path: str | Path) -> PromptSource:
        """A ``.txt`` file (one prompt a line) or a ``.jsonl`` file of {"prompt", ...} rows (GenEval format)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"RL prompt file {path} does not exist; give a .txt or .jsonl file of prompts")
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n} is not valid JSON ({err.msg})") from err
                if not isinstance(row, dict) or "prompt" not in row:
                    raise DataError(f"{path}:{n} has no 'prompt' field")
                items.append((row["prompt"], row if "include" in row else None))
            else:
                items.append((line.strip(), None))
        return cls(items)

    def epoch(self, seed: int, epoch: int, n: int, tags: Sequence[str] = ()) -> list[PromptItem]:
        """``n`` prompts for ``epoch``: a seeded draw without replacement (with replacement if n > size), from
        the prompts whose GenEval tag is in ``tags`` when it is given."""
        items = self.with_tags(tags) if tags else self.items
        rng = np.random.default_rng([seed, epoch, 7])
        idx = rng.choice(len(items), size=n, replace=n > len(items))
        return [items[i] for i in idx]

    def with_tags(self, tags: Sequence[str]) -> list[PromptItem]:
        """The prompts whose GenEval metadata's tag is one of ``tags``."""
        items = [item for item in self.items if item[1] is not None and item[1].get("tag") in tags]
        if not items:
            have = sorted({str(m.get("tag")) for _, m in self.items if m is not None})
            raise DataError(
                f"no RL prompt has a GenEval tag in {list(tags)} (the prompts' tags: {have or 'none, no metadata'});"
                " give a GenEval-style .jsonl with such rows, or change the phase's tags"
            )
        return items
