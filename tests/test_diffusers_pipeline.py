"""ParaUni as a diffusers pipeline (issue 30): equality with ``parauni.generate``, save / load (folder, Hub
cache, model folder, export both ways), dtypes, schedulers, output types, callbacks and bad arguments."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from parauni.cli import main
from parauni.diffusers_pipeline import ParaUniPipeline
from parauni.errors import ConfigError
from parauni.models.parauni import ParaUni
from parauni.pipeline import generate
from parauni.utils.images import pil_to_tensor, resize_center_crop, tensor_to_uint8

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = ["a red circle", "a blue square left of a green cross"]
FAST = dict(num_inference_steps=3, height=32, width=32)


def seeds(seed: int, n: int) -> list[torch.Generator]:
    """The generators that give image i the noise of ``generate(seed=seed)``: seed + i."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def quiet(pipe: ParaUniPipeline) -> ParaUniPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_model) -> ParaUniPipeline:
    """The tiny model as a pipeline (its components shared: only read here)."""
    return quiet(ParaUniPipeline.from_parauni(tiny_model))


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    pipe.save_pretrained(folder)
    return folder


def test_images_equal_generate_exactly(pipe, tiny_model):
    ref = generate(tiny_model, PROMPTS, steps=3, seed=7, height=32, width=32, batch_size=2, progress=False)
    out = pipe(PROMPTS, generator=seeds(7, 2), output_type="pt", **FAST).images
    assert torch.equal(out, (ref + 1) / 2)
    pil = pipe(PROMPTS, generator=seeds(7, 2), **FAST).images
    assert all(np.array_equal(np.asarray(p), tensor_to_uint8(r)) for p, r in zip(pil, ref, strict=True))
    # num_images_per_prompt repeats each prompt in place, as diffusers does
    ref = generate(tiny_model, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, steps=2, seed=3, height=32, width=32,
                   batch_size=4, cfg=2.0, progress=False)  # fmt: skip
    out = pipe(PROMPTS, num_images_per_prompt=2, generator=seeds(3, 4), output_type="pt",
               guidance_scale=2.0, num_inference_steps=2, height=32, width=32).images  # fmt: skip
    assert torch.equal(out, (ref + 1) / 2)


def test_image_to_image_equals_generate(pipe, tiny_model):
    rng = np.random.default_rng(0)
    from PIL import Image

    pictures = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(2)]
    images = torch.stack([pil_to_tensor(resize_center_crop(p, 32, 32)) for p in pictures])
    ref = generate(
        tiny_model, images=images, steps=2, seed=1, height=32, width=32, batch_size=2, progress=False
    )
    out = pipe(image=pictures, generator=seeds(1, 2), output_type="pt", num_inference_steps=2, height=32,
               width=32).images  # fmt: skip
    assert torch.equal(out, (ref + 1) / 2)


def test_every_output_type(pipe):
    def run(output_type: str, **kw):
        kw = dict(generator=seeds(0, 2), num_inference_steps=2, height=32, width=48, **kw)
        return pipe(PROMPTS, output_type=output_type, **kw)

    pil = run("pil").images
    assert [p.size for p in pil] == [(48, 32)] * 2
    arr = run("np").images
    assert arr.shape == (2, 32, 48, 3) and arr.dtype == np.float32 and 0 <= arr.min() <= arr.max() <= 1
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), (arr * 255).round().astype(np.uint8))
    pt = run("pt").images
    assert pt.shape == (2, 3, 32, 48) and np.array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    latents = run("latent", return_dict=False)[0]
    assert latents.shape == (2, pipe.transformer.config.in_channels, 32 // 8, 48 // 8)


def test_negative_prompt_changes_the_unconditional_branch(pipe):
    base = pipe(PROMPTS[0], generator=seeds(0, 1), output_type="pt", **FAST).images
    neg = pipe(
        PROMPTS[0], negative_prompt="a blue square", generator=seeds(0, 1), output_type="pt", **FAST
    ).images
    assert not torch.equal(base, neg)
    picture = torch.zeros(1, 3, 32, 32)  # one negative caption per input image too
    out = pipe(
        image=picture, negative_prompt="a red circle", num_images_per_prompt=2, output_type="latent", **FAST
    )
    assert out.images.shape[0] == 2


def test_scheduler_swap_takes_the_expected_steps(saved):
    pipe = quiet(ParaUniPipeline.from_pretrained(saved))
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    calls = []
    original = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, float(t)))
        return kwargs

    for scheduler in (
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
    ):
        pipe.scheduler = scheduler
        for steps in (2, 5):
            calls.clear(), seen.clear()
            pipe(PROMPTS[0], num_inference_steps=steps, height=32, width=32, callback_on_step_end=record)
            assert len(calls) == steps and [i for i, _ in seen] == list(range(steps))
            assert [t for _, t in seen] == [float(t) for t in scheduler.timesteps]
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert (
        pipe(PROMPTS[0], num_inference_steps=400, height=32, width=32, output_type="latent").images.shape[0]
        == 1
    )


def test_callback_can_replace_the_latents(pipe):
    def zero_last(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == 2 else kwargs

    out = pipe(PROMPTS[0], output_type="latent", callback_on_step_end=zero_last, **FAST).images
    assert torch.equal(out, torch.zeros_like(out))


def test_folder_round_trip_and_model_index(saved, pipe):
    index = (saved / "model_index.json").read_text()
    assert '"ParaUniPipeline"' in index and '"ParaUniConnector"' in index
    assert {p.name for p in saved.iterdir()} >= {
        "vlm",
        "tokenizer",
        "connector",
        "transformer",
        "vae",
        "scheduler",
    }
    loaded = quiet(ParaUniPipeline.from_pretrained(saved))
    a = pipe(PROMPTS, generator=seeds(2, 2), output_type="pt", **FAST).images
    assert torch.equal(loaded(PROMPTS, generator=seeds(2, 2), output_type="pt", **FAST).images, a)


def test_loads_from_a_hub_style_cache(saved, pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--parauni--tiny-pipeline"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    loaded = quiet(ParaUniPipeline.from_pretrained("parauni/tiny-pipeline", cache_dir=tmp_path / "hub"))
    a = pipe(PROMPTS[0], generator=seeds(4, 1), output_type="pt", **FAST).images
    assert torch.equal(loaded(PROMPTS[0], generator=seeds(4, 1), output_type="pt", **FAST).images, a)


def test_dtype_variant_and_device_moves(saved, pipe, tmp_path):
    half = quiet(ParaUniPipeline.from_pretrained(saved, torch_dtype=torch.bfloat16))
    assert {m.dtype for m in (half.vlm, half.connector, half.transformer, half.vae)} == {torch.bfloat16}
    ref = pipe(PROMPTS[0], generator=seeds(0, 1), output_type="pt", **FAST).images
    low = half(PROMPTS[0], generator=seeds(0, 1), output_type="pt", **FAST).images
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and (low - ref).abs().mean() < 0.1
    half.save_pretrained(tmp_path / "bf16", variant="bf16")
    assert (tmp_path / "bf16" / "connector" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    again = quiet(
        ParaUniPipeline.from_pretrained(tmp_path / "bf16", variant="bf16", torch_dtype=torch.bfloat16)
    )
    assert torch.equal(again(PROMPTS[0], generator=seeds(0, 1), output_type="pt", **FAST).images, low)
    moved = again.to("cpu", torch.float32)
    assert moved.device == torch.device("cpu") and moved.connector.dtype == torch.float32
    assert (
        moved(PROMPTS[0], generator=seeds(0, 1), output_type="latent", **FAST).images.dtype == torch.float32
    )


def test_model_cpu_offload_keeps_the_images(saved):
    """The offload hooks (VLM -> DiT -> VAE, connector kept on the device) with the CPU as the execution device:
    the hook chain and the calls that bypass ``forward`` run; on a GPU they also move the weights."""
    pipe = quiet(ParaUniPipeline.from_pretrained(saved))
    ref = pipe(PROMPTS, generator=seeds(5, 2), output_type="pt", **FAST).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.vlm, "_hf_hook") and not hasattr(pipe.connector, "_hf_hook")
    assert torch.equal(pipe(PROMPTS, generator=seeds(5, 2), output_type="pt", **FAST).images, ref)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(output_type="jpg"), "output_type='jpg' is not one of"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt=0 must be an integer >= 1"),
        (dict(prompt=""), "prompt 0 is empty"),
        (dict(prompt=None), "prompts must be a non-empty list"),
        (dict(prompt=5), "prompts must be a non-empty list"),
        (dict(image=torch.zeros(1, 3, 32, 32)), "give prompts .* or images .*, not both"),
        (dict(image="photo.png", prompt=None), "image must be a PIL image"),
        (dict(height=30), "height=30 does not fit this model"),
        (dict(guidance_scale=-1.0), "cfg=-1.0 must be a finite number >= 0"),
        (dict(num_inference_steps=0), "steps=0 must be an integer >= 1"),
        (dict(num_inference_steps=1000), "more than the DPM-Solver\\+\\+ sampler takes"),
        (dict(generator=seeds(0, 3)), "3 generators for 1 images"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries for 1 prompt"),
        (dict(callback_on_step_end=3), "callback_on_step_end=3 is not callable"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "\\['noise'\\] are not available"),
    ],
)
def test_bad_arguments_raise_one_clear_error(pipe, kwargs, message):
    kwargs = {"prompt": "a red circle", **kwargs}
    with pytest.raises(ConfigError, match=message):
        pipe(**kwargs)


def test_export_round_trip_through_the_cli(tiny_model, tmp_path, capsys):
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    out = tmp_path / "pipeline"
    assert main(["export", "--model", str(model_dir), "--to", "diffusers", "--out", str(out)]) == 0
    assert "diffusers pipeline folder" in capsys.readouterr().out
    assert main(["export", "--model", str(model_dir), "--out", str(out)]) == 2  # nothing replaced
    assert "--overwrite" in capsys.readouterr().err
    args = ["--prompt", "a red circle", "--height", "32", "--width", "32", "--steps", "2", "--quiet"]
    for source, png in ((model_dir, "a.png"), (out, "b.png")):
        assert main(["generate", "--model", str(source), "--out", str(tmp_path / png), *args]) == 0
    assert np.array_equal(np.asarray(_open(tmp_path / "a.png")), np.asarray(_open(tmp_path / "b.png")))
    back = tmp_path / "back"
    assert main(["export", "--model", str(out), "--to", "parauni", "--out", str(back)]) == 0
    assert (back / "config.yaml").is_file() and (back / "vlm" / "tokenizer.json").is_file()
    again = ParaUni.from_pretrained(back)
    assert all(
        torch.equal(v, tiny_model.trained_state_dict()[k]) for k, v in again.trained_state_dict().items()
    )


def test_a_lora_dit_is_merged(make_tiny):
    model = make_tiny(["trainable.dit_lora_rank=2"]).eval()
    with torch.no_grad():
        for name, p in model.dit.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    pipe = quiet(ParaUniPipeline.from_parauni(model))
    assert not any("lora_" in n for n, _ in pipe.transformer.named_parameters())
    ref = generate(model, PROMPTS[:1], steps=2, seed=0, height=32, width=32, progress=False)
    out = pipe(
        PROMPTS[0], generator=seeds(0, 1), output_type="pt", num_inference_steps=2, height=32, width=32
    )
    assert torch.allclose(out.images, (ref + 1) / 2, atol=1e-4)


def _open(path: Path):
    from PIL import Image

    return Image.open(path)


@pytest.fixture(scope="module")
def world_stage(tmp_path_factory) -> Path:
    """A world model folder on the shipped Stage-0 models, as a demo stage writes it (fresh queries + LIM)."""
    from parauni.world.pretrain import world_model_config
    from parauni.world.release import existing_stage0

    cfg, stage0 = existing_stage0("release")
    folder = tmp_path_factory.mktemp("demo") / "parauni-demo" / "stage1"
    return ParaUni.from_config(world_model_config(cfg, stage0)).save_pretrained(folder)


def test_the_readme_pipeline_example_runs_on_a_world_stage(world_stage, monkeypatch):
    text = README.read_text()
    code = re.search(r"## Use it from diffusers.*?```python\n(.*?)```", text, re.S).group(1)
    assert "parauni-demo/stage1" in code
    monkeypatch.chdir(world_stage.parents[1])
    exec(compile(code, "README.md", "exec"), {})
    assert (world_stage.parents[1] / "x.png").is_file()
    model = ParaUni.from_pretrained(world_stage)
    pipe = quiet(ParaUniPipeline.from_pretrained(world_stage))
    ref = generate(model, ["a photo of a red circle"], seed=0, batch_size=1, progress=False)
    out = pipe("a photo of a red circle", generator=seeds(0, 1), output_type="pt").images
    assert torch.equal(out, (ref + 1) / 2) and out.shape[-1] == model.config.sampling.width
