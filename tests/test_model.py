"""The ParaUni model on the tiny preset: shapes, what trains, overfitting, generation and clear input errors."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, WIDTH
from fp32 import assert_close_up_to_order, dit_additions

from parauni.config import ConfigError
from parauni.models.parauni import ParaUni
from parauni.pipeline import generate, initial_noise

PROMPTS = ["a red circle", "a blue square next to a green cup"]
Q, C = 8, 32  # tiny preset: queries, DiT caption_channels


def _training_inputs(model: ParaUni, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    x0 = model.encode_images(pixels)  # through the frozen VAE
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0.3, 0.8])
    return model.encode_prompts(PROMPTS), x0, t, noise


# ------------------------------------------------------------------------------------------------ shapes


def test_output_shapes(tiny_model):
    batch = tiny_model.encode_prompts(PROMPTS)
    with torch.no_grad():
        states = tiny_model.query_states(batch)
        per_layer = tiny_model.per_layer_conditions(batch)
        cond = tiny_model.condition(batch)
        x_t = torch.randn(2, *tiny_model.latent_shape(64, 96))
        v = tiny_model.velocity(x_t, torch.tensor([0.5, 1.0]), cond)
    assert states.shape == (2, NUM_LAYERS, Q, WIDTH)
    assert per_layer.shape == (2, NUM_LAYERS, Q, C)
    assert cond.shape == (2, Q, C)
    torch.testing.assert_close(cond, per_layer.mean(1))
    assert tiny_model.latent_shape(64, 96) == (8, 8, 12)
    assert v.shape == x_t.shape and torch.isfinite(v).all()


def test_per_layer_conditions_follow_the_layer_selection(make_tiny):
    model = make_tiny(["lim.layers=drop_deep"]).eval()
    # the tiny VLM's 4 layers: deep = 2-3 (docs/how-it-works.md, "Conventions")
    assert model.lim.layers == [0, 1]
    batch = model.encode_prompts(PROMPTS)
    with torch.no_grad():
        states = model.query_states(batch)
        per_layer = model.per_layer_conditions(batch)
        cond = model.condition(batch)
    assert states.shape == (2, NUM_LAYERS, Q, WIDTH)  # the VLM always returns all layers
    assert per_layer.shape == (2, 2, Q, C)
    torch.testing.assert_close(cond, per_layer.mean(1))
    torch.testing.assert_close(per_layer, model.lim.per_layer(states[:, :2]))


def test_generate_shapes_and_range(tiny_model):
    images = generate(tiny_model, PROMPTS, steps=2, height=32, width=48, progress=False)
    assert images.shape == (2, 3, 32, 48) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0


def test_generate_is_seeded_and_independent_of_the_batch_size(tiny_model):
    prompts = ["a cat", "three dogs left of a car above a tree", "a red circle"]
    kw = dict(steps=2, height=32, width=32, progress=False, sampler="euler")
    one_by_one = generate(tiny_model, prompts, batch_size=1, **kw)
    together = generate(tiny_model, prompts, batch_size=3, **kw)
    torch.testing.assert_close(together, one_by_one, atol=1e-4, rtol=0)
    other_seed = generate(tiny_model, prompts[:1], seed=5, **kw)
    assert (other_seed - one_by_one[:1]).abs().max() > 1e-3
    # image i uses noise seed seed + i
    assert torch.equal(initial_noise((2, 3, 3), [7, 8])[1], initial_noise((2, 3, 3), [8])[0])


def test_generate_image_to_image(tiny_model):
    images = torch.rand(3, 3, 40, 56) * 2 - 1
    out = generate(tiny_model, None, images, steps=2, height=32, width=32, progress=False, batch_size=2)
    assert out.shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        generate(tiny_model, None, torch.zeros(3, 32, 32), progress=False)


def test_generate_scale_fn_of_ones_changes_nothing(tiny_model):
    kw = dict(steps=2, height=32, width=32, progress=False)
    plain = generate(tiny_model, PROMPTS[:1], **kw)
    seen = []

    def ones(per_layer):
        seen.append(per_layer.shape)
        return torch.ones(1, per_layer.shape[1], 1, 1)

    # the condition is the mean over the layers either way (x 1 is exact), but may be summed in another order
    # (tests/fp32.py); its rounding then runs through both steps' DiT calls (the guidance scale amplifies the
    # conditional branch) and the VAE decoder's 3x3 convolutions
    dit = tiny_model.dit.config
    tokens = (32 // (8 * dit.patch_size)) ** 2  # 32 px, DC-AE f8
    vae = 9 * (dit.in_channels + 2 * sum(tiny_model.vae.config.decoder_block_out_channels))
    steps, cfg = 2, tiny_model.config.sampling.cfg
    additions = NUM_LAYERS + int(steps * (1 + 2 * cfg) * dit_additions(dit, tokens, Q)) + vae
    assert_close_up_to_order(generate(tiny_model, PROMPTS[:1], scale_fn=ones, **kw), plain, additions)
    assert seen == [torch.Size([1, NUM_LAYERS, Q, C])]


# ------------------------------------------------------------------------------------------------ what trains


@pytest.mark.parametrize("mode", ["frozen_dit", "full_dit", "lora"])
def test_gradients_reach_only_the_trainable_parts(make_tiny, mode):
    overrides = {"frozen_dit": [], "full_dit": ["trainable.dit=true"], "lora": ["trainable.dit_lora_rank=4"]}
    model = make_tiny(overrides[mode]).train()
    assert not model.vlm.model.training and not model.vae.training and model.lim.training
    batch, x0, t, noise = _training_inputs(model)
    loss = model(batch, x0, t, noise)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()

    assert all(p.grad is None for p in model.vlm.parameters())
    assert all(p.grad is None for p in model.vae.parameters())
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0
    for name, p in model.lim.named_parameters():
        assert p.grad is not None, name
        if not name.endswith("k_proj.bias"):  # softmax is invariant to the key bias: its gradient is ~0
            assert p.grad.abs().sum() > 0, name
    dit = dict(model.dit.named_parameters())
    if mode == "frozen_dit":
        assert all(p.grad is None for p in dit.values())
    elif mode == "full_dit":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dit.values())
    else:
        lora = {n: p for n, p in dit.items() if "lora_" in n}
        assert lora and all(p.grad is not None for p in lora.values())
        assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
        assert all(p.grad is None for n, p in dit.items() if "lora_" not in n)


@pytest.mark.parametrize(
    "overrides", [[], ["trainable.dit=true"], ["trainable.dit_lora_rank=4"], ["trainable.queries=false"]]
)
def test_trainable_parameters_change_and_frozen_ones_do_not(make_tiny, overrides):
    model = make_tiny(overrides).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(0.05), lr=1e-3, betas=(0.9, 0.95))
    batch, x0, t, noise = _training_inputs(model)
    for _ in range(3):
        opt.zero_grad()
        model(batch, x0, t, noise).backward()
        opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith(("vlm.", "vae.")) for n in trainable)
    assert ("queries" in trainable) == ("trainable.queries=false" not in overrides)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_param_groups_cover_the_trainable_parameters_once(make_tiny):
    model = make_tiny(["trainable.dit=true"])
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(p is model.queries for p in decay["params"])


def test_parameter_counts_split_trainable_and_frozen(tiny_model):
    counts = tiny_model.parameter_counts()
    assert counts["vlm"]["trainable"] == 0 and counts["vlm"]["frozen"] > 0
    assert counts["queries"] == {"trainable": Q * WIDTH, "frozen": 0}
    # connector: 2 x (4 x (64*64+64) + 2 x 2*64 + (64*128+128) + (128*64+64)); projector 64*32+32; LN 2*32
    assert counts["lim"] == {"trainable": 2 * (4 * 4160 + 256 + 8320 + 8256) + 2080 + 64, "frozen": 0}
    assert counts["dit"]["trainable"] == 0 and counts["vae"]["trainable"] == 0


def test_loss_falls_when_overfitting_a_tiny_batch(make_tiny):
    model = make_tiny(["trainable.dit=true"]).train()
    batch, x0, t, noise = _training_inputs(model, seed=1)
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = model(batch, x0, t, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# ------------------------------------------------------------------------------------------------ paper size


def test_paper_preset_builds_on_meta_with_the_expected_sizes(paper_meta_model):
    model = paper_meta_model
    assert all(p.is_meta for p in model.parameters())
    assert model.vlm.num_layers == 28 and model.vlm.hidden_size == 1536
    assert model.lim.layers == list(range(28))
    assert model.queries.shape == (256, 1536)
    assert model.dit.config.caption_channels == 2304 and model.latent_factor == 32
    lm = model.vlm.model
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # tied embeddings
    counts = model.parameter_counts()
    assert 1.85e9 < counts["vlm"]["frozen"] < 1.87e9
    assert 1.59e9 < counts["dit"]["frozen"] < 1.61e9
    assert counts["queries"]["trainable"] == 256 * 1536
    # OpenUni-L connector (6 x 1536, MLP 8960) + projector 1536 -> 2304 + LayerNorm(2304)
    block = 4 * (1536 * 1536 + 1536) + 4 * 1536 + (1536 * 8960 + 8960) + (8960 * 1536 + 1536)
    assert counts["lim"]["trainable"] == 6 * block + (1536 * 2304 + 2304) + 2 * 2304


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_prompts_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(tiny_model, [""], progress=False)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(tiny_model, [], progress=False)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        generate(tiny_model, ["a cat", 3], progress=False)
    with pytest.raises(ValueError, match="batch_size=0"):
        generate(tiny_model, ["a cat"], batch_size=0, progress=False)


def test_long_prompt_is_truncated_with_a_warning_and_still_generates(tiny_model):
    long = " ".join(["a red circle and a blue square on a wooden table"] * 20)
    with pytest.warns(UserWarning, match="truncated"):
        out = generate(tiny_model, [long], steps=1, height=32, width=32, progress=False)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "height, width, bad", [(60, 64, "height=60"), (64, 100, "width=100"), (-8, 64, "height=-8")]
)
def test_sizes_must_fit_the_vae_and_dit(tiny_model, height, width, bad):
    with pytest.raises(ValueError, match=bad) as err:
        generate(tiny_model, ["a cat"], height=height, width=width, progress=False)
    assert "multiples of 8" in str(err.value)


def test_size_error_suggests_valid_sizes(tiny_model):
    with pytest.raises(ValueError, match=r"e\.g\. 56 or 64"):
        tiny_model.check_size(60, 64)
    tiny_model.check_size(56, 8)  # valid sizes pass


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lim.connector_heads=3"], r"connector width 64 is not divisible by lim\.connector_heads=3"),
        (["lim.connector_hidden=30", "lim.connector_heads=4"], r"connector width 30"),
        (["dit.arch.cross_attention_dim=48"], r"cross_attention_dim = 48"),
        (["dit.arch.cross_attention_head_dim=24"], r"cross heads x cross head_dim = 48"),
        (["vae.arch.latent_channels=4"], r"latent_channels=4"),
        (["vae.kind=none"], r"pixel space"),
    ],
)
def test_components_that_do_not_fit_fail_at_build_time(make_tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_tiny(overrides)


def test_layer_list_out_of_range_fails_at_build_time(make_tiny):
    with pytest.raises(ValueError, match="layer 4 is out of range for a VLM with 4 decoder layers"):
        make_tiny(["lim.layers=list", "lim.layer_list=[0,4]"])


# ------------------------------------------------------------------------------------------------ other backbones


def test_qwen_vl_backbone_end_to_end(make_tiny, qwen_vl_dir):
    model = make_tiny(vlm=dict(kind="qwen2_5_vl", path=str(qwen_vl_dir), arch=None)).eval()
    kw = dict(steps=1, height=32, width=32, progress=False)
    assert generate(model, PROMPTS, **kw).shape == (2, 3, 32, 32)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert generate(model, None, images, **kw).shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert model.condition(model.encode_prompts([None], images=images[:1])).shape == (1, Q, C)


def test_causal_lm_backbone_end_to_end(make_tiny, llama_lm_dir):
    model = make_tiny(vlm=dict(kind="causal_lm", path=str(llama_lm_dir), arch=None)).eval()
    assert type(model.vlm.model).__name__ == "LlamaModel"
    out = generate(model, PROMPTS, steps=1, height=16, width=24, progress=False)
    assert out.shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match="reads text only"):
        generate(model, None, torch.zeros(1, 3, 16, 16), progress=False)


# ------------------------------------------------------------------------------------------------ seeding and timesteps


@pytest.mark.parametrize("overrides", [[], ["trainable.dit_lora_rank=4"]])
def test_new_parameters_are_seeded_by_the_config(make_tiny, overrides):
    a, b = make_tiny(overrides).trained_state_dict(), make_tiny(overrides).trained_state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(make_tiny([*overrides, "seed=1"]).queries, a["queries"])


def test_bf16_dit_receives_the_exact_timestep(make_tiny):
    model = make_tiny(["dit.dtype=bfloat16"]).eval()
    seen = []
    model.dit.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        cond = model.condition(model.encode_prompts(PROMPTS[:1]))
        model.velocity(torch.randn(1, 8, 4, 4), torch.tensor([0.999]), cond)
    assert seen[0].float().item() == pytest.approx(999.0)
