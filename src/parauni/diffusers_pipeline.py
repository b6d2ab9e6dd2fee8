"""ParaUni as a ``diffusers.DiffusionPipeline``: ``pipe(prompt).images``, ``model_index.json`` folders, any dtype.

Components (each saved in its own subfolder by ``save_pretrained``):

* ``vlm`` + ``tokenizer`` (+ ``image_processor`` for Qwen2.5-VL / Janus): the frozen VLM, a ``transformers`` model;
* ``connector``: :class:`ParaUniConnector`, the learnable queries (Q, D) and the Layer Integration Module, a
  diffusers ``ModelMixin`` whose config also holds the model's :class:`~parauni.config.ModelConfig`;
* ``transformer``: the SANA DiT (a DiT LoRA is merged into it); ``vae``: the DC-AE, or None in pixel space;
* ``scheduler``: SANA's DPM-Solver++ (``FlowMatchEulerDiscreteScheduler`` for a model that samples with Euler).

``__call__`` runs the steps of :func:`parauni.pipeline.generate` with the same code: (1) the one request
validator (:func:`~parauni.pipeline.check_request`), (2) conditions from the VLM + LIM, (3) noise (one
``generator`` per image gives ``generate``'s seeds), (4) the one denoising loop
(:func:`~parauni.diffusion.sampling.denoise`) with CFG through the pipeline's scheduler, (5) decode. With the
default DPM-Solver++ scheduler the images equal ``generate``'s exactly (tested); a swapped scheduler is
stepped the same way (docs/real-models.md, "Use it from diffusers").
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    ConfigMixin,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
)
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from .config import ModelConfig, from_dict
from .diffusion.sampling import SchedulerStep, StepOutput, denoise, dpm_solver_scheduler, guided_velocity
from .errors import ConfigError
from .models.parauni import (
    ParaUni,
    is_pipeline_folder,
    new_queries_and_lim,
    pipeline_model_config,
)
from .models.vlm import BACKBONES
from .pipeline import Request, check_finite_samples, check_memory, check_request
from .utils.images import pil_to_tensor, resize_center_crop, tensor_to_pil
from .utils.run_files import CONFIG_FILE

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
ImageInput = Image.Image | list[Image.Image] | torch.Tensor


class ParaUniConnector(ModelMixin, ConfigMixin):
    """The learnable queries and the LIM, saved and loaded like any diffusers model.

    Args:
        model_config: the ParaUni :class:`~parauni.config.ModelConfig` as a dict (components pointing at the
            pipeline folder's subfolders, :func:`~parauni.models.parauni.pipeline_model_config`).
        vlm_hidden_size / vlm_num_layers: the VLM's width D and decoder depth L.
        caption_channels: the DiT's condition width C.
    """

    @register_to_config
    def __init__(self, model_config: dict, vlm_hidden_size: int, vlm_num_layers: int, caption_channels: int):
        super().__init__()
        config = from_dict(ModelConfig, copy.deepcopy(dict(model_config)))
        with torch.random.fork_rng(devices=[]):
            self.queries, self.lim = new_queries_and_lim(
                config, vlm_hidden_size, vlm_num_layers, caption_channels
            )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Query states (B, L, Q, D) -> the DiT's condition (B, Q, C)."""
        return self.lim(states)


def default_scheduler(config: ModelConfig):
    """The scheduler that samples as ``config.sampling`` does: DPM-Solver++ (``generate``'s exact one) or
    ``FlowMatchEulerDiscreteScheduler`` at the model's shift for an Euler model."""
    s = config.sampling
    if s.sampler == "dpm":
        return dpm_solver_scheduler(s.shift)
    return FlowMatchEulerDiscreteScheduler(shift=s.shift)


def _merged_dit(model: ParaUni) -> nn.Module:
    """The model's DiT with its LoRA (if any) merged into a copy of the weights."""
    if not model.has_lora:
        return model.dit
    dit = copy.deepcopy(model.dit)
    dit.fuse_lora()
    dit.unload_lora()
    return dit


def _onload(module: nn.Module | None) -> None:
    """Move a CPU-offloaded component to the execution device before a call that bypasses its ``forward`` (the
    VLM's decoder is called directly), as diffusers' own ``apply_forward_hook`` does for ``vae.decode``."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(module)


class ParaUniPipeline(DiffusionPipeline):
    """ParaUni text-to-image (and image-to-image reconstruction) as a diffusers pipeline.

    Build it with :meth:`from_pretrained` (a pipeline folder, a Hub id, or a ParaUni model folder) or
    :meth:`from_parauni` (a loaded :class:`~parauni.models.parauni.ParaUni`).
    """

    model_cpu_offload_seq = "vlm->transformer->vae"
    _optional_components = ["vae", "image_processor"]
    _exclude_from_cpu_offload = ["connector"]  # the queries are an input of the VLM: both run together
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vlm: nn.Module,
        tokenizer,
        connector: ParaUniConnector,
        transformer: nn.Module,
        scheduler,
        vae: nn.Module | None = None,
        image_processor=None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vlm=vlm,
            tokenizer=tokenizer,
            connector=connector,
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            image_processor=image_processor,
        )

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_parauni(cls, model: ParaUni, scheduler=None) -> ParaUniPipeline:
        """A pipeline sharing ``model``'s components (a DiT LoRA merged into a copy) and a copy of its queries
        and LIM; ``scheduler`` defaults to :func:`default_scheduler`."""
        data = pipeline_model_config(model.config)
        data["trainable"]["dit_lora_rank"] = 0  # merged into the transformer
        connector = ParaUniConnector(
            model_config=data,
            vlm_hidden_size=model.vlm.hidden_size,
            vlm_num_layers=model.vlm.num_layers,
            caption_channels=model.dit.config.caption_channels,
        )
        connector.load_state_dict(
            {k: v for k, v in model.trained_state_dict().items() if not k.startswith("dit.")}, strict=True
        )
        connector.to(model.device)
        if model.queries.dtype != connector.dtype:
            connector.to(dtype=model.queries.dtype)
        return cls(
            vlm=model.vlm.model,
            tokenizer=model.vlm.tokenizer,
            connector=connector,
            transformer=_merged_dit(model),
            scheduler=scheduler or default_scheduler(model.config),
            vae=model.vae,
            image_processor=getattr(model.vlm, "image_processor", None),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> ParaUniPipeline:
        """diffusers' ``from_pretrained`` (a pipeline folder or Hub id, ``torch_dtype``, ``variant``, ...), and
        also a ParaUni model folder (``config.yaml``: ``parauni train`` / ``parauni demo`` stages), which is
        loaded with :meth:`ParaUni.from_pretrained` and converted (``torch_dtype`` applies; nothing else does)."""
        folder = Path(pretrained_model_name_or_path).expanduser()
        if (folder / CONFIG_FILE).is_file() and not is_pipeline_folder(folder):
            unknown = sorted(set(kwargs) - {"torch_dtype"})
            if unknown:
                raise ConfigError(
                    f"{folder} is a ParaUni model folder: only torch_dtype applies to it, not {unknown}; export "
                    "it first (`parauni export --to diffusers`) to load it with diffusers' options"
                )
            pipe = cls.from_parauni(ParaUni.from_pretrained(folder))
            dtype = kwargs.get("torch_dtype")
            return pipe if dtype is None else pipe.to(dtype=dtype)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def parauni(self) -> ParaUni:
        """The components as a :class:`ParaUni` (shared, nothing copied), whose code the pipeline runs."""
        config = from_dict(ModelConfig, copy.deepcopy(dict(self.connector.config.model_config)))
        kind = BACKBONES[config.vlm.kind]
        extra = {} if self.image_processor is None else {"image_processor": self.image_processor}
        backbone = kind(self.vlm, self.tokenizer, config.vlm, **extra)
        trained = (self.connector.queries, self.connector.lim)
        return ParaUni(config, backbone, self.transformer, self.vae, trained=trained).eval()

    # ------------------------------------------------------------------------------------------ checks
    def _sampler_of(self, model: ParaUni) -> tuple[str, float]:
        """The validator's (sampler, shift) for the pipeline's scheduler: 'dpm' checks DPM-Solver++'s bound."""
        if isinstance(self.scheduler, DPMSolverMultistepScheduler):
            return "dpm", float(self.scheduler.config.flow_shift or model.config.sampling.shift)
        return "euler", float(self.scheduler.config.get("shift", model.config.sampling.shift))

    @staticmethod
    def _check_call(
        output_type: str,
        num_images_per_prompt: int,
        callback_on_step_end,
        tensor_inputs: list[str],
    ) -> None:
        """The arguments :func:`check_request` does not know; ConfigError naming the value and the fix."""
        if output_type not in OUTPUT_TYPES:
            raise ConfigError(f"output_type={output_type!r} is not one of {list(OUTPUT_TYPES)}")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_images_per_prompt={n!r} must be an integer >= 1")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ConfigError(
                f"callback_on_step_end={callback_on_step_end!r} is not callable; give a function "
                "(pipe, step, timestep, callback_kwargs) -> callback_kwargs"
            )
        wrong = [k for k in tensor_inputs if k not in ParaUniPipeline._callback_tensor_inputs]
        if wrong:
            raise ConfigError(
                f"callback_on_step_end_tensor_inputs {wrong} are not available; choose from "
                f"{ParaUniPipeline._callback_tensor_inputs}"
            )

    @staticmethod
    def _images_tensor(image: ImageInput, height: int, width: int) -> torch.Tensor:
        """``image`` as (N, 3, height, width) in [-1, 1]: PIL images resized and centre-cropped as
        ``parauni generate --image`` does; a tensor must already be (N, 3, H, W) in [-1, 1]."""
        if isinstance(image, torch.Tensor):
            return image
        images = image if isinstance(image, (list, tuple)) else [image]
        if not images or not all(isinstance(i, Image.Image) for i in images):
            raise ConfigError(
                f"image must be a PIL image, a list of them or a (N, 3, H, W) tensor in [-1, 1], got "
                f"{type(image).__name__}"
            )
        return torch.stack(
            [pil_to_tensor(resize_center_crop(i.convert("RGB"), height, width)) for i in images]
        )

    @staticmethod
    def _generators(generator, n: int) -> torch.Generator | list[torch.Generator] | None:
        """``generator`` checked: None, one generator (the whole batch drawn from it) or one per image."""
        if isinstance(generator, (list, tuple)) and len(generator) != n:
            raise ConfigError(
                f"{len(generator)} generators for {n} images; give one generator per image "
                "(len(prompt) x num_images_per_prompt) or a single one"
            )
        return list(generator) if isinstance(generator, (list, tuple)) else generator

    # ------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            prompt: a caption or a list (text-to-image); leave None with ``image``.
            negative_prompt: caption(s) of the unconditional branch of CFG; None: the model's unconditional
                template, as ``parauni.generate``.
            image: image-to-image (reconstruction): PIL image(s) or a (N, 3, H, W) tensor in [-1, 1].
            num_inference_steps / guidance_scale / height / width: None takes the model's ``sampling`` value.
            generator: one ``torch.Generator`` per image gives image i the noise of
                ``torch.Generator().manual_seed(seed + i)``, which is ``parauni.generate(seed=seed)``'s.
            output_type: "pil", "np" ((N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W) in [0, 1]) or "latent"
                (the DiT's (N, C, h, w) samples).
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after every step; a
                returned "latents" replaces the current sample.

        Returns:
            :class:`ImagePipelineOutput` (``.images``), or the tuple ``(images,)`` when ``return_dict`` is False.
        """
        tensor_inputs = list(callback_on_step_end_tensor_inputs or ["latents"])
        self._check_call(output_type, num_images_per_prompt, callback_on_step_end, tensor_inputs)
        model = self.parauni
        s = model.config.sampling
        height = s.height if height is None else height
        width = s.width if width is None else width
        per = num_images_per_prompt
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if isinstance(prompts, (list, tuple)):  # anything else is check_request's to refuse
            prompts = [p for p in prompts for _ in range(per)]
        images = None if image is None else self._images_tensor(image, height, width)
        if isinstance(images, torch.Tensor):
            images = images.repeat_interleave(per, dim=0)
        sampler, shift = self._sampler_of(model)
        request = check_request(
            model,
            prompts,
            images,
            steps=num_inference_steps,
            cfg=guidance_scale,
            sampler=sampler,
            shift=shift,
            height=height,
            width=width,
        )
        generators = self._generators(generator, request.n)
        negatives = self._negatives(negative_prompt, request.n // per, per)
        check_memory(model, request.height, request.width, request.n, request.cfg)
        device = self._execution_device

        cond, uncond = self._conditions(model, request, images, negatives)
        latents = randn_tensor((request.n, *request.shape), generator=generators, device=device)
        step = SchedulerStep(self.scheduler, request.steps, device)
        velocity = guided_velocity(model.velocity, cond.to(device), uncond.to(device), request.cfg)
        latents = denoise(
            velocity, latents, step.sigmas, self._stepper(step, callback_on_step_end, tensor_inputs)
        )
        check_finite_samples(latents, "sampled latents", request.cfg, 0)
        images_out = self._postprocess(model, latents, output_type, request.cfg)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images_out) if return_dict else (images_out,)

    def _conditions(
        self, model: ParaUni, request: Request, images: torch.Tensor | None, negatives: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG pair (N, Q, C) x 2 from the VLM with the queries, then the LIM; the unconditional branch is
        the model's template (``generate``'s) or the negative captions."""
        _onload(self.vlm)
        if images is None:
            cond = model.condition(model.encode_prompts(request.prompts))
        else:
            cond = model.condition(model.encode_prompts([None] * request.n, images=images))
        uncond = model.condition(model.encode_prompts(negatives or [None]))
        return cond, (uncond.expand_as(cond) if negatives is None else uncond)

    @staticmethod
    def _negatives(negative_prompt, count: int, per_prompt: int) -> list[str] | None:
        """One negative caption per image, from one or one per prompt / input image (None: the model's
        unconditional template)."""
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) == 1:
            negatives = negatives * count
        if len(negatives) != count or not all(isinstance(t, str) for t in negatives):
            raise ConfigError(
                f"negative_prompt has {len(negatives)} entries for {count} prompt(s); give one string or one "
                "per prompt"
            )
        return [t for t in negatives for _ in range(per_prompt)]

    def _stepper(self, step: SchedulerStep, callback, tensor_inputs: list[str]):
        """The scheduler's step with the progress bar and ``callback_on_step_end`` after each step."""
        total = len(step.sigmas) - 1
        bar = self.progress_bar(total=total)
        index = 0

        def fn(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> StepOutput:
            nonlocal index
            t = self.scheduler.timesteps[index]
            out = step(x, v, sigma, sigma_next)
            if callback is not None:
                given = callback(self, index, t, {k: out.sample for k in tensor_inputs}) or {}
                out = StepOutput(given.get("latents", out.sample))
            index += 1
            bar.update()
            if index == total:
                bar.close()
            return out

        return fn

    @staticmethod
    def _postprocess(model: ParaUni, latents: torch.Tensor, output_type: str, cfg: float):
        """Latents (N, C, h, w) -> the requested output; pixels exactly as ``generate`` decodes them."""
        if output_type == "latent":
            return latents
        _onload(model.vae)
        pixels = model.decode_latents(latents).cpu()  # (N, 3, H, W) in [-1, 1]
        check_finite_samples(pixels, "decoded pixels", cfg, 0)
        if output_type == "pil":
            return [tensor_to_pil(x) for x in pixels]
        unit = (pixels + 1) / 2  # [0, 1], diffusers' convention for "pt" and "np"
        return unit if output_type == "pt" else np.ascontiguousarray(unit.permute(0, 2, 3, 1).numpy())
