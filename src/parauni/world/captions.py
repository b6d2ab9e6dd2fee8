"""Captions, GenEval-format metadata and the training stream of the shapes world.

* GenEval-style prompts for the six GenEval tags, phrased exactly like GenEval's `evaluation_metadata.jsonl`
  ("a photo of three circles", "a photo of a circle left of a square", ...) with the same metadata structure
  (`metadata_for`), and scenes that satisfy a metadata row under GenEval's rules (`scene_for`).
* Dense, DPG-Bench-like captions of whole scenes (`dense_caption`).
* `WorldStream`: an endless, resumable stream of (image, caption, metadata) training examples where example
  i depends only on (seed, i).
* The fixed evaluation prompt set of ShapesEval (`make_eval_metadata`) and JSONL reading / writing that also
  reads the official GenEval metadata file.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from parauni.scoring.geneval_rules import GENEVAL_TAGS, RELATIONS, validate_metadata
from parauni.world.scene import (
    COLORS,
    MAX_SIZE_FRAC,
    MIN_SIZE_FRAC,
    SHAPES,
    Scene,
    WorldObject,
    place_objects,
    render,
)

from ..errors import ConfigError, DataError

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)
DENSE_TAG = "dense"
TRAINING_TAGS: tuple[str, ...] = (*GENEVAL_TAGS, DENSE_TAG)
# Six GenEval tags at about 14% each and dense captions at 15%.
DEFAULT_TAG_WEIGHTS: dict[str, float] = {
    **{tag: 0.85 / len(GENEVAL_TAGS) for tag in GENEVAL_TAGS},
    DENSE_TAG: 0.15,
}
MAX_DENSE_OBJECTS = 4

# Size words split the placement range [MIN_SIZE_FRAC, MAX_SIZE_FRAC] x image size into thirds.
_THIRD = (MAX_SIZE_FRAC - MIN_SIZE_FRAC) / 3
SIZE_WORDS: tuple[tuple[float, str], ...] = (
    (MIN_SIZE_FRAC + _THIRD, "small"),
    (MIN_SIZE_FRAC + 2 * _THIRD, "medium"),
    (float("inf"), "large"),
)
GRID_WORDS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
DENSE_FRAME_WORDS: tuple[str, ...] = ("objects", "object", "on", "grey", "background", "at", "in", "the")
PUNCTUATION: tuple[str, ...] = (",", ":", ".")

# Position scenes: the perpendicular centre offset stays within this fraction of the offset along the
# relation's axis, and the gap between the two boxes along that axis is at least this many pixels. With
# GenEval's 0.1 margin this gives a normalised component >= 0.75 for the wanted relation and <= 0.25 for
# the other axis, so exactly one relation holds even if a detector's boxes are a pixel off.
_POSITION_SLANT = 0.25
_POSITION_GAP = 2.0


def with_article(phrase: str) -> str:
    """'a' or 'an' before `phrase` by its first letter, as GenEval's prompts do ("an orange circle")."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def _noun(clause: dict) -> str:
    """The noun phrase of one include clause: "a circle", "a red circle", "three circles"."""
    if clause["count"] > 1:
        return f"{NUMBER_WORDS[clause['count']]} {PLURALS[clause['class']]}"
    color = clause.get("color")
    return with_article(f"{color} {clause['class']}" if color else clause["class"])


def _row(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    row: dict = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = prompt
    return row


def single_object_row(shape: str) -> dict:
    """GenEval single_object: "a photo of a circle"."""
    include = [{"class": shape, "count": 1}]
    return _row("single_object", include, f"a photo of {_noun(include[0])}")


def two_object_row(first: str, second: str) -> dict:
    """GenEval two_object: "a photo of a circle and a square"."""
    include = [{"class": first, "count": 1}, {"class": second, "count": 1}]
    return _row("two_object", include, f"a photo of {_noun(include[0])} and {_noun(include[1])}")


def counting_row(shape: str, count: int) -> dict:
    """GenEval counting: "a photo of three circles", excluding count + 1 of them."""
    include = [{"class": shape, "count": count}]
    exclude = [{"class": shape, "count": count + 1}]
    return _row("counting", include, f"a photo of {_noun(include[0])}", exclude)


def colors_row(shape: str, color: str) -> dict:
    """GenEval colors: "a photo of a red circle"."""
    include = [{"class": shape, "count": 1, "color": color}]
    return _row("colors", include, f"a photo of {_noun(include[0])}")


def position_row(subject: str, relation: str, target: str) -> dict:
    """GenEval position: "a photo of a circle left of a square"; include[0] is the target (the square)."""
    include = [{"class": target, "count": 1}, {"class": subject, "count": 1, "position": [relation, 0]}]
    return _row("position", include, f"a photo of {_noun(include[1])} {relation} {_noun(include[0])}")


def color_attr_row(first: str, first_color: str, second: str, second_color: str) -> dict:
    """GenEval color_attr: "a photo of a red circle and a blue square"."""
    include = [
        {"class": first, "count": 1, "color": first_color},
        {"class": second, "count": 1, "color": second_color},
    ]
    return _row("color_attr", include, f"a photo of {_noun(include[0])} and {_noun(include[1])}")


def all_metadata(tag: str) -> list[dict]:
    """Every distinct metadata row of `tag` in the world, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if tag == "single_object":
        return [single_object_row(s) for s in SHAPES]
    if tag == "two_object":
        return [two_object_row(a, b) for a, b in pairs]
    if tag == "counting":
        return [counting_row(s, n) for s in SHAPES for n in COUNTS]
    if tag == "colors":
        return [colors_row(s, c) for s in SHAPES for c in COLORS]
    if tag == "position":
        return [position_row(a, r, b) for a, b in pairs for r in RELATIONS]
    if tag == "color_attr":
        color_pairs = list(itertools.permutations(COLORS, 2))
        return [color_attr_row(a, ca, b, cb) for a, b in pairs for ca, cb in color_pairs]
    raise ValueError(f"unknown tag {tag!r}; expected one of {GENEVAL_TAGS}")


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _distinct(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> tuple[str, str]:
    """Two different elements of `options` drawn by `rng`."""
    i, j = rng.choice(len(options), size=2, replace=False)
    return options[i], options[j]


def metadata_for(tag: str, rng: np.random.Generator) -> dict:
    """A random GenEval-format metadata row of `tag` over the world's shapes and colours."""
    colors = list(COLORS)
    if tag == "single_object":
        return single_object_row(_choice(rng, SHAPES))
    if tag == "two_object":
        return two_object_row(*_distinct(rng, SHAPES))
    if tag == "counting":
        return counting_row(_choice(rng, SHAPES), COUNTS[int(rng.integers(len(COUNTS)))])
    if tag == "colors":
        return colors_row(_choice(rng, SHAPES), _choice(rng, colors))
    if tag == "position":
        subject, target = _distinct(rng, SHAPES)
        return position_row(subject, _choice(rng, RELATIONS), target)
    if tag == "color_attr":
        (first, second), (c1, c2) = _distinct(rng, SHAPES), _distinct(rng, colors)
        return color_attr_row(first, c1, second, c2)
    raise ValueError(f"unknown tag {tag!r}; expected one of {GENEVAL_TAGS}")


def _objects_of(metadata: dict) -> list[tuple[str, str | None]]:
    """(shape, colour or None) for every object the include clauses ask for, clause by clause."""
    return [(c["class"], c.get("color")) for c in metadata["include"] for _ in range(c["count"])]


def _position_pair(
    rng: np.random.Generator, relation: str, size: int
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Boxes (cx, cy, side) of (subject, target) so that the subject is clearly `relation` the target."""
    s_sub, s_tgt = (float(s) for s in rng.uniform(MIN_SIZE_FRAC * size, MAX_SIZE_FRAC * size, size=2))
    half_sum = (s_sub + s_tgt) / 2
    # Along the relation's axis the subject comes first for "left of" / "above"; gap >= _POSITION_GAP.
    subject_first = relation in ("left of", "above")
    s_first, s_second = (s_sub, s_tgt) if subject_first else (s_tgt, s_sub)
    min_sep = half_sum + _POSITION_GAP
    sep = float(rng.uniform(min_sep, max(min_sep, size - half_sum)))
    first = float(rng.uniform(s_first / 2, size - sep - s_second / 2))
    along_sub, along_tgt = (first, first + sep) if subject_first else (first + sep, first)
    # Across the axis: the subject sits within _POSITION_SLANT * sep of the target, both inside the image.
    slant = float(rng.uniform(-_POSITION_SLANT, _POSITION_SLANT)) * sep
    lo = max(s_tgt / 2, s_sub / 2 - slant)
    hi = min(size - s_tgt / 2, size - s_sub / 2 - slant)
    across_tgt = float(rng.uniform(lo, hi))
    across_sub = across_tgt + slant
    if relation in ("left of", "right of"):
        return (along_sub, across_sub, s_sub), (along_tgt, across_tgt, s_tgt)
    return (across_sub, along_sub, s_sub), (across_tgt, along_tgt, s_tgt)


def scene_for(metadata: dict, rng: np.random.Generator, size: int) -> Scene:
    """A scene holding exactly the objects `metadata` includes, satisfying it under GenEval's rules.

    Objects without a requested colour get a random one; a position row's subject and target are placed so
    that only the requested relation holds, with a comfortable margin.
    """
    validate_metadata(metadata)
    wanted = _objects_of(metadata)
    if metadata["tag"] == "position":
        (target_shape, _), (subject_shape, _) = wanted
        subject_box, target_box = _position_pair(rng, metadata["include"][1]["position"][0], size)
        boxes = [target_box, subject_box]
    else:
        boxes = place_objects(rng, len(wanted), size)
    objects = [
        WorldObject(shape, color or _choice(rng, list(COLORS)), cx, cy, side)
        for (shape, color), (cx, cy, side) in zip(wanted, boxes, strict=True)
    ]
    return Scene(objects, size)


def _size_word(obj: WorldObject, size: int) -> str:
    return next(word for edge, word in SIZE_WORDS if obj.size / size < edge)


def _place_phrase(obj: WorldObject, size: int) -> str:
    col = min(int(obj.cx / size * 3), 2)
    row = min(int(obj.cy / size * 3), 2)
    word = GRID_WORDS[row][col]
    if word == "centre":
        return "in the centre"
    if word in ("left", "right"):
        return f"on the {word}"
    return f"at the {word}"


def _join(parts: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def dense_caption(scene: Scene) -> str:
    """A DPG-like description of every object: "two objects on a grey background: a large red circle at
    the top left and a small blue square in the centre." """
    if not scene.objects:
        raise ValueError("dense_caption needs a scene with at least one object")
    n = len(scene.objects)
    head = f"{NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} on a grey background"
    parts = [
        f"{with_article(f'{_size_word(o, scene.size)} {o.color} {o.shape}')} {_place_phrase(o, scene.size)}"
        for o in scene.objects
    ]
    return f"{head}: {_join(parts)}."


def _dense_scene(rng: np.random.Generator, size: int) -> Scene:
    n = int(rng.integers(1, MAX_DENSE_OBJECTS + 1))
    boxes = place_objects(rng, n, size)
    objects = [
        WorldObject(_choice(rng, SHAPES), _choice(rng, list(COLORS)), cx, cy, s) for cx, cy, s in boxes
    ]
    return Scene(objects, size)


def _tag_probabilities(tag_weights: dict[str, float] | None) -> np.ndarray:
    weights = DEFAULT_TAG_WEIGHTS if tag_weights is None else tag_weights
    unknown = set(weights) - set(TRAINING_TAGS)
    if unknown:
        raise ConfigError(
            f"unknown tags {sorted(unknown)} in tag_weights; expected a subset of {TRAINING_TAGS}"
        )
    p = np.array([float(weights.get(tag, 0.0)) for tag in TRAINING_TAGS])
    if np.any(p < 0) or not p.sum() > 0:
        raise ConfigError(f"tag_weights {weights} must be non-negative with a positive sum")
    return p / p.sum()


def sample_training_example(
    rng: np.random.Generator, size: int, tag_weights: dict[str, float] | None = None
) -> tuple[np.ndarray, str, dict]:
    """One training example -> (uint8 image (size, size, 3), caption, metadata).

    The tag is drawn from `tag_weights` (default DEFAULT_TAG_WEIGHTS). GenEval tags caption the image with
    the metadata's prompt; "dense" draws 1-4 random objects and describes them all, with metadata
    {"tag": "dense", "include": [], "prompt": caption}.
    """
    tag = str(rng.choice(TRAINING_TAGS, p=_tag_probabilities(tag_weights)))
    if tag == DENSE_TAG:
        scene = _dense_scene(rng, size)
        caption = dense_caption(scene)
        metadata = {"tag": DENSE_TAG, "include": [], "prompt": caption}
    else:
        metadata = metadata_for(tag, rng)
        scene = scene_for(metadata, rng, size)
        caption = metadata["prompt"]
    return render(scene), caption, metadata


class WorldStream:
    """Endless, deterministic training examples: example i depends only on (seed, i), so runs resume anywhere.

    Each example is {"image": uint8 (size, size, 3), "caption": str, "metadata": dict}.
    """

    def __init__(self, seed: int, size: int = 32, tag_weights: dict[str, float] | None = None) -> None:
        _tag_probabilities(tag_weights)  # fail at construction on bad weights
        self.seed = seed
        self.size = size
        self.tag_weights = tag_weights

    def example(self, index: int) -> dict:
        """Example number `index` (>= 0)."""
        if index < 0:
            raise ValueError(f"example index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        image, caption, metadata = sample_training_example(rng, self.size, self.tag_weights)
        return {"image": image, "caption": caption, "metadata": metadata}

    def examples(self, start: int = 0) -> Iterator[dict]:
        """Examples start, start + 1, ... without end."""
        for index in itertools.count(start):
            yield self.example(index)

    def batch(self, start: int, n: int) -> list[dict]:
        """Examples start .. start + n - 1."""
        return [self.example(i) for i in range(start, start + n)]

    def __iter__(self) -> Iterator[dict]:
        return self.examples(0)


def world_vocabulary() -> list[str]:
    """Every word and punctuation mark any world caption can contain, sorted (for training a tokenizer)."""
    words = {"a", "an", "photo", "of", "and", *SHAPES, *PLURALS.values(), *COLORS, *NUMBER_WORDS.values()}
    words |= {w for relation in RELATIONS for w in relation.split()}
    words |= {word for _, word in SIZE_WORDS}
    words |= {w for row in GRID_WORDS for place in row for w in place.split()}
    words |= set(DENSE_FRAME_WORDS) | set(PUNCTUATION)
    return sorted(words)


def make_eval_metadata(per_tag: int = 48, seed: int = 0) -> list[dict]:
    """ShapesEval's prompt set in GenEval's metadata format: `per_tag` rows for each of the six tags.

    A tag with fewer distinct rows than `per_tag` cycles through all of them (in a seeded order); otherwise
    rows are drawn without repetition. Deterministic in (per_tag, seed).
    """
    if per_tag < 1:
        raise ConfigError(f"per_tag must be at least 1, got {per_tag}")
    rows = []
    for tag_index, tag in enumerate(GENEVAL_TAGS):
        options = all_metadata(tag)
        order = np.random.default_rng([seed, tag_index]).permutation(len(options))
        rows += [options[order[i % len(options)]] for i in range(per_tag)]
    return rows


def write_eval_metadata(path: str | Path, rows: list[dict]) -> None:
    """Write metadata rows as JSONL (one row per line, GenEval's `evaluation_metadata.jsonl` format)."""
    for row in rows:
        validate_metadata(row)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_metadata(path: str | Path) -> list[dict]:
    """Read and validate a GenEval-format metadata JSONL file (ours or the official one)."""
    rows = []
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}")
            validate_metadata(row)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{path}, line {line_number}: bad metadata row: {err}") from err
        rows.append(row)
    return rows


def swapped_color_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` colour-attribution prompts in GenEval's phrasing and the same prompts with the two colours
    exchanged ("a red circle and a blue square" / "a blue circle and a red square"): the pairs of
    :func:`parauni.analysis.binding.binding_profile`."""
    rng = np.random.default_rng(seed)
    prompts, swapped = [], []
    for _ in range(n):
        (s1, s2), (c1, c2) = _distinct(rng, SHAPES), _distinct(rng, tuple(COLORS))
        prompts.append(color_attr_row(s1, c1, s2, c2)["prompt"])
        swapped.append(color_attr_row(s1, c2, s2, c1)["prompt"])
    return prompts, swapped


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def binding_twin(caption: str) -> str | None:
    """``caption`` with its bindings exchanged, naming the same things: the first two different colours
    swapped ("a red circle and a blue square" -> "a blue circle and a red square"), else a relation turned
    round ("a circle left of a square" -> "a circle right of a square"); None when it has neither."""
    words = re.findall(r"[a-z]+(?: of)?|[^a-z]+", caption)
    colours = [i for i, w in enumerate(words) if w in COLORS]
    other = next((j for j in colours if words[j] != words[colours[0]]), None) if colours else None
    if other is not None:
        first = colours[0]
        words[first], words[other] = words[other], words[first]
        return "".join(words)
    for i, w in enumerate(words):
        if w in _OPPOSITE:
            words[i] = _OPPOSITE[w]
            return "".join(words)
    return None


_SHAPE_FORMS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}  # word -> its shape


def shape_twin(caption: str) -> str | None:
    """``caption`` with its last shape word replaced by a shape it does not name (plural kept; when it names
    them all, by another one), the replacement drawn from the caption's CRC-32 so that a caption always gets the
    same twin: "a red circle and a blue square" -> "a red circle and a blue cross"; None when it names no
    shape."""
    words = re.findall(r"[a-z]+|[^a-z]+", caption)
    found = [i for i, w in enumerate(words) if w in _SHAPE_FORMS]
    if not found:
        return None
    last = found[-1]
    named = {_SHAPE_FORMS[words[i]] for i in found}
    free = [s for s in SHAPES if s not in named] or [s for s in SHAPES if s != _SHAPE_FORMS[words[last]]]
    new = free[zlib.crc32(caption.encode()) % len(free)]
    words[last] = PLURALS[new] if words[last] in PLURALS.values() else new
    return "".join(words)


TWIN_KINDS = ("binding", "shape", "both")


def caption_twin(caption: str, kind: str = "binding") -> str | None:
    """The twin of ``caption`` that ``train.distill_twins`` pulls the condition's difference to the teacher's on:
    ``"binding"`` (:func:`binding_twin`), ``"shape"`` (:func:`shape_twin`) or ``"both"`` (one of the two, by
    the caption's CRC-32, when it has both)."""
    if kind == "binding":
        return binding_twin(caption)
    if kind == "shape":
        return shape_twin(caption)
    if kind != "both":
        raise ConfigError(f"twin kind {kind!r}: choose one of {list(TWIN_KINDS)}")
    bound, shaped = binding_twin(caption), shape_twin(caption)
    if bound is None or shaped is None:
        return bound or shaped
    return bound if zlib.crc32(caption.encode()) % 2 else shaped
