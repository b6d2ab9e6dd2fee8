"""ParaUni: all-layer VLM conditioning of a diffusion transformer.

The public API, for use from Python::

    import parauni

    model = parauni.ParaUni.load("parauni-demo/stage3")  # a model folder, a preset name or a YAML file
    images = parauni.generate(model, ["a red circle left of a blue square"], steps=20, seed=0)
    parauni.tensor_to_pil(images[0]).save("x.png")  # images: (N, 3, H, W) in [-1, 1]

* :class:`ParaUni` (``load``, ``from_pretrained``, ``save_pretrained``) and :func:`generate`;
* the configs: :class:`ModelConfig` (and :func:`load_model_config` for presets), :class:`TrainConfig`,
  :class:`RLConfig`, :class:`RewardsConfig`, :class:`LDAMConfig`, :class:`WorldConfig`;
* :class:`ParaUniError`, the base of every error that names a user's mistake (:mod:`parauni.errors`).

The names load on first use: ``import parauni`` itself does not import torch (about 10 s on a busy CPU), so
the command line's ``--help`` and a script that only reads a config stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ParaUniError

if TYPE_CHECKING:
    from .config import ModelConfig, load_model_config
    from .diffusers_pipeline import ParaUniConnector, ParaUniPipeline
    from .models.parauni import ParaUni
    from .pipeline import generate
    from .rl.config import RewardsConfig, RLConfig
    from .rl.ldam import LDAMConfig
    from .training.config import TrainConfig
    from .utils.images import tensor_to_pil
    from .world.config import WorldConfig

# public name -> the module that defines it
_LAZY = {
    "ParaUni": "parauni.models.parauni",
    "ParaUniPipeline": "parauni.diffusers_pipeline",
    "ParaUniConnector": "parauni.diffusers_pipeline",
    "generate": "parauni.pipeline",
    "tensor_to_pil": "parauni.utils.images",
    "ModelConfig": "parauni.config",
    "load_model_config": "parauni.config",
    "TrainConfig": "parauni.training.config",
    "RLConfig": "parauni.rl.config",
    "RewardsConfig": "parauni.rl.config",
    "LDAMConfig": "parauni.rl.ldam",
    "WorldConfig": "parauni.world.config",
}

__all__ = [
    "LDAMConfig",
    "ModelConfig",
    "ParaUni",
    "ParaUniConnector",
    "ParaUniError",
    "ParaUniPipeline",
    "RLConfig",
    "RewardsConfig",
    "TrainConfig",
    "WorldConfig",
    "generate",
    "load_model_config",
    "tensor_to_pil",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'parauni' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
