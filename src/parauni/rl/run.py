"""Stage III as the library runs it for its callers: :func:`run_rl` (a model, its reward models, prompts and an
RL config; the shapes world and ``parauni rl`` both call it), the merge of an RL run's configs
(:func:`rl_configs`) and the reward function of a set of reward models (:func:`reward_fn`).
"""

from __future__ import annotations

from pathlib import Path

from ..config import apply_overrides, from_dict, load_yaml
from ..errors import ConfigError
from ..training.run import RunOptions
from .config import RewardsConfig, RLConfig
from .grpo import RewardFn, RLResult, train_rl
from .prompts import Prompts
from .rewards import CombinedReward


def rl_configs(
    rl: dict, rewards: dict, config_file: str | None, rl_items: list[str], reward_items: list[str]
) -> tuple[RLConfig, RewardsConfig]:
    """The run's RL and rewards configs: the defaults ``rl`` and ``rewards`` (dicts), under the YAML
    ``config_file``'s ``rl`` and ``rewards`` sections, under the overrides (``key=value``)."""
    if config_file:
        data = load_yaml(config_file)
        unknown = sorted(set(data) - {"rl", "rewards"})
        if unknown:
            raise ConfigError(
                f"{config_file}: unknown section(s) {unknown}; an RL config has 'rl' and 'rewards'"
            )
        rl = {**rl, **data.get("rl", {})}
        rewards = {**rewards, **data.get("rewards", {})}
    rl_cfg = from_dict(RLConfig, apply_overrides(rl, rl_items), prefix="rl.")
    rewards_cfg = from_dict(RewardsConfig, apply_overrides(rewards, reward_items), prefix="rewards.")
    return rl_cfg, rewards_cfg


def reward_fn(rewards: dict) -> RewardFn:
    """The reward function of Stage III over the reward models ``rewards`` (name -> model): every one's score
    of the images."""
    combined = CombinedReward(rewards, {name: 1.0 for name in rewards})

    def score(images, prompts, metadata):
        return combined(images, prompts, metadata)[1]

    return score


def run_rl(
    model,
    rewards: dict,
    prompts: Prompts,
    config: RLConfig,
    out: str | Path,
    options: RunOptions | None = None,
) -> RLResult:
    """Stage III of ``model`` (a Stage-II ParaUni) with the reward models ``rewards`` (name -> model) on
    ``prompts`` into the model folder ``out``; with ``options.self_contained`` the frozen parts the policy refers
    to are copied into it (``RLResult.copied``)."""
    from ..models.references import copy_in

    options = options or RunOptions()
    result = train_rl(
        model,
        reward_fn(rewards),
        list(rewards),
        prompts,
        config,
        out,
        resume=options.resume,
        progress=options.progress,
        log=options.log,
    )
    if options.self_contained:
        result.copied = copy_in(Path(out))
    return result
