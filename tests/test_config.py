"""Typed configs: presets, YAML round trip, ``section.key=value`` overrides and validation errors."""

from __future__ import annotations

import pytest

from parauni.config import (
    CONDITIONAL_TEMPLATE,
    UNCONDITIONAL_TEMPLATE,
    ConfigError,
    LIMConfig,
    ModelConfig,
    apply_overrides,
    describe,
    from_dict,
    list_presets,
    load_model_config,
    load_yaml,
    preset_dict,
    save_yaml,
    to_dict,
    with_overrides,
)


def test_presets_are_listed_and_load():
    assert {"paper", "tiny"} <= set(list_presets())
    tiny = load_model_config("tiny")
    assert tiny.name == "tiny"
    assert tiny.vlm.kind == "internvl" and tiny.vlm.path is None and tiny.vlm.dtype == "float32"
    assert tiny.lim.num_queries == 8 and tiny.lim.connector_layers == 2 and tiny.lim.layers == "all"
    assert tiny.dit.arch["caption_channels"] == 32
    assert (tiny.sampling.height, tiny.sampling.width, tiny.sampling.steps) == (64, 64, 4)


def test_paper_preset_matches_the_build_specification():
    paper = load_model_config("paper")
    assert paper.vlm.path == "OpenGVLab/InternVL3-2B-hf" and paper.vlm.max_length == 128
    assert paper.vlm.arch["text_config"]["num_hidden_layers"] == 28
    assert paper.vlm.template == CONDITIONAL_TEMPLATE and paper.vlm.uncond_template == UNCONDITIONAL_TEMPLATE
    assert paper.lim.num_queries == 256 and paper.lim.layers == "all"
    assert (paper.lim.connector_layers, paper.lim.connector_intermediate, paper.lim.connector_heads) == (
        6,
        8960,
        24,
    )
    assert paper.lim.zone_bounds == pytest.approx([12 / 28, 24 / 28])
    assert paper.trainable.dit is False and paper.trainable.queries and paper.trainable.lim
    s = paper.sampling
    assert (s.sampler, s.steps, s.cfg, s.shift, s.height) == ("dpm", 20, 4.5, 3.0, 1024)


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_model_config(
        "tiny",
        [
            "--lim.layers=list",
            "--lim.layer_list=[0,-1]",
            "sampling.cfg=2",  # int -> float
            "--lim.use_layernorm=false",
            "--vlm.max_length=32",
            "--dit.dtype=bfloat16",
            "--name=my model",
        ],
    )
    assert cfg.lim.layers == "list" and cfg.lim.layer_list == [0, -1]
    assert cfg.sampling.cfg == 2.0 and isinstance(cfg.sampling.cfg, float)
    assert cfg.lim.use_layernorm is False
    assert cfg.vlm.max_length == 32 and cfg.dit.dtype == "bfloat16" and cfg.name == "my model"


def test_overrides_do_not_mutate_their_input():
    data = preset_dict("tiny")
    out = apply_overrides(data, ["lim.num_queries=3"])
    assert out["lim"]["num_queries"] == 3 and data["lim"]["num_queries"] == 8


@pytest.mark.parametrize(
    "override, named",
    [
        ("lim.bogus=1", "lim.bogus"),
        ("bogus_section.key=1", "bogus_section"),
        ("sampling.nsteps=3", "sampling.nsteps"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        load_model_config("tiny", [override])
    assert "valid keys" in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lim.num_queries=abc", r"lim\.num_queries must be an integer"),
        ("lim.num_queries=0", r"lim\.num_queries=0"),
        ("lim.use_layernorm=maybe", r"lim\.use_layernorm must be true or false"),
        ("lim.layers=middle_only", r"lim\.layers='middle_only'.*'drop_middle'"),
        ("lim.layers=list", r"layer_list"),
        ("lim.interval=0", r"lim\.interval=0"),
        ("lim.zone_bounds=[0.9,0.1]", r"zone_bounds"),
        ("lim.connector_layers=0", r"connector_layers"),
        ("vlm.kind=gpt", r"vlm\.kind='gpt'"),
        ("vlm.dtype=float8", r"vlm\.dtype"),
        ("vlm.max_length=4", r"vlm\.max_length=4"),
        ("vlm.template=no caption here", r"\{caption\}"),
        ("vae.kind=vqgan", r"vae\.kind"),
        ("sampling.sampler=ddim", r"sampling\.sampler='ddim'"),
        ("sampling.steps=0", r"sampling\.steps=0"),
        ("sampling.cfg=-1", r"sampling\.cfg=-1"),
        ("trainable.dit_lora_rank=-2", r"dit_lora_rank=-2"),
        ("lim", r"section\.key=value"),
    ],
)
def test_invalid_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config("tiny", [override])


def test_full_dit_and_lora_exclude_each_other():
    with pytest.raises(ConfigError, match="exclude each other"):
        load_model_config("tiny", ["trainable.dit=true", "trainable.dit_lora_rank=4"])


def test_component_needs_a_path_or_an_arch():
    with pytest.raises(ConfigError, match="vlm needs a path"):
        load_model_config("tiny", ["vlm.arch=null"])
    with pytest.raises(ConfigError, match="dit needs a path"):
        load_model_config("tiny", ["dit.arch=null"])
    assert load_model_config("tiny", ["vae.kind=none", "vae.arch=null"]).vae.kind == "none"


def test_yaml_round_trip_is_exact(tmp_path):
    cfg = load_model_config("tiny", ["lim.layers=interval", "lim.interval=3", "trainable.dit_lora_rank=2"])
    save_yaml(cfg, tmp_path / "model.yaml")
    again = load_model_config(tmp_path / "model.yaml")
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again.lim, LIMConfig)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*tiny"):
        load_model_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("lim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_model_config(tmp_path / "list.yaml")


def test_from_dict_checks_nested_types():
    with pytest.raises(ConfigError, match=r"lim must be a mapping"):
        from_dict(ModelConfig, {"lim": 3})
    with pytest.raises(ConfigError, match=r"lim\.layer_list\[1\] must be an integer"):
        from_dict(ModelConfig, {"lim": {"layers": "list", "layer_list": [0, "x"]}})
    with pytest.raises(ConfigError, match=r"lim\.layer_list must be a list"):
        from_dict(ModelConfig, {"lim": {"layer_list": 3}})


def test_describe_lists_every_key_with_help():
    rows = {key: (default, help_) for key, default, help_ in describe(ModelConfig)}
    assert rows["lim.num_queries"][0] == "256"
    assert "query" in rows["lim.num_queries"][1]
    assert "sampling.cfg" in rows and "trainable.dit_lora_rank" in rows and "vlm.kind" in rows
    assert [key for key, (_, help_) in rows.items() if not help_] == []


def test_overrides_read_exponent_numbers_without_a_dot():
    from parauni.config import apply_overrides

    out = apply_overrides({}, ["--train.lr=1e-4", "--a.b=3", "--a.name=last", "--a.f=2.5E-3"])
    assert out == {"train": {"lr": 1e-4}, "a": {"b": 3, "name": "last", "f": 2.5e-3}}


def test_overrides_reach_into_lists_by_position():
    from parauni.rl.config import RLConfig

    rl = with_overrides(RLConfig(), ["phases.1.epochs=3", "phases.0.rewards.clip=0.5", "ldam.window=2"])
    assert rl.phases[1].epochs == 3 and rl.phases[0].rewards["clip"] == 0.5 and rl.ldam.window == 2
    assert RLConfig().phases[1].epochs == 500  # the input is not changed
    with pytest.raises(ConfigError, match=r"'phases.x.epochs'.*use 0 to 1"):
        with_overrides(RLConfig(), ["phases.x.epochs=3"])
    with pytest.raises(ConfigError, match=r"zone=.nowhere. is not valid"):
        with_overrides(RLConfig(), ["phases.0.zone=nowhere"], prefix="rl.")
