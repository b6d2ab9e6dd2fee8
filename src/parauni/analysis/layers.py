"""Layer analysis of the VLM's query features (paper section 3.1, figures 2, 4, 5; README.md, "Evaluate").

* `LayerProbe`: the model, prompts, rewards and generation options the scored analyses share.
* `per_layer_scores` (fig. 2): condition the DiT on ONE selected layer's ``c_i`` and score the images with
  each reward, layer by layer (the paper's CLIP score rises with depth).
* `layer_similarity` / `suggest_zones` (fig. 4): the inter-layer cosine similarity of the query states and
  the contiguous zones it suggests.
* `zone_sensitivity` (fig. 5): remove one depth zone (shallow / middle / deep) and measure each reward's drop.
* `plot_layer_analysis` and `analyze_layers`: the figures and ``analysis.json`` (``parauni analyze layers``).

Layers are switched on and off through the LIM's per-layer scale (``generate(..., scale_fn=...)``), which
multiplies ``c_i`` before the mean over all L_sel selected layers. A 0/1 mask alone would still divide by
L_sel, so the mask is renormalised: ``scale = mask * L_sel / n_kept`` makes the result the mean over the
KEPT layers (for one kept layer: exactly ``c_i``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.lim import ZONES, zone_layers
from ..models.parauni import ParaUni
from ..pipeline import GenerationOptions, generate
from ..utils.plotting import pyplot

# reward(images (N, 3, H, W) in [-1, 1], prompts, metadata) -> N floats (parauni.rl.rewards.Reward)
RewardFn = Callable[[torch.Tensor, list[str], Sequence[dict | None] | None], list[float]]


# -------------------------------------------------------------------------------------------- layer masks
def kept_layers_scale(num_selected: int, kept: Sequence[int]) -> torch.Tensor:
    """(1, L_sel, 1, 1) scale that turns the LIM's mean into the mean over the `kept` positions.

    `kept`: positions in the LIM's selected layers (0 .. L_sel-1), not VLM layer indices.
    """
    kept = sorted(set(kept))
    if not kept:
        raise ValueError("at least one layer must be kept")
    if kept[0] < 0 or kept[-1] >= num_selected:
        raise ValueError(f"kept positions {kept} do not fit {num_selected} selected layers")
    mask = torch.zeros(num_selected)
    mask[kept] = 1.0
    return (mask * num_selected / len(kept)).view(1, num_selected, 1, 1)


def _positions(model: ParaUni, vlm_layers: Sequence[int]) -> list[int]:
    """Positions in ``model.lim.layer_ids`` of those VLM layers that the LIM uses (others are ignored)."""
    wanted = set(vlm_layers)
    return [p for p, layer in enumerate(model.lim.layer_ids) if layer in wanted]


def default_zones(model: ParaUni) -> dict[str, list[int]]:
    """The shallow / middle / deep VLM layers of the model (``lim.zone_bounds`` scaled to its depth)."""
    bounds = model.config.lim.zone_bounds
    return {z: zone_layers(model.lim.num_vlm_layers, z, bounds) for z in ZONES}


# ----------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class LayerProbe:
    """What the scored analyses generate and score: one image per prompt of `prompts` from `model` with
    `options` (default: ``GenerationOptions()``), each reward's mean over them.

    `metadata`: the prompts' GenEval rows (one per prompt) for the rewards that need them, or None. Every
    call of `mean_scores` uses the same noise seeds, so the scores differ only by the layers kept.
    """

    model: ParaUni
    prompts: list[str]
    metadata: Sequence[dict | None] | None
    rewards: Mapping[str, RewardFn]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    progress: bool = False

    def mean_scores(self, scale: torch.Tensor | None = None) -> dict[str, float]:
        """{reward: mean score} of images generated with the LIM's per-layer `scale` (1, L_sel, 1, 1)
        (`kept_layers_scale`; None: all selected layers)."""
        scale_fn = None if scale is None else (lambda per_layer: scale.to(per_layer))
        images = generate(
            self.model, self.prompts, **self.options.kwargs(), progress=self.progress, scale_fn=scale_fn
        )
        return {
            name: float(np.mean(reward(images, self.prompts, self.metadata)))
            for name, reward in self.rewards.items()
        }


def per_layer_scores(probe: LayerProbe) -> dict[str, list[float]]:
    """Paper fig. 2: {reward: [mean score when conditioned on selected layer i alone, for each i]}.

    Entry i belongs to VLM layer ``probe.model.lim.layer_ids[i]``.
    """
    n = len(probe.model.lim.layer_ids)
    scores: dict[str, list[float]] = {name: [] for name in probe.rewards}
    for i in range(n):
        for name, value in probe.mean_scores(kept_layers_scale(n, [i])).items():
            scores[name].append(value)
    return scores


def zone_sensitivity(probe: LayerProbe, zones: Mapping[str, Sequence[int]] | None = None) -> dict:
    """Paper fig. 5: each reward with all selected layers, and with one zone removed (renormalised).

    Args:
        zones: name -> VLM layer indices (default: `default_zones`). A zone that would remove every selected
            layer is reported under ``skipped`` instead of generated.

    Returns:
        {"all": {reward: mean}, "removed": {zone: {reward: mean}}, "drop": {zone: {reward: all - removed}},
        "zones": {zone: VLM layers}, "skipped": {zone: reason}}; a positive drop means removal hurts.
    """
    model = probe.model
    zones = default_zones(model) if zones is None else zones
    n = len(model.lim.layer_ids)
    full = probe.mean_scores()
    removed, drop, skipped = {}, {}, {}
    for name, layers in zones.items():
        dropped = set(_positions(model, layers))
        kept = [p for p in range(n) if p not in dropped]
        if not kept:
            skipped[name] = f"removing layers {list(layers)} leaves no selected layer"
            continue
        removed[name] = probe.mean_scores(kept_layers_scale(n, kept))
        drop[name] = {r: full[r] - removed[name][r] for r in probe.rewards}
    return {
        "all": full,
        "removed": removed,
        "drop": drop,
        "zones": {k: list(v) for k, v in zones.items()},
        "skipped": skipped,
    }


# ------------------------------------------------------------------------------------------- similarity
@torch.no_grad()
def layer_similarity(model: ParaUni, prompts: list[str], batch_size: int = 8) -> np.ndarray:
    """Paper fig. 4: (L, L) cosine similarity between the query states of every pair of VLM layers.

    Each layer's query states of one prompt are flattened over (Q, D); the cosine is taken per prompt and
    averaged over the prompts.
    """
    if not prompts:
        raise ValueError("layer_similarity needs at least one prompt")
    model.eval()
    total = None
    for start in range(0, len(prompts), batch_size):
        states = model.query_states(model.encode_prompts(list(prompts[start : start + batch_size])))
        b, n_layers = states.shape[:2]
        feats = torch.nn.functional.normalize(states.double().reshape(b, n_layers, -1), dim=-1)  # (B, L, Q*D)
        sim = (feats @ feats.transpose(1, 2)).sum(0)  # (L, L), summed over the batch
        total = sim if total is None else total + sim
    return (total / len(prompts)).cpu().numpy()


def suggest_zones(sim: np.ndarray, n_zones: int = 3) -> list[range]:
    """Split layers 0..L-1 into `n_zones` contiguous zones of mutually similar layers.

    Exact dynamic programme over the boundaries minimising ``sum_zones sum_{i,j in zone} (1 - sim_ij) / |zone|``.
    For unit features with cosine ``sim`` this is the within-zone sum of squared distances to the zone mean
    (k-means restricted to contiguous zones), so zone sizes are not biased towards one large zone.
    """
    sim = np.asarray(sim, dtype=np.float64)
    n = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != n:
        raise ValueError(f"sim must be a square (L, L) matrix, got shape {sim.shape}")
    if not 1 <= n_zones <= n:
        raise ValueError(f"n_zones={n_zones} must be between 1 and the number of layers {n}")
    dis = 1.0 - sim
    # cost[a, b]: cost of the zone a..b-1
    cost = np.full((n + 1, n + 1), np.inf)
    for a in range(n):
        for b in range(a + 1, n + 1):
            cost[a, b] = dis[a:b, a:b].sum() / (b - a)
    best = np.full((n_zones + 1, n + 1), np.inf)  # best[k, b]: layers 0..b-1 in k zones
    arg = np.zeros((n_zones + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, n_zones + 1):
        for b in range(k, n + 1):
            totals = [best[k - 1, a] + cost[a, b] for a in range(k - 1, b)]
            j = int(np.argmin(totals))
            best[k, b], arg[k, b] = totals[j], j + k - 1
    zones, b = [], n
    for k in range(n_zones, 0, -1):
        a = arg[k, b]
        zones.append(range(a, b))
        b = a
    return zones[::-1]


# ------------------------------------------------------------------------------------------------- plots
def plot_layer_analysis(result: dict, out: str | Path) -> dict[str, Path]:
    """Write the figures of an `analyze_layers` result to `out`; returns {figure: path}."""
    plt = pyplot()

    out = Path(out)
    paths = {}

    layers = result["selected_layers"]
    scores = result["per_layer"]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.3), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        ax.plot(layers, values, marker="o")
        full = result["zone_removal"]["all"].get(name)
        if full is not None:
            ax.axhline(full, color="grey", ls="--", lw=1, label="all layers")
            ax.legend(fontsize=7)
        ax.set_title(f"{name}: conditioning on one layer")
        ax.set_xlabel("VLM layer")
        ax.set_ylabel("mean score")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths["per_layer"] = out / "per_layer_scores.png"
    fig.savefig(paths["per_layer"], dpi=110)
    plt.close(fig)

    sim = np.asarray(result["similarity"]["matrix"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(sim, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ticks = range(0, len(sim), max(1, len(sim) // 8))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    for zone in result["similarity"]["suggested_zones"][:-1]:
        edge = zone["last"] + 0.5
        ax.axhline(edge, color="white", lw=1.5)
        ax.axvline(edge, color="white", lw=1.5)
    for layers_ in list(result["zone_removal"]["zones"].values())[:-1]:
        if layers_:
            edge = max(layers_) + 0.5
            ax.axhline(edge, color="red", ls=":", lw=1)
            ax.axvline(edge, color="red", ls=":", lw=1)
    ax.set_title(
        "query-feature cosine similarity\n(white: suggested zones, red dotted: config zones)", fontsize=9
    )
    ax.set_xlabel("VLM layer")
    ax.set_ylabel("VLM layer")
    fig.tight_layout()
    paths["similarity"] = out / "layer_similarity.png"
    fig.savefig(paths["similarity"], dpi=110)
    plt.close(fig)

    drop = result["zone_removal"]["drop"]
    names = list(result["zone_removal"]["all"])
    zones = list(drop)
    fig, ax = plt.subplots(figsize=(1.2 + 1.6 * max(len(zones), 1), 3.3))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        x = np.arange(len(zones)) + (j - (len(names) - 1) / 2) * width
        ax.bar(x, [drop[z][name] for z in zones], width, label=name)
    ax.set_xticks(np.arange(len(zones)), [f"w/o {z}" for z in zones])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("score drop vs all layers")
    ax.set_title("zone removal")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["zone_removal"] = out / "zone_removal.png"
    fig.savefig(paths["zone_removal"], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------- all
def analyze_layers(
    model: ParaUni,
    prompts: list[str],
    metadata: Sequence[dict | None] | None,
    rewards: Mapping[str, RewardFn],
    out: str | Path,
    *,
    n_zones: int = 3,
    options: GenerationOptions | None = None,
    progress: bool = False,
) -> dict:
    """All three analyses; writes ``analysis.json`` and the figures to `out` and returns the numbers.

    `options`: how the images of `per_layer_scores` and `zone_sensitivity` are generated (default:
    ``GenerationOptions()``); its batch size is also `layer_similarity`'s.
    """
    if not rewards:
        raise ValueError("the layer analysis needs at least one reward")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = options or GenerationOptions()
    probe = LayerProbe(model, prompts, metadata, rewards, options, progress)
    sim = layer_similarity(model, prompts, batch_size=options.batch_size)
    result = {
        "num_prompts": len(prompts),
        "seed": options.seed,
        "steps": options.steps,
        "cfg": options.cfg,
        "selected_layers": list(model.lim.layer_ids),
        "per_layer": per_layer_scores(probe),
        "similarity": {
            "matrix": sim.tolist(),
            "suggested_zones": [
                {"first": z.start, "last": z.stop - 1} for z in suggest_zones(sim, min(n_zones, len(sim)))
            ],
        },
        "zone_removal": zone_sensitivity(probe),
    }
    figures = plot_layer_analysis(result, out)
    result["figures"] = {k: str(v) for k, v in figures.items()}
    (out / "analysis.json").write_text(json.dumps(result, indent=2))
    return result


def format_tables(result: dict) -> str:
    """Short text tables of an `analyze_layers` result."""
    names = list(result["per_layer"])
    lines = ["per-layer conditioning (mean score)", f"{'layer':>6}" + "".join(f"{n:>12}" for n in names)]
    for i, layer in enumerate(result["selected_layers"]):
        lines.append(f"{layer:>6}" + "".join(f"{result['per_layer'][n][i]:>12.4f}" for n in names))
    sim = np.asarray(result["similarity"]["matrix"])
    adjacent = np.diagonal(sim, 1)
    zones = ", ".join(f"{z['first']}-{z['last']}" for z in result["similarity"]["suggested_zones"])
    lines += [
        "",
        f"inter-layer similarity: adjacent mean {adjacent.mean() if adjacent.size else 1.0:.4f}, "
        f"overall mean {sim.mean():.4f}; suggested zones {zones}",
        "",
        "zone removal (score; drop vs all layers)",
        f"{'':>14}" + "".join(f"{n:>20}" for n in names),
    ]
    zr = result["zone_removal"]
    lines.append(f"{'all layers':>14}" + "".join(f"{zr['all'][n]:>20.4f}" for n in names))
    for zone, scores in zr["removed"].items():
        cells = "".join(f"{scores[n]:.4f} ({zr['drop'][zone][n]:+.4f})".rjust(20) for n in names)
        lines.append(f"{'w/o ' + zone:>14}" + cells)
    for zone, reason in zr["skipped"].items():
        lines.append(f"{'w/o ' + zone:>14}  skipped: {reason}")
    return "\n".join(lines)
