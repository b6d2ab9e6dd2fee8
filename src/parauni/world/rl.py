"""Stage III on the shapes world: RL + LDAM with the world's rewards, sized for a CPU.

The curriculum mirrors the paper's: first the world aesthetic score (LDAM on the middle zone, as for
Aesthetic and PickScore), then the world CLIP score together with ShapesEval partial credit (the deep zone, as
for CLIP score), each reward with its own LDAM; its objective is DiffusionNFT's by default and the paper's
Flow-GRPO with ``world.rl_recipe=paper`` (:mod:`parauni.world.config`). :func:`world_geneval_rl` is Stage III
with the ShapesEval credit alone (Flow-GRPO's GenEval task), the recipe ``benchmarks/bench_rl.py --mode
geneval`` runs. Prompts are drawn from the world's GenEval-format prompt generator, so the GenEval reward has
its metadata.

LDAM's gates: the paper's constants almost never fire within the world's short phases, so the world uses a
looser setting of the same dual gate per round: the reward fell this round (drop streak >= 1) and the gradient
norm is above the mean of the 3 rounds before it, cooling 3 rounds. Its firing rates, replayed by
``benchmarks/bench_rl.py --gate-rates``, are in docs/world.md ("Measurements moved out of the code").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import TrainableConfig
from ..errors import ConfigError
from ..rl.config import PhaseConfig, RewardsConfig, RLConfig
from ..rl.prompts import PromptItem, PromptSource
from ..rl.rewards import build_rewards
from ..rl.run import rl_configs, run_rl
from ..scoring.geneval_rules import GENEVAL_TAGS
from ..training.run import RunOptions
from ..training.run_folder import command_line, write_run_record
from .captions import metadata_for
from .config import world_paper_rl
from .reward_models import world_rewards


def world_geneval_rl(base: RLConfig) -> RLConfig:
    """Stage III with ShapesEval's partial credit alone (Flow-GRPO's GenEval task on the world): ``base`` (the
    world's RL config) with one ``geneval`` phase and the cheapest setting per sample of those measured
    (docs/world.md, "Stage III on the world"): the whole DiT (the paper's table) at lr 3e-4, 32 prompts x 4 images
    an epoch in one on-policy update, the first half of the steps trained (the last steps carry most of the
    gradient's norm and little of the layout the credit scores), no KL term, LDAM off, 18 epochs. Its measured
    effect and cost are in the docs."""
    paper = world_paper_rl()
    return replace(
        base,
        phases=[PhaseConfig("geneval", {"geneval": 1.0}, epochs=18, zone="deep", beta=0.0)],
        objective=paper.objective,  # Flow-GRPO's SDE rollouts, whichever objective the base has
        eta=paper.eta,
        group_size=paper.group_size,
        trainable=TrainableConfig(queries=False, lim=False, dit=True, dit_lora_rank=0),
        prompts_per_epoch=32,
        micro_batch=32,
        lr=3e-4,
        lr_schedule="constant",
        updates_per_epoch=1,
        timestep_fraction=0.5,
        ema=0.0,
        ldam=replace(base.ldam, enabled=False),
    )


def world_nft_rl(base: RLConfig) -> RLConfig:
    """:func:`world_geneval_rl` with DiffusionNFT's objective in place of Flow-GRPO's (``rl.objective=nft``, not
    in the paper): deterministic Euler rollouts (ShapesEval samples deterministically too, with DPM-Solver++),
    32 prompts x 8 images an epoch, each image trained at 4 random times of the schedule, lr 3e-4 (as the
    Flow-GRPO recipe), 24 epochs. Its measured effect and cost are in docs/world.md ("Stage III on the
    world")."""
    return replace(
        world_geneval_rl(base),
        phases=[PhaseConfig("geneval", {"geneval": 1.0}, epochs=24, zone="deep", beta=0.0)],
        objective="nft",
        eta=0.0,
        group_size=8,
        timestep_fraction=0.4,
    )


RECIPES: dict[str, Callable[[RLConfig], RLConfig]] = {
    "demo": lambda base: base,  # world.rl: the nft curriculum, or the paper's with --world.rl_recipe=paper
    "geneval": world_geneval_rl,
    "nft": world_nft_rl,
}
"""The world's Stage-III recipes by name, each made from the world's RL config: the demo's curriculum, the
ShapesEval credit with Flow-GRPO, and the credit with DiffusionNFT."""


class WorldPromptSource:
    """Endless GenEval-format prompts of the shapes world, drawn uniformly over the six tags or over the phase's
    ``tags`` (a :class:`parauni.rl.prompts.Prompts`)."""

    def epoch(self, seed: int, epoch: int, n: int, tags: Sequence[str] = ()) -> list[PromptItem]:
        """``n`` (prompt, metadata row) items for ``epoch``, the same for the same seed and tags."""
        rng = np.random.default_rng([seed, epoch, 11])
        pool = tuple(tags) or GENEVAL_TAGS
        rows = [metadata_for(pool[int(rng.integers(len(pool)))], rng) for _ in range(n)]
        return [(r["prompt"], r) for r in rows]


def run_world_rl(
    model,
    cfg: RLConfig,
    stage0: Path,
    out_dir: Path,
    progress: bool = True,
    resume: bool = False,
    log=print,
):
    """Stage III of ``model`` (a world Stage-II ParaUni) with the world's rewards (the world config's ``rl``,
    :func:`parauni.world.config.world_rl_defaults`); returns the RLResult."""
    options = RunOptions(resume=resume, progress=progress, log=log)
    return run_rl(model, world_rewards(stage0), WorldPromptSource(), cfg, out_dir, options)


# ------------------------------------------------------------------------------------------------ parauni rl
DEMO_STAGE2 = "parauni-demo/stage2"  # where `parauni demo` (default --out) writes its Stage-II model


@dataclass
class RLRequest:
    """A Stage-III run as ``parauni rl`` asks for it: on the user's prompts and rewards, or (``world``) on the
    shapes world's, with its defaults."""

    out: str  # the run folder
    model: str | None = None  # the Stage-II model folder (with world: default parauni demo's)
    config: str | None = None  # a YAML file with 'rl' (RLConfig) and 'rewards' (RewardsConfig) sections
    prompts: str | None = None  # .txt (one a line) or GenEval-style .jsonl
    world: bool = False  # the shapes world's prompts, rewards and RL defaults
    stage0: str = "release"  # with world: the Stage-0 models ('release', 'scratch', a folder or Hub id)
    cache: str | None = None  # with world: the scratch Stage-0 cache (implies stage0='scratch')
    rl_overrides: list[str] = field(default_factory=list)  # RL config overrides, key=value
    reward_overrides: list[str] = field(default_factory=list)  # rewards config overrides, key=value
    model_overrides: list[str] = field(default_factory=list)  # model config overrides, --section.key=value
    world_overrides: list[str] = field(default_factory=list)  # with world: world config overrides, key=value


def _defaults(request: RLRequest, log) -> tuple[dict, dict, str | None]:
    """The RL and rewards config defaults (the library's, or the world's) and the model folder."""
    if not request.world:
        if request.world_overrides:
            raise ConfigError(f"--world.* overrides {request.world_overrides} need --world")
        return dataclasses.asdict(RLConfig()), {}, request.model
    from .release import existing_stage0

    wcfg, stage0 = existing_stage0(
        "scratch" if request.cache else request.stage0, request.cache, request.world_overrides
    )
    model_dir = request.model
    if not model_dir:  # parauni demo's Stage-II model, in the working directory
        model_dir = DEMO_STAGE2
        if not Path(model_dir).is_dir():
            raise ConfigError(
                f"--world without --model trains {model_dir} (parauni demo's Stage-II model, relative to the "
                f"working directory {Path.cwd()}), which does not exist; run `parauni demo` here first or "
                "give --model DIR"
            )
        log(f"RL on {Path(model_dir).resolve()} (parauni demo's Stage-II model; --model DIR for another)")
    return dataclasses.asdict(wcfg.rl), {"world": str(stage0)}, model_dir


def _rewards(cfg: RewardsConfig) -> dict:
    """The reward models of ``cfg`` by name (the world's when ``cfg.world`` names a Stage-0 folder)."""
    shapes = world_rewards(cfg.world, batch_size=cfg.batch_size) if cfg.world else {}
    return build_rewards(cfg, shapes)


def _record(request: RLRequest, result, rewards: dict) -> None:
    """The run record of a finished ``parauni rl`` (its final rewards, data and command)."""
    last = result.history[-1]
    rewards_now = {
        k[len("reward_") :]: v for k, v in last.items() if k.startswith("reward_") and not k.endswith("_std")
    }
    record = {"stage": 3, "unit": "RL epochs", "steps": len(result.history), "final_rewards": rewards_now}
    record["data"] = f"RL prompts from {request.prompts or 'the shapes world'}; rewards {sorted(rewards)}"
    write_run_record(Path(request.out), {**record, "command": command_line(), "settings": {}})


def run_rl_request(request: RLRequest, options: RunOptions, check_out: Callable[[], None] | None = None):
    """``parauni rl``: ``check_out()`` (the caller's check of the run folder), the configs (defaults, then the
    YAML, then the overrides), the prompts, the model and the rewards, then :func:`parauni.rl.run.run_rl` and
    the run record. Returns the RLResult."""
    from ..models.parauni import ParaUni

    if check_out is not None:
        check_out()
    rl_dict, rewards_dict, model_dir = _defaults(request, options.log)
    if not model_dir:
        raise ConfigError("parauni rl needs --model DIR (a Stage-II model folder), or --world")
    config, rewards_cfg = rl_configs(
        rl_dict, rewards_dict, request.config, request.rl_overrides, request.reward_overrides
    )
    if request.prompts:
        prompts = PromptSource.from_file(request.prompts)
    elif request.world:
        prompts = WorldPromptSource()
    else:
        raise ConfigError("parauni rl needs --prompts FILE (.txt or GenEval-style .jsonl), or --world")
    model = ParaUni.load(model_dir, request.model_overrides)
    rewards = _rewards(rewards_cfg)
    options.log(
        f"RL: {config.total_epochs} epochs over phases "
        + ", ".join(f"{p.name} ({p.epochs} epochs, {p.rewards}, zone {p.zone})" for p in config.phases)
        + f"; rewards available: {sorted(rewards)}"
    )
    result = run_rl(model, rewards, prompts, config, request.out, options)
    _record(request, result, rewards)
    return result
