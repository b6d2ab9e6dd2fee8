"""DPG-Bench generation and scoring (ELLA, Hu et al. 2024; the paper's dense-prompt benchmark, DPG 83.45; the
README.md, "Evaluate").

* `generate_dpg`: four images per prompt tiled 2x2 into ``out_dir/<item_id>.png`` (the official layout),
  resumably; image j of prompt i uses noise seed ``seed + i * 4 + j`` (GenEval's rule, `generate_geneval`).
* `score_dpg`: the official scorer (ELLA's ``dpg_bench/compute_dpg_bench.py``) over that layout. Its question
  file, ``dpg_bench.csv``, lists per prompt (`item_id`) the propositions with a dependency graph; every crop of
  the grid is asked every question; an answer "yes" scores 1; a question whose parent failed scores 0 (in CSV
  order, against the parents' already adjusted scores, as the official loop does); score per crop = mean over
  the questions, per prompt = mean over its 4 crops; DPG = mean over prompts x 100.

Category scores (L1 = ``category_broad``: global, entity, attribute, relation, other; L2 = "broad - detailed")
pool the RAW answers (before the dependency rule) of every question of every prompt. The official scorer pools
only the LAST crop's answers (ELLA issue #60); ``category_crops="last"`` (the default) reproduces it, so the
numbers compare with published ones, ``"all"`` pools all four crops. One official quirk is not reproduced: it
skips the CSV's first data row (ELLA issue #61), losing the first prompt's first question, and the whole prompt
when another of its questions depends on that one.

The question answerer is any callable ``(image: PIL.Image, question: str) -> str`` (`VQAModel`). The official
one, mPLUG-large (ModelScope ``damo/mplug_visual-question-answering_coco_large_en``), is not in transformers;
`BlipVQA` wraps a transformers ``BlipForQuestionAnswering`` (e.g. ``Salesforce/blip-vqa-base``), so scores from
it are DPG-Bench's rules with another judge, not the paper's numbers.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from parauni.eval.geneval import generate_pending, write_atomic, write_results
from parauni.pipeline import GenerationOptions
from parauni.scoring.clip import RewardModelError, load_reward_weights
from parauni.utils.device import default_device
from parauni.utils.loading import checked_source

from ..errors import ConfigError, DataError, MissingFileError

CSV_COLUMNS = (
    "item_id",
    "text",
    "keywords",
    "proposition_id",
    "dependency",
    "category_broad",
    "category_detailed",
    "tuple",
    "question_natural_language",
)
L1_CATEGORIES = ("global", "entity", "attribute", "relation", "other")
GRID = 2  # 2 x 2 tiles
IMAGES_PER_PROMPT = GRID * GRID
CATEGORY_CROPS = ("last", "all")
BLIP_VQA_REPO = "Salesforce/blip-vqa-base"
RESULTS_FILE = "results.jsonl"

VQAModel = Callable[[Image.Image, str], str]


# ---------------------------------------------------------------------------------------------- inputs


def read_dpg_prompts(path: str | Path) -> list[dict[str, str]]:
    """DPG-Bench prompts from a JSONL of ``{"item_id", "prompt"}`` lines, in file order.

    Item ids name the output files, so each must be unique and a plain file name.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"DPG-Bench prompts file {path} does not exist")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "item_id" not in row:
            raise DataError(f'{where}: expected {{"item_id": ..., "prompt": "..."}}, got {line[:80]!r}')
        item_id = str(row["item_id"])
        if not item_id or item_id.startswith(".") or "/" in item_id or "\\" in item_id:
            raise DataError(f"{where}: item_id {item_id!r} is not a plain file name")
        if item_id in seen:
            raise DataError(f"{where}: item_id {item_id!r} appears twice")
        seen.add(item_id)
        rows.append({"item_id": item_id, "prompt": row["prompt"]})
    if not rows:
        raise DataError(f"{path} holds no prompts")
    return rows


@dataclass(frozen=True)
class Question:
    """One proposition of a DPG-Bench prompt: its id, its parents (empty: none), categories and question."""

    proposition_id: int
    parents: tuple[int, ...]
    category: str  # L1, e.g. "entity"
    category_detailed: str  # L2, e.g. "entity - whole"
    question: str


@dataclass(frozen=True)
class DPGItem:
    """A prompt of ``dpg_bench.csv``: its text and questions in CSV order."""

    item_id: str
    text: str
    questions: tuple[Question, ...]


def _parse_parents(value: str, where: str) -> tuple[int, ...]:
    try:
        ids = [int(part) for part in value.split(",")]
    except ValueError:
        raise DataError(
            f"{where}: dependency {value!r} must be comma-separated proposition ids ('0' = none)"
        ) from None
    return tuple(i for i in ids if i != 0)


def read_dpg_csv(path: str | Path) -> dict[str, DPGItem]:
    """The official question file ``dpg_bench.csv`` (columns `CSV_COLUMNS`) as {item_id: DPGItem}.

    Every parent a dependency names must be a proposition of the same prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"DPG-Bench question file {path} does not exist; it is dpg_bench/dpg_bench.csv of the ELLA "
            "repository (github.com/TencentQQGYLab/ELLA)"
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks the column(s) {missing}; DPG-Bench's CSV has {list(CSV_COLUMNS)}")
        texts: dict[str, str] = {}
        questions: dict[str, list[Question]] = defaultdict(list)
        for line_number, row in enumerate(reader, start=2):
            where = f"{path}, line {line_number}"
            item_id = row["item_id"].strip()
            try:
                proposition_id = int(row["proposition_id"])
            except ValueError:
                raise DataError(
                    f"{where}: proposition_id {row['proposition_id']!r} is not an integer"
                ) from None
            broad, detailed = row["category_broad"].strip(), row["category_detailed"].strip()
            texts.setdefault(item_id, row["text"])
            if any(q.proposition_id == proposition_id for q in questions[item_id]):
                raise DataError(f"{where}: item {item_id!r} has proposition {proposition_id} twice")
            questions[item_id].append(
                Question(
                    proposition_id=proposition_id,
                    parents=_parse_parents(row["dependency"], where),
                    category=broad,
                    category_detailed=f"{broad} - {detailed}" if detailed else broad,
                    question=row["question_natural_language"],
                )
            )
    if not questions:
        raise DataError(f"{path} holds no questions")
    items = {}
    for item_id, item_questions in questions.items():
        ids = {q.proposition_id for q in item_questions}
        for q in item_questions:
            unknown = sorted(set(q.parents) - ids)
            if unknown:
                raise DataError(
                    f"{path}: proposition {q.proposition_id} of item {item_id!r} depends on {unknown}, "
                    f"which the item does not have (its propositions: {sorted(ids)})"
                )
        items[item_id] = DPGItem(item_id, texts[item_id], tuple(item_questions))
    return items


# ------------------------------------------------------------------------------------------------ grid


def tile_grid(images: list[Image.Image]) -> Image.Image:
    """Four equal-size images -> one 2x2 grid (2H, 2W): row-major, image 0 top-left, 3 bottom-right."""
    if len(images) != IMAGES_PER_PROMPT or len({im.size for im in images}) != 1:
        raise ValueError(f"a DPG-Bench grid takes {IMAGES_PER_PROMPT} images of one size, got {len(images)}")
    width, height = images[0].size
    grid = Image.new("RGB", (GRID * width, GRID * height))
    for j, image in enumerate(images):
        grid.paste(image, ((j % GRID) * width, (j // GRID) * height))
    return grid


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """A 2x2 grid -> its four crops in the official order: top-left, top-right, bottom-left, bottom-right."""
    width, height = grid.size
    if width % GRID or height % GRID:
        raise ValueError(f"a DPG-Bench grid must have even sides (2x2 tiles), got {width} x {height}")
    w, h = width // GRID, height // GRID
    return [
        grid.crop(((j % GRID) * w, (j // GRID) * h, (j % GRID + 1) * w, (j // GRID + 1) * h))
        for j in range(4)
    ]


# ------------------------------------------------------------------------------------------ generation


def generate_dpg(
    model,
    prompts: list[dict[str, str]],
    out_dir: str | Path,
    *,
    options: GenerationOptions | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate four images per prompt row (`read_dpg_prompts`) as ``out_dir/<item_id>.png`` 2x2 grids.

    `options`: seed, batch size, steps, CFG and the size of each image (default: ``GenerationOptions()``).
    Image j of prompt i (its index in `prompts`) uses noise seed ``options.seed + i * 4 + j``, so the grids
    do not depend on the batch size or on what a resumed run still had to do. A grid is written through a
    temporary file, so an existing ``<item_id>.png`` is complete and is skipped.

    Returns {"generated": grids generated, "skipped": grids already there}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def grid_path(i: int) -> Path:
        return out_dir / f"{prompts[i]['item_id']}.png"

    def write(i: int, images: list) -> None:
        grid = tile_grid(images)
        write_atomic(grid_path(i), lambda p: grid.save(p, format="PNG"))

    return generate_pending(
        model,
        [row["prompt"] for row in prompts],
        lambda i: grid_path(i).is_file(),
        write,
        images_per_prompt=IMAGES_PER_PROMPT,
        options=options,
        progress=progress,
        desc="DPG-Bench",
    )


# ---------------------------------------------------------------------------------------------- scoring


def is_yes(answer: str) -> bool:
    """The official rule ``answer == "yes"``, ignoring case and surrounding whitespace (mPLUG answers in
    lowercase; other answerers may not)."""
    return answer.strip().lower() == "yes"


def apply_dependencies(questions: Sequence[Question], raw: Sequence[float]) -> list[float]:
    """Zero each question whose parent scored 0, in question order against already adjusted scores (so a
    failure runs down a chain whose parents come first), as the official scorer does. raw: one 0/1 per question."""
    scores = {q.proposition_id: s for q, s in zip(questions, raw, strict=True)}
    for q in questions:
        if any(scores[parent] == 0 for parent in q.parents):
            scores[q.proposition_id] = 0.0
    return [scores[q.proposition_id] for q in questions]


def score_item(grid: Image.Image, item: DPGItem, vqa: VQAModel) -> dict:
    """Ask every question of `item` about every crop of `grid`.

    Returns {"item_id", "score" (mean over crops), "crop_scores" (4), "questions": [{"proposition_id",
    "question", "category", "category_detailed", "parents", "answers" (4), "raw" (4 x 0/1), "scores" (4, after
    the dependency rule)}]}.
    """
    crops = split_grid(grid)
    answers = [[vqa(crop, q.question) for crop in crops] for q in item.questions]  # (questions, crops)
    raw = [[float(is_yes(a)) for a in row] for row in answers]
    per_crop = [apply_dependencies(item.questions, [row[c] for row in raw]) for c in range(len(crops))]
    crop_scores = [sum(scores) / len(scores) for scores in per_crop]
    return {
        "item_id": item.item_id,
        "score": sum(crop_scores) / len(crop_scores),
        "crop_scores": crop_scores,
        "questions": [
            {
                "proposition_id": q.proposition_id,
                "question": q.question,
                "category": q.category,
                "category_detailed": q.category_detailed,
                "parents": list(q.parents),
                "answers": answers[k],
                "raw": raw[k],
                "scores": [per_crop[c][k] for c in range(len(crops))],
            }
            for k, q in enumerate(item.questions)
        ],
    }


def _ordered(categories: dict[str, list[float]]) -> dict[str, float]:
    """Mean x 100 per category, the five official L1 names first."""
    names = sorted(categories, key=lambda c: (L1_CATEGORIES.index(c) if c in L1_CATEGORIES else 99, c))
    return {c: 100 * sum(categories[c]) / len(categories[c]) for c in names}


def summarise(rows: list[dict], category_crops: str = "last", unscored: int = 0) -> dict:
    """`score_item` rows -> {"dpg", "prompts", "unscored", "categories", "categories_detailed",
    "category_counts", "category_crops"}; scores x 100. Category scores pool the raw answers of the last crop
    (`category_crops="last"`, the official scorer) or of all crops (``"all"``)."""
    if category_crops not in CATEGORY_CROPS:
        raise ConfigError(f"category_crops={category_crops!r} must be one of {CATEGORY_CROPS}")
    if not rows:
        raise DataError("no DPG-Bench prompts were scored")
    l1: dict[str, list[float]] = defaultdict(list)
    l2: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for q in row["questions"]:
            pooled = q["raw"][-1:] if category_crops == "last" else q["raw"]
            l1[q["category"]] += pooled
            l2[q["category_detailed"]] += pooled
    categories = _ordered(l1)
    return {
        "dpg": 100 * sum(row["score"] for row in rows) / len(rows),
        "prompts": len(rows),
        "unscored": unscored,
        "categories": categories,
        "categories_detailed": _ordered(l2),
        "category_counts": {c: len(l1[c]) for c in categories},
        "category_crops": category_crops,
    }


def score_dpg(
    image_dir: str | Path,
    items: dict[str, DPGItem],
    vqa: VQAModel,
    out_path: str | Path,
    *,
    category_crops: str = "last",
    progress: bool = False,
) -> dict:
    """Score every ``<item_id>.png`` grid in `image_dir` against `items` (`read_dpg_csv`).

    Writes one `score_item` row per prompt (plus its "prompt" text) to `out_path` and `summarise`'s summary to
    summary.json beside it, and returns the summary. A grid without questions is an error; prompts of the CSV
    without a grid are counted as "unscored" (e.g. a run with --limit).
    """
    if category_crops not in CATEGORY_CROPS:
        raise ConfigError(f"category_crops={category_crops!r} must be one of {CATEGORY_CROPS}")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MissingFileError(f"DPG-Bench image folder {image_dir} does not exist")
    grids = {p.stem: p for p in image_dir.glob("*.png") if not p.name.startswith(".")}
    unknown = sorted(set(grids) - set(items))
    if unknown:
        raise DataError(
            f"{image_dir} holds {len(unknown)} grid(s) with no questions in the CSV (e.g. {unknown[0]}.png); "
            "is it a DPG-Bench output folder scored with its dpg_bench.csv?"
        )
    if not grids:
        raise MissingFileError(f"{image_dir} holds no <item_id>.png grids; is it a DPG-Bench output folder?")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    scored = [item_id for item_id in items if item_id in grids]
    for item_id in tqdm(scored, desc="DPG-Bench scoring", unit="prompt", disable=not progress):
        with Image.open(grids[item_id]) as img:
            grid = img.convert("RGB")
        rows.append({**score_item(grid, items[item_id], vqa), "prompt": items[item_id].text})
    summary = summarise(rows, category_crops, unscored=len(items) - len(rows))
    write_results(out_path, rows, summary)
    return summary


def format_dpg_summary(summary: dict) -> str:
    """The L1 category table and the DPG-Bench score as text."""
    lines = [f"{'category':<12}{'answers':>9}{'score':>8}"]
    for category, score in summary["categories"].items():
        lines.append(f"{category:<12}{summary['category_counts'][category]:>9}{score:>8.2f}")
    lines.append(
        f"{'DPG-Bench':<12}{summary['prompts']:>9}{summary['dpg']:>8.2f}   ({summary['prompts']} prompts)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ question answering


def check_vqa_source(source: str | Path) -> str:
    """`source` as a string when it is an existing folder or a Hugging Face id; RewardModelError otherwise."""
    return checked_source(source, "DPG-Bench VQA model", BLIP_VQA_REPO, RewardModelError)


class BlipVQA:
    """A transformers ``BlipForQuestionAnswering`` + ``BlipProcessor`` as a `VQAModel`: greedy decoding of at
    most `max_new_tokens` answer tokens."""

    def __init__(self, model: torch.nn.Module, processor, max_new_tokens: int = 10) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
    ) -> BlipVQA:
        """Load from a local folder or a Hugging Face id (e.g. ``Salesforce/blip-vqa-base``) onto ``device``
        (default: :func:`~parauni.utils.device.default_device`, which reads ``$PARAUNI_DEVICE``)."""
        from transformers import AutoConfig, BlipForQuestionAnswering, BlipProcessor

        what = "DPG-Bench VQA model"
        config = load_reward_weights(AutoConfig.from_pretrained, source, f"{what} config", BLIP_VQA_REPO)
        if config.model_type != "blip":
            raise RewardModelError(
                f"{source} is a {config.model_type!r} model; --vqa loads BLIP VQA models "
                f"(BlipForQuestionAnswering, e.g. {BLIP_VQA_REPO}); for another answerer pass score_dpg a "
                "callable (image, question) -> str"
            )
        model = load_reward_weights(
            BlipForQuestionAnswering.from_pretrained, source, what, BLIP_VQA_REPO, dtype=dtype
        )
        processor = load_reward_weights(
            BlipProcessor.from_pretrained, source, f"{what} processor", BLIP_VQA_REPO
        )
        return cls(model.to(device or default_device()), processor)

    @torch.no_grad()
    def __call__(self, image: Image.Image, question: str) -> str:
        model = self.model
        inputs = self.processor(images=image.convert("RGB"), text=question, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)  # (1, 3, S, S)
        tokens = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return self.processor.decode(tokens[0], skip_special_tokens=True).strip()
