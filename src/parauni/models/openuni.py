"""Import of OpenUni / official-ParaUni training checkpoints into a ParaUni model folder.

Their ``.pth`` state dicts hold ``meta_queries`` (Q, D), ``connector.*`` (same module names as our
connector), ``projector.*`` (a Linear, or a pair ``projector.0`` / ``projector.1`` in the proj-enc-proj
layout), ``agglayer_norm.*`` (ParaUni's shared LayerNorm, absent in OpenUni) and, after Stage II,
``transformer.*`` (the SANA DiT in diffusers naming). An OpenUni checkpoint becomes the last-layer baseline
(``lim.layers=last``, no LayerNorm); a ParaUni one uses all layers with the LayerNorm. The file is read with
``torch.load(weights_only=True)``: nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .parauni import ParaUni

FROZEN_PREFIXES = ("lmm.", "vae.", "llm.")


@dataclass
class ConvertedCheckpoint:
    """An OpenUni state dict split into ParaUni's trained part, the DiT, and what was left out."""

    trained: dict[str, torch.Tensor]
    dit: dict[str, torch.Tensor]
    has_layernorm: bool
    ignored: list[str] = field(default_factory=list)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict safely, unwrapping ``state_dict`` / ``module`` containers and prefixes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated / non-tensor pickles
        raise CheckpointError(
            f"{path} could not be read as a tensor state dict with weights_only=True (truncated, or it holds "
            f"arbitrary Python objects, which are refused): {err}"
        ) from err
    for key in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_openuni_state_dict(state: dict[str, torch.Tensor]) -> ConvertedCheckpoint:
    """Map OpenUni / ParaUni keys to ours; unknown keys are an error naming them."""
    if "meta_queries" not in state:
        raise CheckpointError("not an OpenUni / ParaUni checkpoint: the key 'meta_queries' is missing")
    trained: dict[str, torch.Tensor] = {"queries": state["meta_queries"]}
    dit: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    two_projectors = any(k.startswith("projector.1.") for k in state)
    for key, value in state.items():
        if key == "meta_queries":
            continue
        if key.startswith("connector."):
            trained["lim." + key] = value
        elif key.startswith("projector."):
            if two_projectors:
                index, rest = key[len("projector.") :].split(".", 1)
                trained[("lim.connector_in." if index == "0" else "lim.projector.") + rest] = value
            else:
                trained["lim." + key] = value
        elif key.startswith("agglayer_norm."):
            trained["lim.norm." + key[len("agglayer_norm.") :]] = value
        elif key.startswith("transformer."):
            dit[key[len("transformer.") :]] = value
        elif key.startswith(FROZEN_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint keys with no place in ParaUni: {sorted(unknown)[:10]}")
    has_ln = any(k.startswith("lim.norm.") for k in trained)
    return ConvertedCheckpoint(trained, dit, has_ln, ignored)


def import_openuni(
    path: str | Path, config: ModelConfig, out: str | Path, layers: str | None = None
) -> ParaUni:
    """Build the model of ``config`` (components from their paths), load the checkpoint strictly, save to ``out``.

    ``layers`` overrides the layer selection (default: ``all`` for a ParaUni checkpoint with its LayerNorm,
    ``last`` for an OpenUni one).
    """
    conv = convert_openuni_state_dict(read_checkpoint(path))
    config = copy.deepcopy(config)
    config.lim.use_layernorm = conv.has_layernorm
    config.lim.layers = layers or ("all" if conv.has_layernorm else "last")
    config.lim.num_queries = conv.trained["queries"].shape[0]
    config.lim.connector_layers = len(
        {k.split(".")[3] for k in conv.trained if k.startswith("lim.connector.layers.")}
    )
    config.lim.use_connector = config.lim.connector_layers > 0
    if config.lim.use_connector:
        fc1 = conv.trained["lim.connector.layers.0.mlp.fc1.weight"]  # (intermediate, width)
        config.lim.connector_intermediate, config.lim.connector_hidden = fc1.shape
    config.trainable.dit = bool(conv.dit)
    model = ParaUni.from_config(config)
    model.load_trained_state_dict(conv.trained, source=str(path))
    if conv.dit:
        result = model.dit.load_state_dict(conv.dit, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"{path}: transformer.* does not match the DiT of the config: missing {result.missing_keys[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )
    model.save_pretrained(out)
    return model
