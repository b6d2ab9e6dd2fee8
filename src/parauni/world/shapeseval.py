"""ShapesEval: the world's GenEval. Generate images for GenEval-format prompts, detect, score.

The detector knows the world (:class:`~parauni.world.detector.ShapesDetector`); the scoring is GenEval's
own rules from :mod:`parauni.scoring.geneval_rules`, the same code the real GenEval evaluation uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..scoring.geneval_rules import evaluate_image, filter_detections, score_rows
from .detector import ShapesDetector

# generate(prompts, first_seed) -> uint8 images (N, H, W, 3); image i uses noise seed first_seed + i.
GenerateFn = Callable[[list[str], int], np.ndarray]


def score_images(images: np.ndarray, rows: list[dict], detector: ShapesDetector | None = None) -> list[dict]:
    """Score uint8 images (N, H, W, 3) against their metadata rows; one result dict per image, with the kept
    objects it shows as ``drawn``: [[class, colour], ...]."""
    detector = detector or ShapesDetector()
    results = []
    for image, row in zip(images, rows, strict=True):
        kept = filter_detections(detector(image), row["tag"])
        correct, reason = evaluate_image(kept, row, detector.classify_colors)
        drawn = sorted([cls, c] for cls, found in kept.items() for c in detector.classify_colors(found, cls))
        results.append(
            {"tag": row["tag"], "prompt": row["prompt"], "correct": correct, "reason": reason, "drawn": drawn}
        )
    return results


ATTRIBUTION_KINDS = ("correct", "bound wrongly", "shape missing", "colour missing", "both missing")


def attribution_failures(results: list[dict], rows: list[dict]) -> dict[str, float] | None:
    """What the colour-attribution images show, as fractions of them (None without such rows): correct; every
    asked shape and colour drawn but paired wrongly ("bound wrongly"); the asked colours drawn but an asked
    shape missing ("shape missing"); the shapes drawn but a colour missing; both missing. ``results`` are
    :func:`run_shapeseval`'s (``index`` into ``rows``)."""
    counts = dict.fromkeys(ATTRIBUTION_KINDS, 0)
    for r in results:
        row = rows[r["index"]]
        if row["tag"] != "color_attr":
            continue
        shapes = {c["class"] for c in row["include"]} <= {cls for cls, _ in r["drawn"]}
        colours = {c["color"] for c in row["include"]} <= {col for _, col in r["drawn"]}
        if r["correct"]:
            kind = "correct"
        elif shapes and colours:
            kind = "bound wrongly"
        else:
            kind = {(False, True): "shape missing", (True, False): "colour missing"}.get(
                (shapes, colours), "both missing"
            )
        counts[kind] += 1
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else None


def run_shapeseval(
    generate: GenerateFn,
    rows: list[dict],
    images_per_prompt: int = 4,
    batch_size: int = 64,
    seed: int = 0,
    out_dir: str | Path | None = None,
    keep_per_tag: int = 8,
    progress: bool = True,
    desc: str = "ShapesEval",
) -> dict:
    """Generate ``images_per_prompt`` images for every row, score them and summarise.

    Args:
        out_dir: if given, images are written in GenEval's layout (``<out>/00000/metadata.jsonl``,
            ``<out>/00000/samples/0000.png``) and per-image results to ``<out>/results.jsonl``.
        keep_per_tag: the images of the first ``keep_per_tag`` prompts of each tag are returned under
            ``"samples"`` (for grids).

    Returns:
        {"overall", "tags", "counts", "attribution" (:func:`attribution_failures`), "results": [...],
        "samples": {tag: [(prompt, [images])]}}.
    """
    detector = ShapesDetector()
    jobs = [(i, k) for i in range(len(rows)) for k in range(images_per_prompt)]
    results: list[dict] = []
    samples: dict[str, list] = {}
    seen: dict[str, int] = {}
    images_of: dict[int, list[np.ndarray]] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = generate([rows[i]["prompt"] for i, _ in chunk], seed + start)
        chunk_rows = [rows[i] for i, _ in chunk]
        for (i, k), image, result in zip(
            chunk, images, score_images(images, chunk_rows, detector), strict=True
        ):
            results.append({"index": i, "sample": k, **result})
            images_of.setdefault(i, []).append(image)
            if out_dir is not None:
                folder = Path(out_dir) / f"{i:05d}"
                (folder / "samples").mkdir(parents=True, exist_ok=True)
                if k == 0:
                    (folder / "metadata.jsonl").write_text(json.dumps(rows[i]) + "\n")
                Image.fromarray(image).save(folder / "samples" / f"{k:04d}.png")
        bar.update(len(chunk))
    bar.close()
    for i, row in enumerate(rows):
        if seen.get(row["tag"], 0) < keep_per_tag:
            seen[row["tag"]] = seen.get(row["tag"], 0) + 1
            samples.setdefault(row["tag"], []).append((row["prompt"], images_of[i]))
    summary = score_rows(results)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return {
        **summary,
        "attribution": attribution_failures(results, rows),
        "results": results,
        "samples": samples,
    }
