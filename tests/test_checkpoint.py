"""save_pretrained / from_pretrained: exact round trips and strict, clearly reported failures."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from parauni.config import ConfigError
from parauni.models.components import ComponentLoadError
from parauni.models.parauni import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, ParaUni

PROMPTS = ["a red circle", "a blue square next to a green cup"]


def _perturb(model: ParaUni, seed: int = 0) -> None:
    """Move every trainable parameter away from its seeded initial value (a fresh build must not match)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _outputs(model: ParaUni):
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 8, 8, generator=g)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        cond = model.condition(model.encode_prompts(PROMPTS))
        return cond, model.velocity(x, t, cond)


def _assert_same_model(a: ParaUni, b: ParaUni) -> None:
    sa, sb = a.trained_state_dict(), b.trained_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for ta, tb in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(ta, tb)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A tiny model (components built from arch dicts) with perturbed trained weights, saved once."""
    from conftest import tiny_config

    model = ParaUni.from_config(tiny_config())
    _perturb(model)
    folder = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")
    return model, folder


@pytest.fixture
def ckpt_copy(saved_tiny, tmp_path):
    return shutil.copytree(saved_tiny[1], tmp_path / "copy")


# ------------------------------------------------------------------------------------------------ round trips


def test_round_trip_is_exact(saved_tiny):
    model, folder = saved_tiny
    assert {p.name for p in folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "vlm", "transformer", "vae"}
    fresh = ParaUni.from_config(model.config)
    assert not torch.equal(fresh.queries, model.queries)  # the perturbation is not the seeded init
    loaded = ParaUni.from_pretrained(folder)
    _assert_same_model(model, loaded)
    # the whole state (frozen parts saved as HF folders too) is identical
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert (saved["vlm"]["path"], saved["dit"]["path"], saved["vae"]["path"]) == ("vlm", "transformer", "vae")


def test_trained_state_dict_holds_queries_and_the_whole_lim(saved_tiny):
    model, folder = saved_tiny
    state = load_file(str(folder / WEIGHTS_FILE))
    assert "queries" in state and "lim.norm.weight" in state and "lim.norm.bias" in state
    assert "lim.projector.weight" in state and "lim.connector.layers.1.mlp.fc2.bias" in state
    assert not any(k.startswith(("vlm.", "vae.", "dit.")) for k in state)
    assert set(state) == set(model.trained_state_dict())


def test_stage_one_checkpoint_loads_into_stage_two_with_its_layernorm(saved_tiny):
    model, folder = saved_tiny
    stage2 = ParaUni.from_pretrained(folder, ["trainable.dit=true"])
    assert stage2.config.trainable.dit and all(p.requires_grad for p in stage2.dit.parameters())
    assert torch.equal(stage2.lim.norm.weight, model.lim.norm.weight)  # not re-initialised
    assert torch.equal(stage2.lim.norm.bias, model.lim.norm.bias)


def test_round_trip_with_components_loaded_by_path(saved_components_config, tmp_path):
    model = ParaUni.from_config(saved_components_config())
    _perturb(model)
    folder = model.save_pretrained(tmp_path / "ckpt")
    # frozen components are referred to by path, not copied, and pinned by their files' sha256
    assert {p.name for p in folder.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, "components.json"}
    _assert_same_model(model, ParaUni.from_pretrained(folder))


def test_round_trip_with_a_trained_dit(saved_components_config, tmp_path):
    model = ParaUni.from_config(saved_components_config(["trainable.dit=true"]))
    _perturb(model)
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert (folder / "transformer" / "config.json").is_file()
    assert not (folder / "vlm").exists() and not (folder / "vae").exists()
    saved = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert saved["dit"]["path"] == "transformer" and saved["dit"]["subfolder"] is None
    loaded = ParaUni.from_pretrained(folder)
    for (name, a), b in zip(model.dit.state_dict().items(), loaded.dit.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    _assert_same_model(model, loaded)


def test_round_trip_with_dit_lora(saved_components_config, tmp_path):
    model = ParaUni.from_config(saved_components_config(["trainable.dit_lora_rank=4"]))
    _perturb(model)
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert not (folder / "transformer").exists()  # the base DiT is referred to by path
    state = load_file(str(folder / WEIGHTS_FILE))
    lora = [k for k in state if k.startswith("dit.")]
    assert lora and all("lora_" in k for k in lora)
    assert len(lora) == 2 * 2 * 2 * 4  # 2 blocks x 2 attentions x 4 targets x (A, B)
    loaded = ParaUni.from_pretrained(folder)
    assert loaded.has_lora
    _assert_same_model(model, loaded)


def test_round_trip_with_lora_on_an_arch_built_dit(make_tiny, tmp_path):
    model = make_tiny(["trainable.dit_lora_rank=4"])
    _perturb(model)
    folder = model.save_pretrained(tmp_path / "ckpt")
    base = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in base)  # a plain diffusers DiT
    _assert_same_model(model, ParaUni.from_pretrained(folder))


def test_copy_frozen_makes_a_self_contained_folder(saved_components_config, tmp_path):
    originals = tmp_path / "components"
    model = ParaUni.from_config(saved_components_config(copy_to=originals))
    _perturb(model)
    folder = model.save_pretrained(tmp_path / "ckpt", copy_frozen=True)
    assert {"vlm", "transformer", "vae"} <= {p.name for p in folder.iterdir()}
    reference = _outputs(model)
    shutil.rmtree(originals)
    moved = shutil.move(str(folder), str(tmp_path / "moved"))
    loaded = ParaUni.from_pretrained(moved)
    for a, b in zip(reference, _outputs(loaded), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ failures


def test_missing_config_is_an_error(ckpt_copy):
    (ckpt_copy / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        ParaUni.from_pretrained(ckpt_copy)


def test_missing_weights_is_an_error(ckpt_copy):
    (ckpt_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        ParaUni.from_pretrained(ckpt_copy)


def test_truncated_weights_is_an_error(ckpt_copy):
    path = ckpt_copy / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        ParaUni.from_pretrained(ckpt_copy)


def _rewrite(folder, edit) -> None:
    path = folder / WEIGHTS_FILE
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_key_is_an_error_naming_it(ckpt_copy):
    _rewrite(ckpt_copy, lambda s: s.pop("lim.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['lim\.norm\.weight'\]"):
        ParaUni.from_pretrained(ckpt_copy)


def test_extra_key_is_an_error_naming_it(ckpt_copy):
    _rewrite(ckpt_copy, lambda s: s.update({"lim.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['lim\.extra\.weight'\]"):
        ParaUni.from_pretrained(ckpt_copy)


def test_wrong_shape_is_an_error_naming_the_key(ckpt_copy):
    _rewrite(ckpt_copy, lambda s: s.update({"queries": torch.zeros(9, 64)}))
    with pytest.raises(CheckpointError, match=r"queries has shape \(9, 64\) but the model expects \(8, 64\)"):
        ParaUni.from_pretrained(ckpt_copy)


def test_a_checkpoint_without_the_lora_weights_the_config_asks_for(ckpt_copy):
    with pytest.raises(CheckpointError, match=r"missing keys \['dit\..*lora_A"):
        ParaUni.from_pretrained(ckpt_copy, ["trainable.dit_lora_rank=4"])


def test_unknown_config_key_is_an_error_naming_it(ckpt_copy):
    data = yaml.safe_load((ckpt_copy / CONFIG_FILE).read_text())
    data["lim"]["mystery"] = 1
    (ckpt_copy / CONFIG_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"lim\.mystery"):
        ParaUni.from_pretrained(ckpt_copy)


def test_component_path_that_does_not_exist_is_an_error_naming_it(ckpt_copy, tmp_path):
    missing = tmp_path / "gone" / "vlm"
    data = yaml.safe_load((ckpt_copy / CONFIG_FILE).read_text())
    data["vlm"]["path"] = str(missing)
    (ckpt_copy / CONFIG_FILE).write_text(yaml.safe_dump(data))
    with pytest.raises(ComponentLoadError, match=str(missing)):
        ParaUni.from_pretrained(ckpt_copy)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="not a ParaUni model folder"):
        ParaUni.from_pretrained(tmp_path / "nothing_here")
