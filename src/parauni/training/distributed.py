"""What differs between the ``accelerate`` backends the loops run under: one process, DDP, FSDP2, DeepSpeed ZeRO-2.

The loops of Stages I/II (``trainer.py``) and III (``rl/grpo.py``) read the same on every backend; the
differences live here (configs in ``configs/accelerate/``):

* DDP: every process holds the whole model and the whole optimizer state; gradients are all-reduced.
* FSDP2 (``fully_shard``): parameters, gradients and optimizer state are sharded over the processes. Every
  parameter is a ``DTensor`` sharded on its own, so frozen and trainable parameters share a unit (FSDP1 would
  need ``use_orig_params``). The units are the layer classes the model's Hugging Face / diffusers components
  declare indivisible (``_no_split_modules``: the VLM's decoder and vision layers, the DiT's blocks), set here
  when the config names none; the rest (queries, LIM, embeddings) is the root unit. The frozen VAE is left
  out of sharding (it encodes outside the training forward). Parameters are whole only inside a forward, and
  the first forward must go through the root: Stage III therefore runs its sampling and reference policy
  as forwards of :class:`ModelCalls` (:func:`outside_training`).
* DeepSpeed ZeRO-2: optimizer state and gradients are sharded, parameters are whole on every process. The
  engine takes the optimizer step inside ``backward`` at the accumulation boundary, clips the gradient norm
  itself and skips a step whose gradient norm is not finite; the micro-batch, accumulation and clipping it
  uses are the loop's (:func:`configure_deepspeed`).

Checkpoints hold the same files on every backend except the optimizer state: the trained tensors are gathered
whole (FSDP: ``DTensor.full_tensor``; DeepSpeed: the fp32 master weights) and written by the main process;
the optimizer state is one ``optimizer.pt`` (DDP: ``optimizer.state_dict()``; FSDP: the full state dict keyed
by parameter name, loadable on any number of processes) or, under DeepSpeed, the engine's own checkpoint in
``deepspeed/`` (one optimizer shard per process: resume with the same number of processes). A sharded run's
final model folder is written by :func:`save_model` from a plain copy of the model, so it is the usual
``save_pretrained`` folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import CheckpointError, ConfigError
from ..utils.files import apply_umask

OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"  # the engine's checkpoint folder inside a step / epoch checkpoint
CONFIGS = "configs/accelerate/ddp.yaml, fsdp.yaml or deepspeed_zero2.yaml"


def _kind(acc) -> str:
    """'fsdp', 'deepspeed' or 'plain' (one process, DDP or multi-CPU: whole parameters, torch optimizer)."""
    from accelerate.utils import DistributedType

    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(
        acc.distributed_type, "plain"
    )


def is_sharded(acc) -> bool:
    """True under FSDP and DeepSpeed, where the optimizer state (FSDP: also the parameters) is sharded."""
    return _kind(acc) != "plain"


def check_backend(acc, entry: str, model: nn.Module) -> None:
    """Refuse, naming the fix, the backends and settings the loops do not support.

    Supported: one process, DDP, FSDP2 and DeepSpeed ZeRO stage 2. ZeRO-3 shards the parameters outside any
    forward hook the loops can see (use FSDP to shard them); Megatron-LM needs a model split by hand.
    """
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.MEGATRON_LM:
        raise ConfigError(
            f"{entry} does not run under Megatron-LM (it needs a tensor-parallel model split by hand); "
            f"launch with {CONFIGS}"
        )
    if kind == DistributedType.FSDP and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            f"{entry} runs FSDP2 (fully_shard) only, not FSDP1: set fsdp_version: 2 in the accelerate config, "
            "as configs/accelerate/fsdp.yaml does"
        )
    if kind == DistributedType.DEEPSPEED:
        stage = acc.state.deepspeed_plugin.zero_stage
        if stage != 2:
            raise ConfigError(
                f"{entry} runs DeepSpeed ZeRO stage 2 only, not stage {stage}: stage 3 shards the parameters, "
                "which Stage III's sampling and the checkpoints need whole. Use "
                "configs/accelerate/deepspeed_zero2.yaml, or configs/accelerate/fsdp.yaml to shard parameters"
            )
    if is_sharded(acc) and not hasattr(type(model), "from_config"):
        raise ConfigError(
            f"{entry} under {kind.value} writes its final model from a copy built with "
            f"{type(model).__name__}.from_config(config), which does not exist; launch it with "
            "configs/accelerate/ddp.yaml"
        )


def prepare(acc, module: nn.Module, optimizer, model: nn.Module):
    """``accelerator.prepare(module, optimizer)``, where ``module`` is ``model`` or ``ModelCalls(model)``.

    FSDP: the units are the layer classes the components declare indivisible (unless the config names
    classes), the frozen VAE stays whole (it encodes images outside the training forward), and every unit, the
    root too, reshards after its forward: outside a forward every parameter is its shard, so an in-place change
    between two forwards (an optimizer step, Stage III's reference policy) is what the next forward gathers.
    """
    fsdp = _kind(acc) == "fsdp"
    if fsdp:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = acc.state.fsdp_plugin
        wrap_by_class = plugin.auto_wrap_policy is transformer_auto_wrap_policy
        if wrap_by_class and plugin.transformer_cls_names_to_wrap is None:
            present = {type(m).__name__ for m in model.modules()}
            declared = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or ()}
            plugin.transformer_cls_names_to_wrap = sorted(declared & present)
        if plugin.ignored_modules is None and getattr(model, "vae", None) is not None:
            plugin.ignored_modules = [model.vae]
        upcast_trainable(model)
    wrapped, optimizer = acc.prepare(module, optimizer)
    if fsdp:
        wrapped.set_reshard_after_forward(True)
    return wrapped, optimizer


def upcast_trainable(model: nn.Module) -> list[str]:
    """FSDP2: every trained parameter becomes fp32 (in place, so the optimizer keeps its references).

    FSDP2 asks for one original dtype among the trained parameters of a unit, and the root unit holds the
    fp32 queries and LIM beside, in Stage II, the DiT's own embeddings and projections, which a bf16 DiT
    (``dit.dtype: bfloat16``, as the paper presets load SANA) holds in bf16. fp32 master weights are what
    mixed precision wants anyway: ``--train.mixed_precision=bf16`` makes FSDP compute in bf16. Frozen
    parameters keep their dtype. Returns the names of the parameters it changed.
    """
    changed = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            changed.append(name)
    return changed


def configure_deepspeed(acc, settings: dict[str, tuple[float, str]]) -> None:
    """Before ``prepare``: DeepSpeed's micro-batch, accumulation steps and clipping are the loop's.

    ``settings``: DeepSpeed config key -> (the loop's value, the option it comes from). ``auto`` (or absent)
    entries of the DeepSpeed config are filled in; a different number is an error naming the option, since the
    loop decides what a micro-step and a step are.
    """
    if _kind(acc) != "deepspeed":
        return
    config = acc.state.deepspeed_plugin.deepspeed_config
    for key, (value, option) in settings.items():
        have = config.get(key, "auto")
        if have == "auto":
            config[key] = value
        elif float(have) != float(value):
            raise ConfigError(
                f"the DeepSpeed config sets {key}={have}, but the loop runs {value} ({option}): set it to auto "
                "(configs/accelerate/deepspeed_zero2.yaml leaves it out) or change the loop's option"
            )


class ModelCalls(nn.Module):
    """The module Stage III hands to ``accelerate.prepare``: ``calls(fn, *args)`` runs ``fn(*args)`` as its forward.

    ``fn`` is anything that uses ``model``: the policy step it trains, or (through :func:`outside_training`)
    the sampler and the reference policy. Under FSDP the parameters are whole only inside a forward of the
    wrapped root, and the first forward of all must be the root's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def outside_training(acc, wrapped, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` for a use of the model without gradients (sampling, the reference policy).

    Under FSDP it runs as a forward of the prepared :class:`ModelCalls`, where FSDP gathers each unit's
    parameters; elsewhere the parameters are whole and ``fn`` is called directly (not through DDP's or
    DeepSpeed's forward, which have nothing to do for it).
    """
    if _kind(acc) == "fsdp":
        return wrapped(fn, *args, **kwargs)
    return fn(*args, **kwargs)


def all_processes_agree(acc, ok: bool) -> bool:
    """True when ``ok`` holds on every process (one tiny all-gather): a skip decision all of them share."""
    flags = acc.gather(torch.tensor([float(ok)], device=acc.device))
    return bool(flags.min() > 0)


def backward(acc, wrapped, loss: torch.Tensor, last: bool) -> None:
    """One of several backward passes that make one update (Stage III accumulates them itself).

    DeepSpeed: the engine's backward, told whether it is the update's last; at the last it reduces the
    gradients, clips, and steps (or skips a non-finite step). Elsewhere ``accelerator.backward``.
    """
    if _kind(acc) == "deepspeed":
        wrapped.set_gradient_accumulation_boundary(last)
        wrapped.backward(loss, scale_wrt_gas=False)
        if last:
            wrapped.step()
    else:
        acc.backward(loss)


def grad_norm(acc, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip (when max_norm > 0) and return the total gradient norm of ``params``.

    DeepSpeed clipped inside its step already and reports the norm it saw (inf when it skipped the step);
    FSDP's gradients are DTensors, whose norm accelerate reduces over the shards.
    """
    if max_norm > 0 or is_sharded(acc):
        return float(acc.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


# ------------------------------------------------------------------------------------------- checkpoints
def whole_tensors(acc, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of whole tensors by name; every process must call it (a collective when sharded).

    FSDP: ``DTensor.full_tensor()`` of each shard; DeepSpeed: a trained parameter's fp32 master weights
    (the module's copy may be bf16); otherwise the tensor itself.
    """
    from_master = None
    if _kind(acc) == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param as from_master
    out = {}
    for name, t in named.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        elif from_master is not None and (master := from_master(t)) is not None:
            t = master
        out[name] = t.detach().contiguous().cpu()
    return out


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (whole, e.g. read from a checkpoint) placed like ``param``: sharded the same way under FSDP."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(param.device, param.dtype)


def save_optimizer(acc, wrapped, optimizer, folder: Path) -> None:
    """Write the optimizer state into the checkpoint folder ``folder``; every process must call it."""
    kind = _kind(acc)
    if kind == "deepspeed":
        wrapped.save_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True
        )
        return
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(wrapped, optimizer.optimizer, options=options)
    else:
        state = optimizer.state_dict()
    if acc.is_main_process:
        torch.save(state, folder / OPTIMIZER_FILE)


def load_optimizer(acc, wrapped, optimizer, folder: Path, saved_processes: int) -> None:
    """Restore what :func:`save_optimizer` wrote (after ``prepare``); every process must call it."""
    kind = _kind(acc)
    if kind == "deepspeed":
        if saved_processes != acc.num_processes:
            raise CheckpointError(
                f"{folder} was written by {saved_processes} DeepSpeed processes, each holding its shard of the "
                f"optimizer state; resume it with {saved_processes} processes, not {acc.num_processes}"
            )
        path, _ = wrapped.load_checkpoint(
            str(folder), tag=DEEPSPEED_TAG, load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise CheckpointError(
                f"{folder / DEEPSPEED_TAG} holds no DeepSpeed checkpoint (see the log above)"
            )
        return
    file = folder / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: was {folder} written under DeepSpeed? Resume it under DeepSpeed"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    # FSDP's full state dict names the parameters; DDP's optimizer.state_dict() numbers them
    by_name = all(isinstance(k, str) for group in state["param_groups"] for k in group["params"])
    if kind == "fsdp" and not by_name:
        raise CheckpointError(
            f"{file} was written by a one-process or DDP run (parameters by position); resume it under DDP"
        )
    if by_name:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(wrapped, optimizer.optimizer, optim_state_dict=state, options=options)
    else:
        optimizer.load_state_dict(state)


def readable_weights(folder: Path) -> None:
    """Give the weight files ``save_pretrained`` wrote in ``folder`` (its own ``*.safetensors`` and those of
    the component folders ``transformer/``, ``vae/``, ``vlm/``) the mode the umask asks for: safetensors
    creates them 0600, so teammates on shared storage could not load them."""
    for path in [*folder.glob("*.safetensors"), *folder.glob("*/*.safetensors")]:
        apply_umask(path)


def save_model(acc, model: nn.Module, folder: Path, values: dict[str, torch.Tensor] | None = None) -> None:
    """Write the final model folder with ``model.save_pretrained``; every process must call it.

    ``values`` replace trained tensors by name (the EMA weights): they are copied into the live model on every
    process first, under every backend, so the model a caller holds afterwards is the one the folder holds
    (before, one process / DDP left the main process's model with EMA weights and FSDP / DeepSpeed did not).
    One process / DDP: the main process saves its model itself. FSDP / DeepSpeed: the main process builds a plain copy with ``type(model).from_config(config)`` (its
    frozen parts come from the same paths or seeded architectures) and fills it with the gathered tensors that
    differ from a fresh build (``trained_state_dict`` and whatever trains now), so the folder is the same as a
    DDP run's and loads with ``from_pretrained``. This needs CPU memory for one more copy of the model.
    """
    acc.wait_for_everyone()
    with torch.no_grad():  # local tensors (shards under FSDP) into the same local parameters
        params = dict(model.named_parameters())
        for name, value in (values or {}).items():
            params[name].copy_(value)
    if not is_sharded(acc):
        if acc.is_main_process:
            model.save_pretrained(folder)
            readable_weights(Path(folder))
        acc.wait_for_everyone()
        return
    live = dict(model.named_buffers()) | dict(model.named_parameters())
    names = set(model.trained_state_dict()) | {n for n, p in model.named_parameters() if p.requires_grad}
    tensors = whole_tensors(acc, {n: live[n] for n in sorted(names | set(values or {}))})
    if acc.is_main_process:
        copy = type(model).from_config(model.config)
        result = copy.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise CheckpointError(f"the rebuilt model has no {result.unexpected_keys[:6]}")
        copy.save_pretrained(folder)
        readable_weights(Path(folder))
    acc.wait_for_everyone()


def shut_down_processes() -> None:
    """End a launched run's process group in order: every process waits at a barrier (none leaves while
    another is still inside a collective), then destroys the group, before the interpreter exits.

    Left to interpreter exit, the gloo process group's threads can still be running when the C++ destructors
    run, and a process aborts ("terminate called without an active exception", SIGABRT) after a run that
    finished. A no-op in a single process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
