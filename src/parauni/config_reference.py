"""The configuration reference (``docs/configuration.md``), generated from the config dataclasses.

    python -m parauni.config_reference > docs/configuration.md

Every field of every config tree, with its override key, type, default and help text. A field without help
text (many of the world's model sizes and schedules) is described from its name (:func:`implied_help`:
``text_heads`` -> "attention heads (text encoder)"). A test checks that the committed page equals what this
module prints, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import sys

from .config import ModelConfig
from .rl.config import RewardsConfig, RLConfig
from .training.config import TrainConfig
from .world.config import WorldConfig

# (title, override prefix, dataclass, where it is used)
TREES = (
    (
        "Model",
        "",
        ModelConfig,
        "presets (`parauni info paper`), model folders' `config.yaml`; every command that takes `--model` "
        "accepts `--section.key=value`",
    ),
    ("Training (Stages I and II)", "train.", TrainConfig, "`parauni train --train.key=value`"),
    ("Reinforcement learning (Stage III)", "rl.", RLConfig, "`parauni rl --rl.key=value` or `--config FILE`"),
    ("Rewards", "rewards.", RewardsConfig, "`parauni rl --rewards.key=value`"),
    (
        "The shapes world",
        "world.",
        WorldConfig,
        "`parauni demo` / `parauni reproduce` / `parauni rl --world` with `--world.key=value`; `world.parauni` "
        "extends the model's `lim` section and `world.eval` its `sampling` section (the world's ParaUni model "
        "takes them as they are); the `image_size` of `world.t2i.train`, `world.parauni.stage1` and `stage2`, "
        "`world.eval.height` / `width` are always `world.image_size`, and `world.t2i.text_tokens` is "
        "`world.parauni.num_queries` (or 0): giving one another value is an error",
    ),
)


# What a field name means when its dataclass gives no help: the name's last part ...
NAME_MEANINGS = {
    "layers": "number of layers",
    "heads": "attention heads",
    "kv_heads": "key/value heads (grouped-query attention)",
    "hidden": "width",
    "intermediate": "MLP width",
    "mlp_ratio": "MLP width as a multiple of the model width",
    "latent_channels": "latent channels",
    "projection_dim": "width of the shared image-text embedding",
    "steps": "training steps",
    "batch_size": "examples per step",
    "lr": "peak learning rate",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas",
    "grad_clip": "max gradient norm (0 = off)",
    "dropout": "dropout probability",
    "enabled": "train and use this component (false: see the section's description)",
    "timestep_sampling": "how training times are drawn (as train.timestep_sampling)",
    "per_tag": "prompts per GenEval tag",
    "images_per_prompt": "images per prompt",
    "cfg": "classifier-free guidance scale",
    "sampler": "'dpm' (DPM-Solver++) or 'euler'",
    "prompts_per_epoch": "prompts per RL epoch",
    "group_size": "images per prompt (the GRPO group)",
    "micro_batch": "samples per forward/backward (per process)",
    "seed": "random seed",
}
# ... and whose part it is, from the name's first part.
NAME_OWNERS = {
    "text": "text encoder",
    "vision": "vision tower",
    "dit": "DiT",
    "connector": "LIM connector",
    "aesthetic": "aesthetic head",
    "stage1": "Stage I",
    "stage2": "Stage II",
}


def implied_help(name: str) -> str:
    """A description of a config field from its name alone, or "" when the name says nothing known."""
    owner, _, rest = name.partition("_")
    if owner in NAME_OWNERS and rest in NAME_MEANINGS:
        return f"{NAME_MEANINGS[rest]} ({NAME_OWNERS[owner]})"
    return NAME_MEANINGS.get(name, "")


def _field_default(f: dataclasses.Field, instance: object | None):
    """The field's default: its value in ``instance`` (a parent's default section) when given."""
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _default(value) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = repr(value).replace("\n", "\\n")
    if len(text) > 60:
        text = text[:57] + "..."
    return f"`{text}`".replace("|", "\\|")


def _summary(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring, on one line."""
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())


def _rows(cls: type, prefix: str, instance: object | None = None) -> list[str]:
    """The table rows of ``cls``'s fields; a nested section shows the defaults its parent gives it (e.g.
    ``rl.trainable`` is a ``TrainableConfig`` whose RL defaults differ from the class's own)."""
    rows, sections = [], []
    for f in dataclasses.fields(cls):
        default = _field_default(f, instance)
        if dataclasses.is_dataclass(default):
            sections.append((f.name, f, default))
            continue
        if isinstance(default, list) and default and all(dataclasses.is_dataclass(x) for x in default):
            # a list of sections (rl.phases): one section per item, keyed as its override is (rl.phases.0.epochs)
            help_text = f.metadata.get("help") or implied_help(f.name)
            sections += [(f"{f.name}.{i}", f, item) for i, item in enumerate(default)]
            rows.append(f"| `{prefix}{f.name}` | `{f.type}` | {len(default)} item(s), below | {help_text} |")
            continue
        help_text = (f.metadata.get("help") or implied_help(f.name)).replace("|", "\\|")
        kind = str(f.type).replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{kind}` | {_default(default)} | {help_text} |")
    for key, f, sub in sections:
        # a section is described by its field's help, else (and a list item always) by its class's summary
        doc = (f.metadata.get("help") if key == f.name else None) or _summary(type(sub))
        rows.append(f"| **`{prefix}{key}.*`** | section | | {doc.replace('|', chr(92) + '|')} |")
        rows += _rows(type(sub), f"{prefix}{key}.", sub)
    return rows


def reference_markdown() -> str:
    """The whole reference page as Markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m parauni.config_reference`; do not edit by hand.",
        "Override any field on the command line as `--key=value` with the key shown (lists as `[1,2]`,",
        "booleans as `true`/`false`, `null` for none). Unknown keys are errors that name the valid ones.",
        "",
    ]
    for title, prefix, cls, where in TREES:
        doc = " ".join((cls.__doc__ or "").split())
        lines += [f"## {title}", "", f"{doc} Used by {where}.", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _rows(cls, prefix)
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
