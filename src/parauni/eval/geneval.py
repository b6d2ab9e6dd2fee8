"""GenEval generation and scoring (Ghosh et al. 2023; the paper's main benchmark and its ablations; the
README.md, "Evaluate").

* `generate_geneval`: images for each metadata row in GenEval's official layout, resumably::

      out_dir/00000/metadata.jsonl      the row, one JSON line (written last: marks the prompt complete)
      out_dir/00000/samples/0000.png    image j of prompt i uses noise seed ``seed + i * images_per_prompt + j``
      ...

* `score_geneval`: runs a detector over that layout and decides each image with the ONE implementation of
  GenEval's rules, `parauni.scoring.geneval_rules` (`filter_detections` + `evaluate_image` + `score_rows`).

Detectors are callables ``(image, filename) -> list[Detection]`` on a uint8 (H, W, 3) image and its path
relative to the image folder, paired with a ``classify_colors`` callable:

* the shapes world's `ShapesDetector` (:func:`parauni.world.detector.world_detector`; colours from the
  detector itself);
* `PrecomputedDetections`: detections computed elsewhere (e.g. by Mask2Former + CLIP) read from a JSONL file;
  its docstring defines the format;
* `Mask2FormerDetector` with `CLIPColorClassifier` (:mod:`parauni.eval.geneval_mask2former`): GenEval's own.

`choose_detector` picks one from the command line's ``--detector`` options.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError, MissingFileError
from ..pipeline import GenerationOptions, generate
from ..scoring.clip import CLIP_L14
from ..scoring.geneval_rules import (
    GENEVAL_COLORS,
    ColorClassifier,
    Detection,
    color_from_detection,
    evaluate_image,
    filter_detections,
    score_rows,
    validate_metadata,
)
from ..utils.images import tensor_to_pil
from .geneval_mask2former import GENEVAL_OBJECTS, MASK2FORMER_REPO, CLIPColorClassifier, Mask2FormerDetector

METADATA_FILE = "metadata.jsonl"
SAMPLES_DIR = "samples"
SUMMARY_FILE = "summary.json"

Detector = Callable[[np.ndarray, str], list[Detection]]


# --------------------------------------------------------------------------------------------- layout


def prompt_dir(out_dir: str | Path, index: int) -> Path:
    """The folder of prompt `index`: ``out_dir/00042``."""
    return Path(out_dir) / f"{index:05d}"


def sample_path(folder: Path, j: int) -> Path:
    """Image `j` of a prompt folder: ``folder/samples/0003.png``."""
    return folder / SAMPLES_DIR / f"{j:04d}.png"


def _is_complete(folder: Path, row: dict, images_per_prompt: int) -> bool:
    """True when the prompt's metadata.jsonl and all its samples exist; an existing metadata.jsonl of a
    different row is an error (the folder belongs to another metadata file)."""
    meta = folder / METADATA_FILE
    if not meta.is_file():
        return False
    existing = read_row(meta)
    if existing != row:
        raise DataError(
            f"{meta} holds the row {existing.get('prompt')!r}, not {row.get('prompt')!r}; this output folder "
            "was generated from another metadata file: use a fresh --out folder"
        )
    return all(sample_path(folder, j).is_file() for j in range(images_per_prompt))


def read_row(meta: Path) -> dict:
    """The one metadata row of a prompt folder's metadata.jsonl; ValueError naming the file and line."""
    lines = [(i, line) for i, line in enumerate(meta.read_bytes().splitlines(), 1) if line.strip()]
    if len(lines) != 1:
        raise DataError(
            f"{meta} holds {len(lines)} non-empty lines, not one metadata row; delete its prompt folder and "
            "rerun parauni eval geneval to regenerate it"
        )
    number, line = lines[0]
    try:
        row = json.loads(line.decode("utf-8"))
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}")
        validate_metadata(row)
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(
            f"{meta}, line {number}: bad metadata row ({err}); delete its prompt folder and rerun "
            "parauni eval geneval to regenerate it"
        ) from err
    return row


def unknown_classes(row: dict, classes: Collection[str]) -> set[str]:
    """The object classes a metadata row names (include and exclude) that are not in ``classes``."""
    named = {c.get("class") for c in [*row.get("include", []), *row.get("exclude", [])]}
    return {c for c in named if c is not None} - set(classes)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file renamed into place, so a crash never leaves a truncated `path`."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_results(out_path: Path, rows: list[dict], summary: dict) -> None:
    """A benchmark's per-item rows as JSONL at `out_path` (atomically) and `summary` as summary.json beside it."""
    write_atomic(out_path, lambda p: p.write_text("".join(json.dumps(row) + "\n" for row in rows)))
    write_atomic(out_path.parent / SUMMARY_FILE, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))


def _pending_runs(pending: list[int], prompts_per_call: int) -> Iterator[list[int]]:
    """Consecutive prompt indices in runs of at most `prompts_per_call` (their seeds are contiguous)."""
    run: list[int] = []
    for i in pending:
        if run and (i != run[-1] + 1 or len(run) == prompts_per_call):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def generate_pending(
    model,
    prompts: list[str],
    done: Callable[[int], bool],
    write: Callable[[int, list], None],
    *,
    images_per_prompt: int,
    options: GenerationOptions | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> dict[str, int]:
    """Generate `images_per_prompt` images for every prompt i with ``not done(i)``; ``write(i, images)``
    stores them (a list of PIL images). The resumable loop of the benchmark layouts (GenEval, DPG-Bench).

    `options` (default: ``GenerationOptions()``) are passed on to every ``generate`` call. Image j of prompt
    i uses noise seed ``options.seed + i * images_per_prompt + j``, so the images do not depend on
    ``options.batch_size`` or on which prompts a resumed run still had to do. Several prompts share one
    ``generate`` call when a batch holds more than one prompt's images.

    Returns {"generated": prompts generated, "skipped": prompts already done}.
    """
    options = options or GenerationOptions()
    if images_per_prompt < 1:
        raise ConfigError(f"images_per_prompt={images_per_prompt} must be >= 1")
    if options.batch_size < 1:
        raise ConfigError(f"batch_size={options.batch_size} must be >= 1")
    pending = [i for i in range(len(prompts)) if not done(i)]
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress)
    bar.update(len(prompts) - len(pending))
    for run in _pending_runs(pending, max(1, options.batch_size // images_per_prompt)):
        texts = [prompts[i] for i in run for _ in range(images_per_prompt)]
        first = replace(options, seed=options.seed + run[0] * images_per_prompt)
        # (len(run) * images_per_prompt, 3, H, W)
        pixels = generate(model, texts, **first.kwargs(), progress=False)
        for k, i in enumerate(run):
            write(i, [tensor_to_pil(x) for x in pixels[k * images_per_prompt : (k + 1) * images_per_prompt]])
            bar.update(1)
    bar.close()
    return {"generated": len(pending), "skipped": len(prompts) - len(pending)}


# ------------------------------------------------------------------------------------------ generation


def generate_geneval(
    model,
    metadata_rows: list[dict],
    out_dir: str | Path,
    *,
    images_per_prompt: int = 4,
    options: GenerationOptions | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate `images_per_prompt` images per metadata row into GenEval's layout under `out_dir`.

    `options`: seed, batch size, steps, CFG and size of the generation (default: ``GenerationOptions()``).
    Image j of prompt i uses noise seed ``options.seed + i * images_per_prompt + j``, so the images do not
    depend on the batch size or on which prompts a resumed run still had to do. A prompt folder whose
    metadata.jsonl and all samples exist is skipped; samples are written first and metadata.jsonl last (each
    through a temporary file), so a crash leaves the prompt incomplete and the next run redoes it.

    Returns {"generated": prompts generated, "skipped": prompts already complete}.
    """
    for row in metadata_rows:
        validate_metadata(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(i: int, images: list) -> None:
        folder = prompt_dir(out_dir, i)
        (folder / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(images):
            write_atomic(sample_path(folder, j), lambda p, im=image: im.save(p, format="PNG"))
        line = json.dumps(metadata_rows[i]) + "\n"
        write_atomic(folder / METADATA_FILE, lambda p, text=line: p.write_text(text))

    return generate_pending(
        model,
        [row["prompt"] for row in metadata_rows],
        lambda i: _is_complete(prompt_dir(out_dir, i), metadata_rows[i], images_per_prompt),
        write,
        images_per_prompt=images_per_prompt,
        options=options,
        progress=progress,
        desc="GenEval",
    )


# ---------------------------------------------------------------------------------------------- scoring


def iter_layout(image_dir: str | Path) -> Iterator[tuple[str, dict, Path]]:
    """(filename relative to image_dir, metadata row, path) for every sample of every complete prompt
    folder, in order. Folders without metadata.jsonl (unfinished prompts) are an error."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MissingFileError(f"GenEval image folder {image_dir} does not exist")
    folders = sorted(p for p in image_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise MissingFileError(
            f"{image_dir} holds no prompt folders (00000/, 00001/, ...); is it a GenEval output folder?"
        )
    for folder in folders:
        meta = folder / METADATA_FILE
        if not meta.is_file():
            raise MissingFileError(
                f"{meta} is missing: prompt {folder.name} is unfinished; rerun the generation to complete it"
            )
        row = read_row(meta)
        samples = sorted((folder / SAMPLES_DIR).glob("*.png"))
        if not samples:
            raise MissingFileError(f"{folder / SAMPLES_DIR} holds no .png samples")
        for path in samples:
            yield path.relative_to(image_dir).as_posix(), row, path


def _summarise(kept: dict[str, list[Detection]]) -> dict[str, list[dict]]:
    """The kept detections per class as JSON: score, box and colour (no masks)."""
    return {
        cls: [
            {"score": round(d.score, 4), "box": [round(float(v), 2) for v in d.box], "color": d.color}
            for d in dets
        ]
        for cls, dets in kept.items()
    }


def score_geneval(
    image_dir: str | Path,
    detector: Detector,
    classify_colors: ColorClassifier,
    out_path: str | Path,
    *,
    classes: Collection[str] | None = None,
    progress: bool = False,
) -> dict:
    """Score a GenEval layout: one JSONL row per image to `out_path`, the summary to summary.json beside it.

    `classes`: the object classes the detector can find; prompts naming others are warned about (they can
    only be scored wrong). None: not checked.

    Each row holds `filename` (relative to `image_dir`), `tag`, `prompt`, `correct`, `reason` (GenEval's
    failure reasons, newline-joined), `metadata` and `detections` (the kept detections per class).
    Returns `score_rows`' summary: {"overall", "tags", "counts"}.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    items = list(iter_layout(image_dir))
    if classes is not None:
        _warn_unknown_classes(items, classes)
    for filename, metadata, path in tqdm(items, desc="scoring", unit="img", disable=not progress):
        with Image.open(path) as img:
            image = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        kept = filter_detections(detector(image, filename), metadata["tag"])
        correct, reason = evaluate_image(kept, metadata, classify_colors)
        rows.append(
            {
                "filename": filename,
                "tag": metadata["tag"],
                "prompt": metadata["prompt"],
                "correct": correct,
                "reason": reason,
                "metadata": metadata,
                "detections": _summarise(kept),
            }
        )
    summary = score_rows(rows)
    write_results(out_path, rows, summary)
    return summary


def _warn_unknown_classes(items: list[tuple[str, dict, Path]], classes: Collection[str]) -> None:
    """One warning for the prompts whose metadata names classes outside ``classes`` (scored 0 by design)."""
    bad = {}
    for filename, row, _ in items:
        unknown = unknown_classes(row, classes)
        if unknown:
            bad.setdefault(filename.split("/")[0], (row.get("prompt"), sorted(unknown)))
    if bad:
        folder, (prompt, unknown) = next(iter(bad.items()))
        warnings.warn(
            f"{len(bad)} prompt(s) name object classes the detector does not know, e.g. {folder} "
            f"{prompt!r}: {unknown}; their images are all scored wrong (check the metadata's class names)",
            stacklevel=3,
        )


def format_summary(summary: dict) -> str:
    """The per-tag table and the overall score as text."""
    lines = [f"{'tag':<15}{'images':>8}{'accuracy':>10}"]
    for tag, accuracy in summary["tags"].items():
        lines.append(f"{tag:<15}{summary['counts'][tag]:>8}{accuracy:>10.4f}")
    lines.append(f"{'overall':<15}{sum(summary['counts'].values()):>8}{summary['overall']:>10.4f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- detectors


@dataclass
class DetectorChoice:
    """A GenEval detector with its colour classifier and the object classes it knows (None: not known,
    e.g. for precomputed detections)."""

    detect: Detector
    classify_colors: ColorClassifier
    classes: Collection[str] | None


DETECTOR_KINDS = ("mask2former", "world", "file")


def choose_detector(
    kind: str | None,
    detections: str | None = None,
    detector_model: str | None = None,
    clip: str | None = None,
    world: Callable[[], DetectorChoice] | None = None,
) -> DetectorChoice:
    """The detector named by ``--detector`` and its options, checked together.

    ``mask2former``: GenEval's detector (``detector_model``, default facebook/mask2former-swin-small-coco-instance)
    with CLIP colours (``clip``, default CLIP ViT-L/14); ``file``: the precomputed ``detections`` JSONL;
    ``world``: the shapes world's detector, which its caller supplies as ``world`` (the world package sits
    above this one: :func:`parauni.world.detector.world_detector_choice`).
    """
    if kind is None:
        raise ConfigError(
            "give --detector world (the shapes world), --detector mask2former (GenEval's detector) or "
            "--detector file --detections FILE"
        )
    if kind not in DETECTOR_KINDS:
        raise ConfigError(f"--detector {kind}: choose one of {', '.join(DETECTOR_KINDS)}")
    if kind != "mask2former" and (detector_model or clip):
        raise ConfigError(f"--detector-model / --clip go with --detector mask2former, not {kind}")
    if kind != "file" and detections:
        raise ConfigError(f"--detections FILE goes with --detector file, not --detector {kind}")
    if kind == "mask2former":
        detector = Mask2FormerDetector.from_pretrained(detector_model or MASK2FORMER_REPO)
        colors = CLIPColorClassifier.from_pretrained(clip or CLIP_L14)
        return DetectorChoice(detector, colors, GENEVAL_OBJECTS)
    if kind == "world":
        if world is None:
            raise ConfigError("--detector world needs the shapes world (parauni.world)")
        return world()
    if not detections:
        raise ConfigError("--detector file needs --detections FILE (a JSONL of precomputed detections)")
    found = PrecomputedDetections(detections)
    return DetectorChoice(found, found.classify_colors, None)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO's uncompressed RLE {"size": [H, W], "counts": [n0, n1, ...]} -> bool (H, W) mask.

    Runs alternate background / object starting with background, over the pixels in column-major order.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataError(f"mask_rle must be {{'size': [H, W], 'counts': [...]}}, got {rle!r:.80}")
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        raise DataError(
            "mask_rle has compressed (string) counts; write uncompressed RLE (a list of run lengths), e.g. "
            "from a bool mask with runs over mask.flatten(order='F')"
        )
    if sum(counts) != height * width:
        raise DataError(f"mask_rle runs sum to {sum(counts)}, not {height} x {width} = {height * width}")
    values = np.arange(len(counts)) % 2 == 1  # run k is object when k is odd
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def _parse_detection(item: object, where: str) -> dict:
    if not isinstance(item, dict) or not {"label", "score", "box"} <= set(item):
        raise DataError(f"{where}: a detection needs 'label', 'score' and 'box', got {item!r:.120}")
    box = item["box"]
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise DataError(f"{where}: box {box!r} must be [x0, y0, x1, y1] in pixels")
    color = item.get("color")
    if color is not None and color not in GENEVAL_COLORS:
        raise DataError(f"{where}: colour {color!r} is not one of {GENEVAL_COLORS}")
    return {
        "label": str(item["label"]),
        "score": float(item["score"]),
        "box": tuple(float(v) for v in box),
        "color": color,
        "mask_rle": item.get("mask_rle"),
    }


class PrecomputedDetections:
    """Detections computed elsewhere (e.g. Mask2Former + a CLIP colour classifier), read from a JSONL file.

    Format, one line per image, `filename` relative to the GenEval image folder::

        {"filename": "00000/samples/0000.png",
         "detections": [{"label": "dog", "score": 0.97, "box": [x0, y0, x1, y1],
                         "color": "red",                                  (optional; one of GENEVAL_COLORS)
                         "mask_rle": {"size": [H, W], "counts": [...]}},  (optional; COCO uncompressed RLE)
                        ...]}

    Boxes are in pixels; without `mask_rle` the mask is the filled box. Colour clauses read each detection's
    `color` (`color_from_detection`), so the file must give `color` for objects a colour clause asks about.
    Every image scored must have a line (an image with no objects has ``"detections": []``).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"detections file {path} does not exist")
        self.path = path
        self.by_file: dict[str, list[dict]] = {}
        for line_number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            entry = json.loads(line)
            if not isinstance(entry, dict) or "filename" not in entry or "detections" not in entry:
                raise DataError(f"{where}: expected {{'filename': ..., 'detections': [...]}}")
            filename = Path(entry["filename"]).as_posix()
            if filename in self.by_file:
                raise DataError(f"{where}: {filename} appears twice")
            self.by_file[filename] = [_parse_detection(d, where) for d in entry["detections"]]

    def __call__(self, image: np.ndarray, filename: str) -> list[Detection]:
        if filename not in self.by_file:
            raise DataError(f"{self.path} has no detections for {filename}; it needs one line per image")
        height, width = image.shape[:2]
        detections = []
        for d in self.by_file[filename]:
            if d["mask_rle"] is not None:
                mask = decode_rle(d["mask_rle"])
                if mask.shape != (height, width):
                    raise DataError(
                        f"{self.path}: {filename} has a {mask.shape} mask for a {height} x {width} image"
                    )
            else:
                x0, y0, x1, y1 = d["box"]
                mask = np.zeros((height, width), dtype=bool)
                mask[
                    max(0, int(np.floor(y0))) : int(np.ceil(y1)), max(0, int(np.floor(x0))) : int(np.ceil(x1))
                ] = True
            detections.append(Detection(d["label"], d["score"], d["box"], mask, d["color"]))
        return detections

    def classify_colors(self, dets: list[Detection], cls: str) -> list[str]:
        """Each detection's `color` from the file."""
        return color_from_detection(dets, cls)
