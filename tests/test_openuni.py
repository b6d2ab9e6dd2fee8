"""Import of OpenUni / official-ParaUni `.pth` checkpoints: every key maps, safely, strictly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from parauni.cli import main
from parauni.models.openuni import convert_openuni_state_dict, import_openuni, read_checkpoint
from parauni.models.parauni import CheckpointError, ParaUni


class Evil:
    """An arbitrary Python object: a pickle holding one must be refused by weights_only loading."""


def _as_openuni(model: ParaUni, layernorm: bool, dit: bool) -> dict[str, torch.Tensor]:
    """The state dict an OpenUni / ParaUni training run of this model would save."""
    state = {"meta_queries": model.queries.detach().clone()}
    for k, v in model.lim.state_dict().items():
        if k.startswith("norm."):
            if layernorm:
                state["agglayer_norm." + k[len("norm.") :]] = v.clone()
        else:
            state[k] = v.clone()
    if dit:
        state.update({"transformer." + k: v.clone() for k, v in model.dit.state_dict().items()})
    state["lmm.language_model.embed_tokens.weight"] = torch.zeros(2, 2)  # frozen VLM weights are skipped
    return state


def test_openuni_checkpoint_becomes_the_last_layer_baseline(tmp_path):
    source = ParaUni.from_config(tiny_config(["lim.layers=last", "lim.use_layernorm=false", "seed=7"]))
    torch.save(_as_openuni(source, layernorm=False, dit=False), tmp_path / "openuni.pth")
    model = import_openuni(tmp_path / "openuni.pth", tiny_config(), tmp_path / "out")
    assert model.config.lim.layers == "last" and model.lim.layers == [3] and model.lim.norm is None
    assert torch.equal(model.queries, source.queries)
    a, b = source.lim.state_dict(), model.lim.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = ParaUni.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.queries, source.queries)


def test_parauni_checkpoint_with_layernorm_and_dit(tmp_path):
    source = ParaUni.from_config(tiny_config(["seed=3"]))
    with torch.no_grad():
        for p in source.dit.parameters():
            p.add_(0.01)
    torch.save({"state_dict": _as_openuni(source, layernorm=True, dit=True)}, tmp_path / "parauni.pth")
    conv = convert_openuni_state_dict(read_checkpoint(tmp_path / "parauni.pth"))
    assert conv.has_layernorm and conv.ignored == ["lmm.language_model.embed_tokens.weight"]
    model = import_openuni(tmp_path / "parauni.pth", tiny_config(), tmp_path / "out")
    assert model.config.lim.layers == "all" and model.config.trainable.dit
    assert torch.equal(model.lim.norm.weight, source.lim.norm.weight)
    for (n, a), (_, b) in zip(source.dit.state_dict().items(), model.dit.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert (tmp_path / "out" / "transformer").is_dir()


def test_unknown_keys_and_unsafe_files_are_refused(tmp_path):
    source = ParaUni.from_config(tiny_config())
    state = _as_openuni(source, layernorm=True, dit=False)
    state["mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="mystery.weight"):
        convert_openuni_state_dict(state)
    with pytest.raises(CheckpointError, match="meta_queries"):
        convert_openuni_state_dict({"connector.x": torch.zeros(1)})
    torch.save({"meta_queries": torch.zeros(8, 64), "evil": Evil()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(tmp_path / "bad.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "bad.pth").read_bytes()[:20])
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "cut.pth")


def test_wrong_query_width_names_the_key(tmp_path):
    source = ParaUni.from_config(tiny_config())
    state = _as_openuni(source, layernorm=True, dit=False)
    state["meta_queries"] = torch.zeros(8, 32)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="queries"):
        import_openuni(tmp_path / "w.pth", tiny_config(), tmp_path / "out")


def test_cli_import(tmp_path, capsys):
    source = ParaUni.from_config(tiny_config())
    torch.save(_as_openuni(source, layernorm=False, dit=False), tmp_path / "o.pth")
    assert (
        main(["import-openuni", str(tmp_path / "o.pth"), "--preset", "tiny", "--out", str(tmp_path / "m")])
        == 0
    )
    assert "layers 'last'" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "m")]) == 0
