"""Layer selection / zones and the Layer Integration Module against per-layer reference computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fp32 import assert_close_up_to_order, decoder_additions
from torch import nn

from parauni.models.lim import (
    Connector,
    ConnectorAttention,
    LayerIntegrationModule,
    select_layers,
    zone_layers,
)

# ------------------------------------------------------------------------------------------------ zones


def test_zones_for_internvl3_depth_are_the_papers():
    """The paper's middle i in [12, 23] and deep i in [24, 28] count the embedding output as i = 0."""
    assert zone_layers(28, "shallow") == list(range(0, 11))
    assert zone_layers(28, "middle") == [i - 1 for i in range(12, 24)]
    assert zone_layers(28, "deep") == [i - 1 for i in range(24, 29)]  # five layers


@pytest.mark.parametrize(
    "depth, shallow, middle, deep",
    [
        # hidden-state boundaries round(12/28 * L), round(24/28 * L); decoder layer k is hidden state k + 1
        (8, [0, 1], [2, 3, 4, 5], [6, 7]),  # 3.43 -> 3, 6.86 -> 7
        (12, [0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]),  # 5.14 -> 5, 10.29 -> 10
        (4, [0], [1], [2, 3]),  # the tiny preset: 1.71 -> 2, 3.43 -> 3
        (2, [], [0], [1]),  # too shallow for three zones: the shallow one is empty
    ],
)
def test_zones_scale_with_depth(depth, shallow, middle, deep):
    assert zone_layers(depth, "shallow") == shallow
    assert zone_layers(depth, "middle") == middle
    assert zone_layers(depth, "deep") == deep
    assert sorted(shallow + middle + deep) == list(range(depth))


def test_zone_bounds_are_configurable_and_zone_names_checked():
    assert zone_layers(10, "shallow", bounds=(0.5, 0.8)) == [0, 1, 2, 3]
    assert zone_layers(10, "deep", bounds=(0.5, 0.8)) == [7, 8, 9]
    with pytest.raises(ValueError, match="unknown zone 'top'"):
        zone_layers(28, "top")


# ------------------------------------------------------------------------------------------------ selection


def test_selection_modes_for_28_layers():
    assert select_layers(28, "all") == list(range(28))
    assert select_layers(28, "last") == [27]
    assert select_layers(28, "drop_shallow") == list(range(11, 28))
    assert select_layers(28, "drop_middle") == list(range(0, 11)) + [23, 24, 25, 26, 27]
    assert select_layers(28, "drop_deep") == list(range(0, 23))
    assert select_layers(28, "interval") == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27]
    assert select_layers(28, "interval", interval=3) == list(range(0, 28, 3))  # ends at 27
    assert select_layers(28, "list", layer_list=[5, -1, 0]) == [0, 5, 27]
    assert select_layers(28, "list", layer_list=[-28]) == [0]


@pytest.mark.parametrize(
    "depth, drop_shallow, drop_middle, drop_deep, interval",
    [
        (8, [2, 3, 4, 5, 6, 7], [0, 1, 6, 7], [0, 1, 2, 3, 4, 5], [1, 3, 5, 7]),
        (12, list(range(4, 12)), [0, 1, 2, 3, 9, 10, 11], list(range(9)), [1, 3, 5, 7, 9, 11]),
    ],
)
def test_selection_modes_scale_with_depth(depth, drop_shallow, drop_middle, drop_deep, interval):
    assert select_layers(depth, "drop_shallow") == drop_shallow
    assert select_layers(depth, "drop_middle") == drop_middle
    assert select_layers(depth, "drop_deep") == drop_deep
    assert select_layers(depth, "interval") == interval
    assert select_layers(depth, "last") == [depth - 1]
    assert select_layers(depth, "list", layer_list=[-1, 1]) == [1, depth - 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="list", layer_list=[28]), "layer 28 is out of range for a VLM with 28"),
        (dict(mode="list", layer_list=[-29]), "layer -29 is out of range"),
        (dict(mode="list", layer_list=[3, 3]), "repeats a layer"),
        (dict(mode="list", layer_list=[27, -1]), "repeats a layer"),
        (dict(mode="list", layer_list=[]), "non-empty layer_list"),
        (dict(mode="interval", interval=0), "interval=0"),
        (dict(mode="every_layer"), "unknown layer selection 'every_layer'"),
    ],
)
def test_selection_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(28, **kwargs)


def test_selection_rejects_empty_results():
    with pytest.raises(ValueError, match="num_layers=0"):
        select_layers(0)
    with pytest.raises(ValueError, match="removes every layer"):
        select_layers(1, "drop_deep")


# ------------------------------------------------------------------------------------------------ LIM maths


def _lim(layers, num_vlm_layers=6, in_dim=16, out_dim=12, seed=0, **kw) -> LayerIntegrationModule:
    torch.manual_seed(seed)
    kw = dict(dict(connector_intermediate=24, connector_layers=2, connector_heads=4), **kw)
    lim = LayerIntegrationModule(in_dim, out_dim, layers, num_vlm_layers, **kw)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        if lim.norm is not None:
            lim.norm.weight.uniform_(0.5, 1.5)
            lim.norm.bias.uniform_(-0.5, 0.5)
    return lim


def _reference(lim: LayerIntegrationModule, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's formula, one layer at a time: c_i = LN(f(q_i)); c = mean_i c_i."""
    per = []
    for i in lim.layers:
        x = states[:, i]  # (B, Q, D)
        if lim.connector_in is not None:
            x = lim.connector_in(x)
        if lim.connector is not None:
            x = lim.connector(x)
        x = lim.projector(x)
        if lim.norm is not None:
            x = lim.norm(x)
        per.append(x)
    per = torch.stack(per, dim=1)  # (B, L_sel, Q, C)
    return per, sum(per[:, j] for j in range(per.shape[1])) / per.shape[1]


@pytest.mark.parametrize("layers", [[0, 1, 2, 3, 4, 5], [1, 3, 5], [5]])
def test_batched_lim_equals_per_layer_loop(layers):
    lim = _lim(layers).eval()
    states = torch.randn(3, 6, 5, 16)  # (B, L, Q, D)
    ref_per, ref = _reference(lim, states)
    per = lim.per_layer(states)
    assert per.shape == (3, len(layers), 5, 12)
    torch.testing.assert_close(per, ref_per, atol=1e-5, rtol=0)
    torch.testing.assert_close(lim(states), ref, atol=1e-5, rtol=0)
    # already-selected states give the same result
    torch.testing.assert_close(lim.per_layer(states[:, layers]), ref_per, atol=1e-5, rtol=0)


def test_lim_without_layernorm():
    lim = _lim([0, 2, 4], use_layernorm=False).eval()
    assert lim.norm is None
    states = torch.randn(2, 6, 5, 16)
    _, ref = _reference(lim, states)
    torch.testing.assert_close(lim(states), ref, atol=1e-5, rtol=0)
    # without the LN the per-layer outputs are not normalised
    per = lim.per_layer(states)
    assert not torch.allclose(per.mean(-1), torch.zeros(()), atol=1e-3)


def test_openuni_last_layer_baseline_is_connector_and_projector_only(make_tiny):
    """OpenUni's baseline: the last layer's query states through the connector and projector, no LayerNorm."""
    lim = _lim([5], use_layernorm=False).eval()
    states = torch.randn(2, 6, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(lim(states), lim.projector(lim.connector(states[:, -1])))
    with_ln = _lim([5]).eval()  # this project's variant keeps the LIM's LayerNorm
    assert with_ln.norm is not None
    model = make_tiny(["lim.layers=last", "lim.use_layernorm=false"])
    assert model.lim.layers == [model.vlm.num_layers - 1] and model.lim.norm is None


def test_lim_layernorm_normalises_each_layer_output():
    lim = _lim([0, 1, 2])
    nn.init.ones_(lim.norm.weight)
    nn.init.zeros_(lim.norm.bias)
    per = lim.per_layer(torch.randn(2, 6, 5, 16))
    torch.testing.assert_close(per.mean(-1), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(per.var(-1, unbiased=False), torch.ones(2, 3, 5), atol=1e-3, rtol=0)


def test_lim_without_connector_is_projector_norm_mean():
    lim = _lim([1, 4], use_connector=False).eval()
    assert lim.connector is None and lim.connector_in is None
    assert lim.projector.in_features == 16
    states = torch.randn(2, 6, 5, 16)
    w, b = lim.projector.weight, lim.projector.bias
    expected = torch.stack(
        [F.layer_norm(states[:, i] @ w.T + b, (12,), lim.norm.weight, lim.norm.bias, 1e-5) for i in (1, 4)]
    ).mean(0)
    torch.testing.assert_close(lim(states), expected, atol=1e-5, rtol=0)


def test_connector_width_differs_from_vlm_width():
    lim = _lim([0, 3, 5], connector_hidden=8, connector_heads=2).eval()
    assert isinstance(lim.connector_in, nn.Linear)
    assert (lim.connector_in.in_features, lim.connector_in.out_features) == (16, 8)
    assert lim.connector.layers[0].self_attn.q_proj.in_features == 8
    assert lim.projector.in_features == 8 and lim.projector.out_features == 12
    states = torch.randn(2, 6, 5, 16)
    ref_per, ref = _reference(lim, states)
    torch.testing.assert_close(lim.per_layer(states), ref_per, atol=1e-5, rtol=0)
    torch.testing.assert_close(lim(states), ref, atol=1e-5, rtol=0)
    # same width: no input projection
    assert _lim([0], connector_hidden=16).connector_in is None


def test_aggregate_applies_the_per_layer_scale_before_the_mean():
    per = torch.randn(2, 3, 4, 5)
    scale = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1)
    expected = (per[:, 0] + 2 * per[:, 2]) / 3
    torch.testing.assert_close(LayerIntegrationModule.aggregate(per, scale), expected)
    torch.testing.assert_close(LayerIntegrationModule.aggregate(per), per.mean(1))


def test_lim_shape_errors():
    lim = _lim([0, 2])
    with pytest.raises(ValueError, match=r"\(B, L, Q, D\)"):
        lim.per_layer(torch.randn(6, 5, 16))
    with pytest.raises(ValueError, match="got states of 4 layers; expected 6 .* or 2"):
        lim.per_layer(torch.randn(1, 4, 5, 16))
    with pytest.raises(ValueError, match="do not fit a VLM with 6"):
        LayerIntegrationModule(16, 12, [0, 6], 6)
    with pytest.raises(ValueError, match="do not fit"):
        LayerIntegrationModule(16, 12, [], 6)
    with pytest.raises(ValueError, match="not divisible by its 3 heads"):
        LayerIntegrationModule(16, 12, [0], 6, connector_heads=3)


# ------------------------------------------------------------------------------------------------ connector


def test_connector_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    attn = ConnectorAttention(16, 4)
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(3, 7, 16)
    # another kernel, other summation orders (tests/fp32.py): q/k/v projections (16), scores (head dim 4),
    # softmax and weighted sum (7 tokens each), output projection (16)
    expected = ref(x, x, x, need_weights=False)[0]
    assert_close_up_to_order(attn(x), expected, 16 + 4 + 7 + 7 + 16)


def test_connector_layer_is_pre_ln_with_tanh_gelu():
    torch.manual_seed(0)
    conn = Connector(16, 32, num_layers=1, heads=4)
    layer = conn.layers[0]
    assert layer.layer_norm1.eps == 1e-6 and layer.layer_norm2.eps == 1e-6
    x = torch.randn(2, 5, 16)
    h = x + layer.self_attn(F.layer_norm(x, (16,), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-6))
    y = F.layer_norm(h, (16,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-6)
    h = h + layer.mlp.fc2(F.gelu(layer.mlp.fc1(y), approximate="tanh"))
    # the same layer written out by hand: summation orders may differ (tests/fp32.py), 1 layer of width 16,
    # MLP 32, 5 tokens
    assert_close_up_to_order(conn(x), h, decoder_additions(1, 16, 32, 5))
    # OpenUni key names, for checkpoint compatibility
    keys = set(conn.state_dict())
    assert {
        "layers.0.self_attn.q_proj.weight",
        "layers.0.mlp.fc1.weight",
        "layers.0.layer_norm2.bias",
    } <= keys


def test_connector_is_bidirectional_and_position_free():
    torch.manual_seed(0)
    conn = Connector(16, 32, num_layers=2, heads=4).eval()
    x = torch.randn(1, 6, 16)
    y = conn(x)
    x2 = x.clone()
    x2[:, -1] = torch.randn(16)  # change the LAST token: with no causal mask the FIRST one sees it
    assert (conn(x2)[:, 0] - y[:, 0]).abs().max() > 1e-4
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # no positional embedding: permutation equivariant
    # permuted tokens are summed in another order in the attention (tests/fp32.py): 2 layers, 16, 32, 6 tokens
    assert_close_up_to_order(conn(x[:, perm]), y[:, perm], decoder_additions(2, 16, 32, 6))


def test_connector_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    conn = Connector(16, 32, num_layers=2, heads=4).train()
    x = torch.randn(2, 5, 16)
    conn(x).square().sum().backward()
    plain = [p.grad.clone() for p in conn.parameters()]
    conn.zero_grad()
    conn.gradient_checkpointing = True
    conn(x).square().sum().backward()
    for a, p in zip(plain, conn.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_lim_layers_fold_into_one_connector_call():
    lim = _lim([0, 1, 2, 3, 4, 5])
    calls = []
    lim.connector.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    lim(torch.randn(2, 6, 5, 16))
    assert calls == [torch.Size([12, 5, 16])]  # (B * L_sel, Q, D), a single call
