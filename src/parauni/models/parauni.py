"""The ParaUni model: frozen VLM + learnable queries + Layer Integration Module + SANA DiT (+ DC-AE).

    prompt (+ image) -> VLM with Q queries appended -> query states of every layer (B, L, Q, D)
                     -> LIM: c = mean_i LN(projector(connector(q_i)))  (B, Q, C)
                     -> cross-attention condition of the DiT, which predicts the flow velocity.

Paper section 3; docs/how-it-works.md. The model owns: building from a config (weights, random or meta),
the condition, the velocity, the training loss (``forward``), its optimizer groups, and a strict
``save_pretrained`` / ``from_pretrained`` of what was trained.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import (
    ModelConfig,
    TrainableConfig,
    apply_overrides,
    from_dict,
    list_presets,
    load_model_config,
    load_yaml,
    save_yaml,
    to_dict,
)
from ..diffusion.flow import Distillation, dit_timestep, flow_loss, interpolate
from ..errors import CheckpointError, ConfigError
from ..utils.device import default_device
from ..utils.files import drop_machine_paths, save_safetensors
from ..utils.optim import decay_groups
from ..utils.run_files import CONFIG_FILE, WEIGHTS_FILE
from .components import load_dit, load_vae, load_vlm, portable_path, resolve_path, save_vlm
from .lim import LayerIntegrationModule, select_layers
from .references import check_parts, check_references, record_references
from .vlm import PromptBatch, VLMBackbone

PIPELINE_INDEX = "model_index.json"  # marks a diffusers pipeline folder (parauni.diffusers_pipeline)
CONNECTOR = "connector"  # its subfolder holding the queries + LIM, and the model's config
CONNECTOR_WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINE_PARTS = {"vlm": "vlm", "dit": "transformer", "vae": "vae"}  # each component's subfolder in it


def pipeline_model_config(config: ModelConfig) -> dict:
    """``config`` as a dict whose components point at the subfolders of a diffusers pipeline folder
    (``vlm/``, ``transformer/``, ``vae/``; pixel space keeps no VAE): what the pipeline's connector stores."""
    data = to_dict(config)
    for part, sub in PIPELINE_PARTS.items():
        if part == "vae" and data["vae"]["kind"] == "none":
            continue
        data[part].update(path=sub, arch=None)
        if "subfolder" in data[part]:
            data[part]["subfolder"] = None
    return data


def _pipeline_config(folder: Path, overrides: list[str] | None = None) -> ModelConfig:
    """The :class:`ModelConfig` a diffusers pipeline folder's connector stores, with ``overrides`` applied."""
    where = folder / CONNECTOR / "config.json"
    try:
        data = json.loads(where.read_text())["model_config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{folder} has a {PIPELINE_INDEX} but {where} holds no ParaUni model config ({err}); it is not a "
            "ParaUni pipeline folder: write one with `parauni export --to diffusers`"
        ) from err
    return from_dict(ModelConfig, apply_overrides(data, overrides or [], schema=ModelConfig))


def is_pipeline_folder(folder: Path) -> bool:
    """Whether ``folder`` is a diffusers pipeline folder rather than a model folder (config.yaml)."""
    return (folder / PIPELINE_INDEX).is_file() and not (folder / CONFIG_FILE).is_file()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; CheckpointError naming it when it is missing or damaged."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the model folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for truncated / corrupt files
        raise CheckpointError(
            f"{path} could not be read (truncated or not a safetensors file): {err}"
        ) from err


def _looks_like_path(source: str) -> bool:
    """Whether a --model value is meant as a path (a folder or a YAML file) rather than a preset name."""
    return (
        "/" in source or "\\" in source or source.startswith((".", "~")) or source.endswith((".yaml", ".yml"))
    )


def check_widths(vlm_hidden: int, config: ModelConfig, dit_config, vae_config) -> None:
    """Fail early, with the numbers, when components do not fit together."""
    lim = config.lim
    width = lim.connector_hidden or vlm_hidden
    if lim.use_connector and width % lim.connector_heads:
        raise ConfigError(
            f"connector width {width} is not divisible by lim.connector_heads={lim.connector_heads}; "
            "pick a head count that divides it"
        )
    inner = dit_config.num_attention_heads * dit_config.attention_head_dim
    cross = dit_config.num_cross_attention_heads * dit_config.cross_attention_head_dim
    if not inner == cross == dit_config.cross_attention_dim:
        raise ConfigError(
            f"DiT widths do not agree: heads x head_dim = {inner}, cross heads x cross head_dim = {cross}, "
            f"cross_attention_dim = {dit_config.cross_attention_dim}; all three must be equal"
        )
    channels = 3 if vae_config is None else vae_config.latent_channels
    source = "pixel space (3 channels)" if vae_config is None else f"the VAE's latent_channels={channels}"
    if dit_config.in_channels != channels or (dit_config.out_channels or dit_config.in_channels) != channels:
        raise ConfigError(
            f"DiT in/out channels {dit_config.in_channels}/{dit_config.out_channels} do not match {source}"
        )


def distinct_prompts(batch: PromptBatch) -> tuple[PromptBatch, torch.Tensor]:
    """The distinct rows of a text batch (B, S) -> (U, S), and for each of the B rows its index in them (B,)."""
    key = torch.cat([batch.input_ids, batch.attention_mask.to(batch.input_ids.dtype)], dim=1)  # (B, 2S)
    unique, rows = torch.unique(key, dim=0, return_inverse=True)
    s = batch.input_ids.shape[1]
    return PromptBatch(unique[:, :s], unique[:, s:].to(batch.attention_mask.dtype)), rows


def new_queries_and_lim(
    config: ModelConfig, hidden: int, num_layers: int, caption_channels: int
) -> tuple[nn.Parameter, LayerIntegrationModule]:
    """The learnable queries (Q, D) and the LIM (D -> C) of ``config`` with their seeded initial weights, for a
    VLM of width ``hidden`` (D) and ``num_layers`` decoder layers and a DiT of ``caption_channels`` (C).
    Created on the current default device; the caller forks the RNG."""
    lim = config.lim
    layers = select_layers(num_layers, lim.layers, lim.layer_list, lim.interval, lim.zone_bounds)
    torch.manual_seed(config.seed)
    queries = nn.Parameter(torch.randn(lim.num_queries, hidden) / math.sqrt(hidden))  # (Q, D)
    module = LayerIntegrationModule(
        in_dim=hidden,
        out_dim=caption_channels,
        layers=layers,
        num_vlm_layers=num_layers,
        use_connector=lim.use_connector,
        connector_hidden=lim.connector_hidden,
        connector_intermediate=lim.connector_intermediate,
        connector_layers=lim.connector_layers,
        connector_heads=lim.connector_heads,
        use_layernorm=lim.use_layernorm,
        whiten_queries=lim.num_queries if lim.whiten else 0,
        whiten_floor=lim.whiten_floor,
    )
    return queries, module


class ParaUni(nn.Module):
    """ParaUni: see the module docstring. Build with :meth:`from_config` or :meth:`from_pretrained`.

    ``trained``: existing ``(queries, lim)`` to use (shared, not copied) instead of new ones: a diffusers
    pipeline's connector (:mod:`parauni.diffusers_pipeline`) holds them.
    """

    def __init__(
        self,
        config: ModelConfig,
        vlm: VLMBackbone,
        dit: nn.Module,
        vae: nn.Module | None,
        trained: tuple[nn.Parameter, LayerIntegrationModule] | None = None,
    ) -> None:
        super().__init__()
        check_widths(vlm.hidden_size, config, dit.config, None if vae is None else vae.config)
        self.config = config
        self.vlm = vlm
        self.dit = dit
        self.vae = vae
        if trained is None:
            with torch.random.fork_rng(devices=[]), torch.device(next(dit.parameters()).device):
                trained = new_queries_and_lim(
                    config, vlm.hidden_size, vlm.num_layers, dit.config.caption_channels
                )
        self.queries, self.lim = trained
        self.set_trainable(config.trainable)

    # ---------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: ModelConfig, root: str | Path | None = None, meta: bool = False) -> ParaUni:
        """Build every component from ``config`` (weights from paths; arch dicts give random or meta ones)."""
        config = copy.deepcopy(config)
        vlm = load_vlm(config.vlm, root, meta=meta, seed=config.seed)
        dit = load_dit(config.dit, root, meta=meta, seed=config.seed + 1)
        vae = load_vae(config.vae, root, meta=meta, seed=config.seed + 2)
        if not meta:
            # Record where components really came from, so a later save refers to them correctly.
            for part in (config.vlm, config.dit, config.vae):
                if getattr(part, "path", None):
                    part.path = resolve_path(part.path, root)
        return cls(config, vlm, dit, vae)

    def set_trainable(self, trainable: TrainableConfig) -> None:
        """Apply what trains (queries, LIM, DiT full or LoRA); the VLM and VAE are always frozen."""
        self.config.trainable = trainable
        self.vlm.requires_grad_(False)
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.queries.requires_grad_(trainable.queries)
        self.lim.requires_grad_(trainable.lim)
        if trainable.dit_lora_rank > 0 and not self.has_lora:
            from peft import LoraConfig

            with torch.random.fork_rng(devices=[]):  # LoRA's gaussian init is seeded like every new parameter
                torch.manual_seed(self.config.seed + 3)
                self.dit.add_adapter(
                    LoraConfig(
                        r=trainable.dit_lora_rank,
                        lora_alpha=trainable.dit_lora_alpha,
                        target_modules=list(trainable.dit_lora_targets),
                        init_lora_weights="gaussian",
                    )
                )
        self.dit.requires_grad_(trainable.dit)
        for name, p in self.dit.named_parameters():
            if "lora_" in name:
                p.requires_grad_(trainable.dit_lora_rank > 0)

    @property
    def has_lora(self) -> bool:
        return any("lora_" in n for n, _ in self.dit.named_parameters())

    def train(self, mode: bool = True) -> ParaUni:
        super().train(mode)
        self.vlm.train(False)
        if self.vae is not None:
            self.vae.train(False)
        return self

    # ---------------------------------------------------------------------------------------- geometry
    @property
    def device(self) -> torch.device:
        return self.queries.device

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (the VAE's spatial compression, 1 in pixel space)."""
        return 1 if self.vae is None else self.vae.spatial_compression_ratio

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor x DiT patch size."""
        return self.latent_factor * self.dit.config.patch_size

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the valid sizes when (height, width) does not fit the VAE and DiT."""
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < m or value % m:
                lo = max(m, (int(value) // m) * m) if isinstance(value, (int, float)) else m
                raise ConfigError(
                    f"{name}={value} does not fit this model: sides must be positive multiples of {m} "
                    f"(VAE factor {self.latent_factor} x DiT patch {self.dit.config.patch_size}), e.g. {lo} or {lo + m}"
                )

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the DiT's input for an image of height x width."""
        self.check_size(height, width)
        f = self.latent_factor
        return self.dit.config.in_channels, height // f, width // f

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> DiT input space (B, C, H/f, W/f)."""
        if self.vae is None:
            return pixels
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent
        return z * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> pixels (B, 3, H, W), clamped to [-1, 1]."""
        if self.vae is None:
            return latents.float().clamp(-1, 1)
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return x.float().clamp(-1, 1)

    # ---------------------------------------------------------------------------------------- condition
    def encode_prompts(self, captions: list[str | None], images: torch.Tensor | None = None) -> PromptBatch:
        """Tokenised prompts on the model's device (``None`` caption = unconditional template)."""
        return self.vlm.encode_prompts(captions, images).to(self.device)

    def query_states(self, batch: PromptBatch) -> torch.Tensor:
        """(B, L, Q, D) query states of every VLM layer; the VLM graph is kept only if the queries train.

        A text batch goes through the VLM once per distinct prompt (captions repeat in small data sets, and
        every unconditional row of a CFG batch is the same), then is gathered back to its B rows.
        """
        if batch.pixel_values is not None:
            return self._vlm_query_states(batch)
        unique, rows = distinct_prompts(batch)
        return self._vlm_query_states(unique)[rows]

    def _vlm_query_states(self, batch: PromptBatch) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.queries.requires_grad):
            return self.vlm.query_states(batch, self.queries)

    @torch.no_grad()
    def fit_whitening(self, captions: list[str], batch_size: int = 64) -> None:
        """Estimate ``lim.whiten``'s statistics from the query states of ``captions`` (with the queries as
        they are now); see :meth:`LayerIntegrationModule.fit_whitening`."""
        states = torch.cat(
            [
                self.query_states(self.encode_prompts(captions[i : i + batch_size]))
                for i in range(0, len(captions), batch_size)
            ]
        )
        self.lim.fit_whitening(states)

    def per_layer_conditions(self, batch: PromptBatch) -> torch.Tensor:
        """(B, L_sel, Q, C): the LIM's output for each selected layer, before the mean (LDAM perturbs these)."""
        return self.lim.per_layer(self.query_states(batch))

    def condition(
        self, batch: PromptBatch, scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, Q, C) cross-attention condition: the mean over layers of :meth:`per_layer_conditions`.

        ``scale_fn(per_layer (B, L_sel, Q, C)) -> scale`` multiplies the per-layer conditions before the mean
        (layer analyses, the last-layer view of ``parauni serve``); Stage III scales cached per-layer
        conditions the same way, through the one aggregation :meth:`LayerIntegrationModule.aggregate`.
        Without ``scale_fn`` a text batch goes through the VLM and the LIM once per distinct prompt.
        """
        if scale_fn is not None:
            per_layer = self.per_layer_conditions(batch)
            return self.lim.aggregate(per_layer, scale_fn(per_layer))
        if batch.pixel_values is None:
            unique, rows = distinct_prompts(batch)
            return self.lim(self._vlm_query_states(unique))[rows]
        return self.lim(self.query_states(batch))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Flow velocity v(x_t, t | cond). x_t: (B, C, h, w); t: (B,) in [0, 1]; cond: (B, Q, C')."""
        dtype = self.dit.dtype
        return self.dit(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond.to(dtype),
            timestep=dit_timestep(t, self.dit.config.get("timestep_scale", 1.0)),
            return_dict=False,
        )[0]

    def forward(
        self,
        batch: PromptBatch,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        distill: Distillation | None = None,
        flow_weight: float = 1.0,
    ) -> torch.Tensor:
        """The training loss for clean inputs x0 (B, C, h, w) at times t (B,): ``flow_weight`` x the flow loss.

        ``distill``: the condition-distillation term against the DiT's own pretraining text encoder on the
        same captions (``train.condition_distill``); its captions may extend the batch past the B images (the
        binding twins of ``train.distill_twins``), whose rows take no part in the flow loss. With
        ``flow_weight=0`` the DiT is not run at all.
        """
        cond = self.condition(batch)  # (B', Q, C), B' >= B
        loss = cond.new_zeros((), dtype=torch.float32)
        if flow_weight > 0:
            n = x0.shape[0]
            loss = flow_weight * flow_loss(self.velocity(interpolate(x0, noise, t), t, cond[:n]), x0, noise)
        if distill is not None and distill.weight > 0:
            loss = loss + distill.loss(cond)
        return loss

    # ---------------------------------------------------------------------------------------- training
    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups of the trained parameters: weight decay on matrices (and the queries), none on 1-D ones."""
        return decay_groups(self.parameters(), weight_decay)

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """Per component: trainable and frozen parameter counts (shared tensors counted once)."""
        parts = {"vlm": self.vlm, "queries": None, "lim": self.lim, "dit": self.dit, "vae": self.vae}
        out = {}
        for name, module in parts.items():
            params = (
                [self.queries] if name == "queries" else ([] if module is None else list(module.parameters()))
            )
            out[name] = {
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "frozen": sum(p.numel() for p in params if not p.requires_grad),
            }
        return out

    # ---------------------------------------------------------------------------------------- checkpoints
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What ParaUni adds to its components: queries, the LIM and, if used, the DiT's LoRA weights."""
        sd = {"queries": self.queries}
        sd.update({f"lim.{k}": v for k, v in self.lim.state_dict().items()})
        if self.has_lora:
            sd.update({f"dit.{k}": v for k, v in self.dit.state_dict().items() if "lora_" in k})
        return {k: v.detach() for k, v in sd.items()}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strict load of :meth:`trained_state_dict`: missing, unexpected or mis-shaped keys are errors."""
        expected = self.trained_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{source} does not match the model built from its config: missing keys {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; unexpected keys {unexpected[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        for key, value in expected.items():
            if tuple(state[key].shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(state[key].shape)} but the model expects {tuple(value.shape)}"
                )
        with torch.no_grad():
            self.queries.copy_(state["queries"])
        self.lim.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("lim.")}, strict=True)
        lora = {k[4:]: v for k, v in state.items() if k.startswith("dit.")}
        if lora:
            result = self.dit.load_state_dict(lora, strict=False)
            if result.unexpected_keys:
                raise CheckpointError(
                    f"{source}: DiT LoRA keys not in the model: {result.unexpected_keys[:8]}"
                )

    def _base_dit(self) -> nn.Module:
        """The DiT without LoRA layers (a copy when LoRA is attached), for saving as a diffusers folder."""
        if not self.has_lora:
            return self.dit
        base = type(self.dit).from_config(self.dit.config)
        state = {
            k.replace(".base_layer", ""): v for k, v in self.dit.state_dict().items() if "lora_" not in k
        }
        base.load_state_dict(state, strict=True)
        return base

    def save_pretrained(self, folder: str | Path, copy_frozen: bool = False) -> Path:
        """Write ``config.yaml`` + ``model.safetensors`` (what was trained) to ``folder``.

        A fully trained DiT is written as a diffusers folder ``transformer/``. Frozen components are referred
        to by Hugging Face id or by path relative to ``folder``, those outside it pinned by the sha256 of their
        files in ``components.json`` (:mod:`.references`); they are copied in (``vlm/``, ``transformer/``,
        ``vae/``) when ``copy_frozen`` or when they have no path (built from an arch dict).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        if copy_frozen or config.vlm.path is None:
            save_vlm(self.vlm, folder / "vlm")
            config.vlm.path = "vlm"
        if config.trainable.dit or copy_frozen or config.dit.path is None:
            self._base_dit().save_pretrained(folder / "transformer")
            config.dit.path, config.dit.subfolder = "transformer", None
        if self.vae is not None and (copy_frozen or config.vae.path is None):
            self.vae.save_pretrained(folder / "vae")
            config.vae.path, config.vae.subfolder = "vae", None
        for part in (config.vlm, config.dit, config.vae):
            if part.path:
                part.path = portable_path(part.path, folder)
        tensors = {k: v.contiguous().cpu() for k, v in self.trained_state_dict().items()}
        save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt", "parauni": "1"})
        save_yaml(config, folder / CONFIG_FILE)
        drop_machine_paths(folder)
        record_references(config, folder)
        return folder

    @classmethod
    def load_config(cls, source: str | Path, overrides: list[str] | None = None) -> ModelConfig:
        """The :class:`ModelConfig` of a model folder (its config.yaml) or a preset name / YAML file, with the
        overrides applied; no component is built."""
        overrides = overrides or []
        path = Path(source).expanduser()
        if not path.exists() and _looks_like_path(str(source)):
            raise ConfigError(
                f"--model {source}: the folder does not exist; give a model folder (config.yaml + weights), "
                f"a YAML file or a preset name ({', '.join(list_presets())})"
            )
        if path.is_dir():
            if is_pipeline_folder(path):
                return _pipeline_config(path, overrides)
            if not (path / CONFIG_FILE).is_file():
                raise ConfigError(f"{path} has no {CONFIG_FILE}; it is not a ParaUni model folder")
            return from_dict(
                ModelConfig, apply_overrides(load_yaml(path / CONFIG_FILE), overrides, schema=ModelConfig)
            )
        return load_model_config(str(source), overrides)

    @classmethod
    def load(
        cls,
        source: str | Path,
        overrides: list[str] | None = None,
        meta: bool = False,
        device: str | torch.device | None = None,
    ) -> ParaUni:
        """A model from a model folder (config.yaml + weights: :meth:`from_pretrained`) or a preset name / YAML
        file (random weights: :meth:`from_config`), on ``device`` (default: :func:`default_device`, which reads
        ``$PARAUNI_DEVICE``). ``meta=True`` builds the structure only, on the meta device, without weights."""
        path = Path(source).expanduser()
        if path.is_dir() and not meta:
            model = cls.from_pretrained(path, overrides)
        else:
            config = cls.load_config(source, overrides)
            model = cls.from_config(config, root=path if path.is_dir() else None, meta=meta)
        return model if meta else model.to(device or default_device())

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: list[str] | None = None) -> ParaUni:
        """Load a folder written by :meth:`save_pretrained` (strict), or a diffusers pipeline folder written by
        ``ParaUniPipeline.save_pretrained`` / ``parauni export --to diffusers``."""
        folder = Path(folder)
        if is_pipeline_folder(folder):
            return cls._from_pipeline_folder(folder, overrides)
        if not (folder / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{folder} is not a ParaUni model folder: {CONFIG_FILE} is missing "
                "(expected config.yaml + model.safetensors written by save_pretrained / parauni train)"
            )
        if not (folder / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"{folder / WEIGHTS_FILE} is missing; the model folder is incomplete")
        check_references(folder)
        data = apply_overrides(load_yaml(folder / CONFIG_FILE), overrides or [], schema=ModelConfig)
        config = from_dict(ModelConfig, data)
        check_parts(folder, config)
        state = _read_weights(folder / WEIGHTS_FILE)
        model = cls.from_config(config, root=folder)
        model.load_trained_state_dict(state, source=str(folder / WEIGHTS_FILE))
        return model

    @classmethod
    def _from_pipeline_folder(cls, folder: Path, overrides: list[str] | None = None) -> ParaUni:
        """Load a diffusers pipeline folder: its components' subfolders and the connector's queries + LIM."""
        config = _pipeline_config(folder, overrides)
        check_parts(folder, config)
        vlm = load_vlm(config.vlm, folder, seed=config.seed, preprocessing=folder)
        dit = load_dit(config.dit, folder, seed=config.seed + 1)
        vae = load_vae(config.vae, folder, seed=config.seed + 2)
        model = cls(config, vlm, dit, vae)
        weights = folder / CONNECTOR / CONNECTOR_WEIGHTS
        model.load_trained_state_dict(_read_weights(weights), source=str(weights))
        return model
