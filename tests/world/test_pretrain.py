"""The world's Stage-0 recipe (``parauni world pretrain``): exact resumption, releases with checked hashes, and the
release shipped in the package."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from parauni.cli import main
from parauni.config import ConfigError
from parauni.world.config import FitConfig, WorldConfig
from parauni.world.fit import fit
from parauni.world.pretrain import Stage0Error, phase_metrics, pretrain
from parauni.world.release import (
    MANIFEST,
    MAX_FILE_BYTES,
    RELEASE_DIR,
    ReleaseError,
    finalize_release,
    resolve_stage0,
    verify_release,
    world_stage0,
)

SCHEDULE = FitConfig(steps=6, lr=1e-2, warmup=2, weight_decay=0.01, betas=[0.9, 0.95], grad_clip=1.0)


class Interrupted(Exception):
    pass


def _fit_run(work: Path, stop_at: int | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))

    def step_loss(step: int):
        if step == stop_at:
            raise Interrupted
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        return (model(x) - x.sum(-1, keepdim=True)).pow(2).mean(), {}

    fit("toy", model, step_loss, SCHEDULE, work, seed=3, save_every=2, progress=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fit_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = _fit_run(tmp_path / "whole")
    with pytest.raises(Interrupted):
        _fit_run(tmp_path / "cut", stop_at=3)  # dies after the checkpoint of step 2
    ckpts = tmp_path / "cut" / "checkpoints"
    assert [c.name for c in ckpts.iterdir()] == ["step_0000002"]  # the library's checkpoint layout
    assert json.loads((ckpts / "step_0000002" / "state.json").read_text())["step"] == 2
    # a kill while the next checkpoint was being written leaves its temporary folder: removed, not read
    (ckpts / ".tmp_step_0000004").mkdir()
    resumed = _fit_run(tmp_path / "cut")
    for name, value in whole.items():
        assert torch.equal(value, resumed[name]), name


def test_fit_passes_over_a_damaged_checkpoint_naming_its_file(tmp_path, capsys):
    whole = _fit_run(tmp_path / "whole")
    with pytest.raises(Interrupted):
        _fit_run(tmp_path / "cut", stop_at=5)  # checkpoints after steps 2 and 4; keeps the newest
    ckpts = tmp_path / "cut" / "checkpoints"
    shutil.copytree(ckpts / "step_0000004", ckpts / "step_0000002")  # an older intact one, renumbered
    state = json.loads((ckpts / "step_0000002" / "state.json").read_text())
    assert state["step"] == 4
    with open(ckpts / "step_0000004" / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"damaged!")
    resumed = _fit_run(tmp_path / "cut")
    said = capsys.readouterr()
    assert "checkpoint step_0000004 is damaged" in said.out + said.err
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


SMALL = [
    "--world.vlm.layers=2",
    "--world.vlm.hidden=32",
    "--world.vlm.intermediate=64",
    "--world.vlm.train.batch_size=4",
    "--world.vlm.train.steps=40",
    "--world.save_every=4",
]


def _pretrain_cmd(out: Path) -> list[str]:
    code = "import sys; from parauni.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "world", "pretrain", "--no-recipe", "--quiet", "--phases", "vlm"] + [
        "--out",
        str(out),
        *SMALL,
    ]


def test_pretrain_killed_at_any_point_resumes_to_the_same_models(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    assert subprocess.run(_pretrain_cmd(tmp_path / "whole"), env=env, capture_output=True).returncode == 0
    proc = subprocess.Popen(
        _pretrain_cmd(tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoints = tmp_path / "cut" / ".work" / "vlm" / "checkpoints"
    deadline = time.time() + 120
    while not any(checkpoints.glob("step_*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert phase_metrics(tmp_path / "cut", "vlm") is None
    done = subprocess.run(_pretrain_cmd(tmp_path / "cut"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a = load_file(str(tmp_path / "whole" / "vlm" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "vlm" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert phase_metrics(tmp_path / "cut", "vlm") is not None


def test_a_folder_begun_with_another_config_is_refused(tmp_path):
    cfg = WorldConfig().quick()
    pretrain(cfg, tmp_path, phases=["ae"], progress=False, log=lambda *_: None)
    other = WorldConfig().quick()
    other.ae.train.steps += 1
    with pytest.raises(Stage0Error, match="ae.train.steps"):
        pretrain(other, tmp_path, phases=["ae"], progress=False, log=lambda *_: None)
    with pytest.raises(Stage0Error, match="unknown Stage-0 phases"):
        pretrain(cfg, tmp_path, phases=["dit"], progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def quick_release(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("release")
    cfg = WorldConfig().quick()
    pretrain(cfg, folder, progress=False, log=lambda *_: None)
    finalize_release(cfg, folder, "test", progress=False, log=lambda *_: None)
    return folder


def test_a_release_has_its_card_and_manifest_and_is_checked(quick_release, tmp_path):
    import shutil

    manifest = verify_release(quick_release)
    card = (quick_release / "README.md").read_text()
    for name, entry in manifest["files"].items():
        assert entry["sha256"] in card, name
    assert not (quick_release / ".work").exists() and not (quick_release / "t2i" / "checkpoints").exists()
    summary = json.loads((quick_release / "stage0.json").read_text())
    assert set(summary["evaluation"]["shapeseval"]) == {"final"}
    assert len(summary["evaluation"]["prompt_use"]["query_states"]) == WorldConfig().quick().vlm.layers

    copy = tmp_path / "copy"
    shutil.copytree(quick_release, copy)
    assert resolve_stage0(copy) == copy
    weights = copy / "t2i" / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="diffusion_pytorch_model.safetensors does not match its sha256"):
        resolve_stage0(copy)
    weights.unlink()
    with pytest.raises(ReleaseError, match="is missing"):
        verify_release(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ReleaseError, match="not a Stage-0 release"):
        verify_release(copy)
    with pytest.raises(ReleaseError, match="no such folder"):
        resolve_stage0(tmp_path / "nowhere")


def test_stage0_overrides_need_the_scratch_path(quick_release):
    with pytest.raises(ConfigError, match="--stage0 scratch"):
        world_stage0(quick_release, ["--world.t2i.train.steps=5"], log=lambda *_: None)
    cfg, folder = world_stage0(quick_release, ["--world.parauni.stage1.steps=5"], log=lambda *_: None)
    assert folder == quick_release and cfg.parauni.stage1.steps == 5
    assert cfg.vlm.layers == WorldConfig().quick().vlm.layers  # the release's own sizes


# ----------------------------------------------------------------------------------------------- the shipped one
def test_the_shipped_release_loads_and_matches_its_hashes():
    from parauni.models.parauni import ParaUni
    from parauni.world.pretrain import world_model_config
    from parauni.world.t2i import TextToImage

    manifest = verify_release(resolve_stage0("release"))
    sizes = [e["bytes"] for e in manifest["files"].values()]
    assert max(sizes) < MAX_FILE_BYTES and sum(sizes) <= 40 * 2**20
    cfg, folder = world_stage0("release", log=lambda *_: None)
    assert folder == RELEASE_DIR and cfg.parauni.num_queries == cfg.t2i.text_tokens
    t2i = TextToImage.from_pretrained(folder / "t2i")
    assert t2i.fixed_length and t2i.max_length == cfg.t2i.text_tokens
    model = ParaUni.from_config(world_model_config(cfg, folder))
    assert model.vlm.num_layers == cfg.vlm.layers


def test_the_shipped_flat_world_json_reads_as_the_recipe_in_train_sections(tmp_path):
    """The shipped release's world.json predates the train sections: its flat keys (vlm.steps, t2i.text_lr,
    reward.aesthetic_steps, ...) are moved into them, giving exactly the recipe's Stage-0 config, and a folder
    begun with the flat keys can be resumed by the same recipe."""
    from parauni.world.config import world_config
    from parauni.world.pretrain import RECIPE, _claim_folder, stage0_config
    from parauni.world.release import release_config

    flat = json.loads((RELEASE_DIR / "world.json").read_text())
    assert "steps" in flat["vlm"] and "aesthetic_steps" in flat["reward"]  # the old layout
    shipped = world_config(base=release_config(RELEASE_DIR))
    assert stage0_config(shipped) == stage0_config(world_config(list(RECIPE)))
    assert shipped.reward.aesthetic_train.grad_clip == 0.0 and shipped.reward.aesthetic_train.betas == [
        0.9,
        0.98,
    ]
    (tmp_path / "world.json").write_text(json.dumps(flat))
    _claim_folder(tmp_path, world_config(list(RECIPE)))  # resumes
    with pytest.raises(Stage0Error, match="t2i.train.warmup"):
        _claim_folder(tmp_path, world_config([*RECIPE, "t2i.train.warmup=7"]))


def test_quick_demo_runs_on_the_shipped_release(tmp_path, monkeypatch):
    import shutil

    from parauni.models.parauni import ParaUni

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["shapeseval"]) == {"stage0_t2i", "stage1", "stage2", "stage3"}
    # a model folder of the demo still loads when copied elsewhere and read from another working directory
    copy = shutil.copytree(out / "stage2", tmp_path / "elsewhere" / "stage2")
    shutil.rmtree(out)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (
        ParaUni.from_pretrained("stage2").config.lim.num_queries == metrics["world"]["parauni"]["num_queries"]
    )
    assert copy.is_dir()
    assert (
        metrics["world"]["vlm"]["layers"]
        == json.loads((RELEASE_DIR / "world.json").read_text())["vlm"]["layers"]
    )
