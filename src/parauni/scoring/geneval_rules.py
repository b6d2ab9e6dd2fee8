"""GenEval's scoring rules (Ghosh et al. 2023; the benchmark of ParaUni's main results and ablations; the
README.md, "Evaluate"), written once.

Both the real GenEval evaluation (a Mask2Former detector plus CLIP colour classification) and the shapes
world's ShapesEval (`parauni.world.detector`) turn an image into `Detection`s and score them here:

* `filter_detections`: per class, sort by score, keep score > 0.3 (0.9 for the counting tag), at most 16
  per class, no NMS.
* `evaluate_image`: GenEval's per-image decision from the metadata row's include / exclude clauses,
  including the colour clause (via a `classify_colors` callable) and the position clause (`relative_position`).
* `score_rows`: per-tag accuracy and the overall score, the unweighted mean of the per-tag means.
* `partial_credit`: Flow-GRPO's GenEval reward for Stage III (docs/how-it-works.md, "Stage III"), the mean of per-clause
  credits, with the same colour and position checks as `evaluate_image`.

The metadata format is GenEval's `evaluation_metadata.jsonl`: {"tag", "include": [{"class", "count",
optional "color", optional "position": [relation, target_index]}], optional "exclude", "prompt"}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
GENEVAL_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_MARGIN = 0.1


@dataclass
class Detection:
    """One detected object: class name, confidence, box (x0, y0, x1, y1) in pixels, bool HxW mask, colour.

    `color` is set by detectors that know an object's colour (the shapes world); the real GenEval path leaves
    it None and classifies colours from the image instead.
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


ColorClassifier = Callable[[list[Detection], str], list[str]]


def _row_name(metadata: dict) -> str:
    return repr(metadata.get("prompt", "<no prompt>"))


def _check_clause(clause: object, where: str, prompt: str) -> None:
    if not isinstance(clause, dict) or "class" not in clause or "count" not in clause:
        raise DataError(f"metadata row {prompt}: {where} {clause!r} needs a 'class' and a 'count'")
    count = clause["count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise DataError(f"metadata row {prompt}: {where} has count {count!r}; expected an integer >= 1")
    if "color" in clause and clause["color"] not in GENEVAL_COLORS:
        raise DataError(
            f"metadata row {prompt}: {where} has colour {clause['color']!r}; expected one of {GENEVAL_COLORS}"
        )


def validate_metadata(metadata: dict) -> None:
    """Raise ValueError naming the row's prompt if `metadata` is not a valid GenEval metadata row."""
    prompt = _row_name(metadata)
    for key in ("tag", "include"):
        if key not in metadata:
            raise DataError(
                f"metadata row {prompt} has no {key!r}; every GenEval row needs 'tag' and 'include'"
            )
    if metadata["tag"] not in GENEVAL_TAGS:
        raise DataError(
            f"metadata row {prompt} has unknown tag {metadata['tag']!r}; expected one of {GENEVAL_TAGS}"
        )
    for i, clause in enumerate(metadata["include"]):
        _check_clause(clause, f"include[{i}]", prompt)
        if "position" not in clause:
            continue
        position = clause["position"]
        if (
            not isinstance(position, list | tuple)
            or len(position) != 2
            or position[0] not in RELATIONS
            or not isinstance(position[1], int)
            or not 0 <= position[1] < i
        ):
            raise DataError(
                f"metadata row {prompt}: include[{i}] has position {position!r}; expected [relation, index] "
                f"with relation in {RELATIONS} and index of an earlier include clause"
            )
    for i, clause in enumerate(metadata.get("exclude", [])):
        _check_clause(clause, f"exclude[{i}]", prompt)


def filter_detections(
    detections: list[Detection],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, list[Detection]]:
    """Keep each class's confident detections, best first: score > threshold (counting_threshold for the
    counting tag), at most `max_objects` per class, no NMS. Classes with nothing kept are absent.

    As the official `evaluate_images.py`, which reads mmdet's float32 score column: scores and thresholds
    are compared in float32 (a score of float32(0.3) is not kept at threshold 0.3), and the order is an
    ascending sort reversed, so equal scores come latest-detected first (numpy 1.23's quicksort is
    insertion sort, hence stable, for the <= 16 detections a class has in practice).
    """
    if tag not in GENEVAL_TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; expected one of {GENEVAL_TAGS}")
    cutoff = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.label, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        scores = np.asarray([d.score for d in dets], dtype=np.float32)
        order = np.argsort(scores, kind="stable")[::-1]  # descending; ties: the later detection first
        order = order[scores[order] > np.float32(cutoff)][:max_objects]
        if len(order):
            kept[label] = [dets[i] for i in order]
    return kept


def relative_position(a: Detection, b: Detection, margin: float = POSITION_MARGIN) -> set[str]:
    """The relations of A relative to B ("left of", "right of", "above", "below"; y grows downward).

    Centre offsets shrink by `margin` times the summed box sizes per axis before normalising by the full
    offset's length; a relation holds when its normalised component passes 0.5.
    """
    box_a, box_b = np.asarray(a.box, dtype=float), np.asarray(b.box, dtype=float)
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2  # (dx, dy) of the centres
    sizes = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])  # (width_a + width_b, height_a + height_b)
    revised = np.maximum(np.abs(offset) - margin * sizes, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _color_reason(cls: str, wanted: str, count: int, colors: list[str]) -> str:
    found = ", ".join(f"{colors.count(c)} {c}" for c in GENEVAL_COLORS if c in colors)
    return f"expected {wanted} {cls}>={count}, found {colors.count(wanted)} {wanted}; and {found}"


def _position_reason(cls: str, relation: str, found: list[Detection], targets: list[Detection]) -> str | None:
    """The failure reason if some found object lacks `relation` to some target object, else None."""
    for obj in found:
        for target in targets:
            actual = relative_position(obj, target)
            if relation not in actual:
                shown = " and ".join(sorted(actual)) or "no relation to"
                return f"expected {cls} {relation} target, found {shown} target"
    return None


def evaluate_image(
    kept: dict[str, list[Detection]], metadata: dict, classify_colors: ColorClassifier
) -> tuple[bool, str]:
    """GenEval's decision for one image from its kept detections -> (correct, reasons joined by newlines).

    `kept` is `filter_detections`' output; `classify_colors(found, cls)` names the colour of each found
    object (CLIP on masked crops for real images, `color_from_detection` in the shapes world).
    """
    validate_metadata(metadata)
    correct = True
    reasons: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = kept.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if matched and "color" in clause:
            colors = classify_colors(found, cls)
            if colors.count(clause["color"]) < count:
                matched = False
                reasons.append(_color_reason(cls, clause["color"], count, colors))
        if matched and "position" in clause:
            relation, target_index = clause["position"]
            targets = matched_groups[target_index]
            if targets is None:
                matched = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                reason = _position_reason(cls, relation, found, targets)
                if reason is not None:
                    matched = False
                    reasons.append(reason)
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        n = len(kept.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
    return correct, "\n".join(reasons)


def partial_credit(
    kept: dict[str, list[Detection]], metadata: dict, classify_colors: ColorClassifier
) -> float:
    """Flow-GRPO's GenEval reward for one image: the mean of per-requirement credits of the include clauses.

    Each include clause of class `cls` asking for `count` objects, with `n` kept detections of `cls`, adds:

    * a count credit ``1 - |count - n| / count`` (below 0 when more than twice the count is found, as in
      Flow-GRPO); the clause is matched only when ``n == count`` exactly (GenEval accepts ``n >= count``);
    * if it asks for a colour: ``matches / count`` over the colours of its `n` objects when matched, else 0;
      a colour mismatch unmatches the clause;
    * if it asks for a position: 1 when the clause is still matched, its target clause was matched and every
      object has the relation to every target object (the rule of `evaluate_image`), else 0.

    Exclude clauses add nothing (the exact count already penalises extra objects). Two deliberate
    departures from Flow-GRPO's reward server, both only where its bookkeeping is inconsistent: a failed
    position check adds a single 0 (the server adds a 0 and a 1), and a position requirement skipped
    because the colour failed adds 0 (the server adds nothing), so every clause has a fixed number of terms.
    Returns a float, 1.0 for an image GenEval's strict rule accepts with exact counts, 0.0 for an empty one.
    """
    validate_metadata(metadata)
    if not metadata["include"]:
        raise DataError(f"metadata row {_row_name(metadata)} has no include clause to give credit for")
    credits: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = kept.get(cls, [])
        credits.append(1.0 - abs(count - len(found)) / count)
        matched = len(found) == count
        if "color" in clause:
            matches = classify_colors(found, cls).count(clause["color"]) if matched else 0
            credits.append(matches / count)
            matched = matched and matches == count
        if "position" in clause:
            relation, target_index = clause["position"]
            targets = matched_groups[target_index]
            matched = (
                matched and targets is not None and _position_reason(cls, relation, found, targets) is None
            )
            credits.append(float(matched))
        matched_groups.append(found if matched else None)
    return sum(credits) / len(credits)


def color_from_detection(dets: list[Detection], cls: str) -> list[str]:
    """`classify_colors` for detectors that set `Detection.color`: each detection's own colour."""
    colors = []
    for det in dets:
        if det.color is None:
            raise ValueError(
                f"detection of {cls!r} with box {det.box} has no colour; color_from_detection needs a detector "
                "that sets Detection.color (use an image-based colour classifier otherwise)"
            )
        colors.append(det.color)
    return colors


def score_rows(rows: list[dict]) -> dict:
    """Aggregate per-image results {"tag", "correct", ...} -> {"overall", "tags", "counts"}.

    "tags" is each present tag's accuracy, "counts" its number of images, and "overall" the unweighted
    mean of the per-tag accuracies (GenEval's overall score).
    """
    if not rows:
        raise ValueError("score_rows got no rows; evaluate at least one image")
    results: dict[str, list[bool]] = {}
    for i, row in enumerate(rows):
        tag = row.get("tag")
        if tag not in GENEVAL_TAGS:
            raise ValueError(f"row {i} has tag {tag!r}; expected one of {GENEVAL_TAGS}")
        if "correct" not in row:
            raise ValueError(f"row {i} (tag {tag!r}) has no 'correct' field")
        results.setdefault(tag, []).append(bool(row["correct"]))
    tags = {tag: float(np.mean(results[tag])) for tag in GENEVAL_TAGS if tag in results}
    counts = {tag: len(results[tag]) for tag in tags}
    return {"overall": float(np.mean(list(tags.values()))), "tags": tags, "counts": counts}
