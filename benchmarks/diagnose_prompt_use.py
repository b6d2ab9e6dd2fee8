"""Does a trained ParaUni model use its prompt? Relative spreads across prompts that differ in content.

    python benchmarks/diagnose_prompt_use.py --model parauni-demo/stage1 parauni-demo/stage2 [--prompts ...]

For each model it prints, per VLM layer, how much the query states differ across the prompts, then the
LIM's condition, the DiT's velocity for one shared noise image, and the velocity against the unconditional
prompt's (see `parauni.analysis.prompt_use`). A condition spread near 0 with a clearly non-zero
prompt-vs-unconditional figure is a LIM that has learnt "there is a prompt" but not which one.
"""

from __future__ import annotations

import argparse

from parauni.analysis.prompt_use import DEFAULT_PROMPTS, format_sensitivity, prompt_sensitivity
from parauni.models.parauni import ParaUni


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", required=True, help="ParaUni run / model folders")
    parser.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--t", type=float, default=0.8, help="flow time of the velocity (1 = noise)")
    args = parser.parse_args()
    for folder in args.model:
        model = ParaUni.from_pretrained(folder)
        print(f"== {folder}")
        print(format_sensitivity(prompt_sensitivity(model, args.prompts, t=args.t)))
        del model


if __name__ == "__main__":
    main()
