"""Plots of RL runs: each reward per epoch, raw and EMA-smoothed, LDAM triggers marked (paper supp. figs 1-3)."""

from __future__ import annotations

import json
from pathlib import Path

from ..utils.plotting import pyplot


def read_log(path: str | Path) -> list[dict]:
    """The rows of an ``rl_log.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def ema(values: list[float], rate: float = 0.1) -> list[float]:
    """Exponential moving average ``s_t = (1 - rate) s_{t-1} + rate x_t`` (s_0 = x_0): the paper's smoothing
    rate 0.1 read as the weight of the newest value."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else (1 - rate) * out[-1] + rate * v)
    return out


def phase_ends(epochs: list, n: int = 2) -> tuple[list, list]:
    """A phase's first and last ``n`` epochs, or its first and last ``len // 2`` (at least 1) when it has fewer
    than ``2 n``, so that the two never share an epoch (a one-epoch phase: the same one twice)."""
    k = max(1, min(n, len(epochs) // 2))
    return epochs[:k], epochs[-k:]


def phase_gains(rows: list[dict], n: int = 2) -> dict[str, tuple[float, float]]:
    """Per curriculum phase: (mean of its optimised reward over its first epochs, over its last), as
    :func:`phase_ends` picks them."""
    out = {}
    for phase in dict.fromkeys(r["phase"] for r in rows):
        first, last = phase_ends([r["phase_reward"] for r in rows if r["phase"] == phase], n)
        out[phase] = (sum(first) / len(first), sum(last) / len(last))
    return out


def paired_rise(start: dict, end: dict, name: str) -> dict:
    """Reward ``name`` from held-out evaluation row ``start`` to row ``end`` (``rl_eval.jsonl``: the same prompts
    and noise, :mod:`parauni.rl.evaluate`): their ``start`` and ``end`` means and ``se``, the standard error of
    the mean per-prompt difference (NaN for one prompt), with ``paired`` set; :func:`rise_verdict` reads it."""
    a, b = start[f"prompt_means_{name}"], end[f"prompt_means_{name}"]
    if len(a) != len(b):
        raise ValueError(
            f"evaluations of {len(a)} and {len(b)} prompts cannot be paired: they must be one run's held-out set"
        )
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    se = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5 if len(d) > 1 else float("nan")
    return {"start": start[f"reward_{name}"], "end": end[f"reward_{name}"], "se": se, "paired": True}


def reward_rises(
    rows: list[dict], phase_rewards: dict[str, list[str]], n: int = 2, evals: list[dict] | None = None
) -> dict[str, dict[str, dict]]:
    """Per phase, per reward it optimises (``phase_rewards``: phase name -> reward names): ``start``, ``end`` and
    ``se``, the standard error of ``end - start``.

    With held-out evaluations (``evals``, the rows of ``rl_eval.jsonl``) at the phase's start and end: the two
    evaluations, paired prompt by prompt (:func:`paired_rise`). Otherwise from the training log: the mean of the
    reward's epoch means over the phase's first and last ``n`` epochs, ``se`` from the epochs'
    :func:`standard_errors` (NaN when the log lacks them); each epoch draws new prompts, so their differences
    carry the prompts' spread. A phase of fewer than ``2 n`` epochs compares its first and last ``epochs // 2``
    (at least 1), so the two means share none. Either way a rise is beyond its noise when ``end - start > 2
    se`` (:func:`rise_verdict`)."""
    at = {e["epochs_done"]: e for e in evals or []}
    out: dict[str, dict[str, dict]] = {}
    for phase, names in phase_rewards.items():
        keyed = [r for r in rows if r.get("phase") == phase]
        if not keyed:
            continue
        first, last = phase_ends(keyed, n)
        out[phase] = {}
        e0, e1 = (at.get(keyed[0]["epoch"]), at.get(keyed[-1]["epoch"] + 1)) if at else (None, None)
        for name in names:
            if e0 is not None and e1 is not None and f"prompt_means_{name}" in e0:
                out[phase][name] = paired_rise(e0, e1, name)
                continue
            errors = standard_errors(first + last, name)
            se = float("nan")
            if errors is not None:
                a, b = errors[: len(first)], errors[len(first) :]
                se = (sum(e * e for e in a) / len(a) ** 2 + sum(e * e for e in b) / len(b) ** 2) ** 0.5
            out[phase][name] = {
                "start": sum(r[f"reward_{name}"] for r in first) / len(first),
                "end": sum(r[f"reward_{name}"] for r in last) / len(last),
                "se": se,
            }
    return out


def rise_basis(rises: dict[str, dict[str, dict]]) -> str:
    """How :func:`reward_rises` compared each phase's start and end, in words for logs and reports."""
    paired = [r.get("paired", False) for v in rises.values() for r in v.values()]
    if paired and all(paired):
        return "the held-out prompts at the phase's start and end, paired by prompt"
    if any(paired):
        return "the held-out prompts where evaluated, else the first 2 vs last 2 epochs of the phase"
    return "the first 2 vs last 2 epochs of the phase (first vs last for a phase under 4 epochs)"


def rise_verdict(rise: dict[str, float], sigmas: float = 2.0) -> str:
    """``'rose'`` (end - start above ``sigmas`` standard errors), ``'within noise'`` or ``'fell'`` (below minus
    ``sigmas`` of them), for one entry of :func:`reward_rises`."""
    diff, se = rise["end"] - rise["start"], rise["se"]
    if se != se:  # NaN: no standard errors logged, so no noise to judge against
        return "rose (noise unknown)" if diff > 0 else "fell (noise unknown)"
    return "rose" if diff > sigmas * se else "fell" if diff < -sigmas * se else "within noise"


def trigger_summary(rows: list[dict]) -> str:
    """The LDAM triggers of a log, e.g. ``'3 (middle at epochs 4, 9; deep at 17)'``, or ``'0'``."""
    by_zone: dict[str, list[int]] = {}
    for r in rows:
        if r.get("ldam_triggered"):
            by_zone.setdefault(r.get("ldam_zone") or "?", []).append(r["epoch"])
    n = sum(len(v) for v in by_zone.values())
    if not n:
        return "0"
    parts = [f"{z} at epoch{'s' if len(e) > 1 else ''} {', '.join(map(str, e))}" for z, e in by_zone.items()]
    return f"{n} ({'; '.join(parts)})"


def reward_names(rows: list[dict]) -> list[str]:
    """Reward names logged in ``rows`` (keys ``reward_<name>``, without their ``_std`` companions)."""
    names = {
        k[len("reward_") :] for r in rows for k in r if k.startswith("reward_") and not k.endswith("_std")
    }
    return sorted(names)


def standard_errors(rows: list[dict], name: str) -> list[float] | None:
    """The standard error of reward ``name``'s epoch mean in each row that logs it: ``se_reward_<name>`` (over the
    epoch's prompts, each prompt's group one unit) where logged, else ``std / sqrt(samples)`` (logs written before
    it, which treat a group's images as independent and so understate it); None when the log has neither."""
    keyed = [r for r in rows if f"reward_{name}" in r]
    if all(f"se_reward_{name}" in r for r in keyed):
        return [r[f"se_reward_{name}"] for r in keyed]
    if not all(f"reward_{name}_std" in r and r.get("samples") for r in keyed):
        return None
    return [r[f"reward_{name}_std"] / r["samples"] ** 0.5 for r in keyed]


def plot_reward_curves(
    runs: dict[str, list[dict]],
    out: str | Path,
    rate: float = 0.1,
    evals: dict[str, list[dict]] | None = None,
) -> Path:
    """One panel per reward: every run's raw curve (thin) with a band of +-1 standard error of each epoch mean
    (where the log has the per-epoch std and sample count) and its EMA (thick); triangles labelled with the
    perturbed zone mark LDAM triggers (rows whose ``ldam_triggered`` is set, after that epoch's update) and
    dotted lines the starts of curriculum phases. ``runs``: label -> log rows (e.g. LDAM on / off); ``evals``:
    label -> held-out evaluation rows (``rl_eval.jsonl``), drawn as squares with +-1 standard error bars between
    the epochs they follow and precede."""
    plt = pyplot()

    names = sorted({n for rows in runs.values() for n in reward_names(rows)})
    if not names:
        raise ValueError("the RL logs hold no reward_<name> columns to plot")
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for i, (label, rows) in enumerate(runs.items()):
            pts = [(r["epoch"], r[f"reward_{name}"]) for r in rows if f"reward_{name}" in r]
            if not pts:
                continue
            x, y = zip(*pts, strict=True)
            color = f"C{i}"
            se = standard_errors(rows, name)
            if se is not None:  # +-1 standard error of each epoch mean
                ax.fill_between(x, [a - e for a, e in zip(y, se, strict=True)],
                                [a + e for a, e in zip(y, se, strict=True)], color=color, alpha=0.15, lw=0)  # fmt: skip
            ax.plot(x, y, color=color, alpha=0.3, lw=1)
            ax.plot(x, ema(list(y), rate), color=color, lw=2, label=f"{label} (EMA {rate})")
            trig = [
                (r["epoch"], r[f"reward_{name}"], r.get("ldam_zone", ""))
                for r in rows
                if r.get("ldam_triggered")
            ]
            for x_t, y_t, zone in trig:  # each trigger: a triangle labelled with the zone it perturbed
                ax.scatter([x_t], [y_t], marker="^", color=color, s=30, zorder=3)
                ax.annotate(zone or "LDAM", (x_t, y_t), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=6, color=color)  # fmt: skip
            held = [e for e in (evals or {}).get(label, []) if f"reward_{name}" in e]
            if held:  # the held-out set after e epochs: between epoch e - 1 and epoch e
                ax.errorbar([e["epochs_done"] - 0.5 for e in held], [e[f"reward_{name}"] for e in held],
                            yerr=[e[f"se_reward_{name}"] for e in held], fmt="s", ms=4, color=color, mfc="white",
                            capsize=2, zorder=4, label=f"{label} held-out")  # fmt: skip
        first = next(iter(runs.values()))
        starts = [
            r["epoch"]
            for a, r in zip([None] + first[:-1], first, strict=True)
            if a and a["phase"] != r["phase"]
        ]
        for s in starts:
            ax.axvline(s - 0.5, color="grey", ls=":", lw=1)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("reward (epoch mean)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
