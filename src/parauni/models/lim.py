"""The Layer Integration Module (LIM) and layer selection (paper section 3.2; docs/how-it-works.md).

For the query states of the selected VLM layers ``q_i`` (each ``(B, Q, D)``) the LIM computes

    c_i = LN(projector(connector(q_i)))        c = mean_i c_i

with ONE shared connector, projector and LayerNorm for every layer. All selected layers go through the
connector in one batched call: the layer axis is folded into the batch axis.

The connector is a bidirectional pre-LN transformer encoder with the same module names as OpenUni's
(``layers.{i}.self_attn.{q,k,v,out}_proj``, ``layer_norm1``, ``mlp.fc1/fc2``, ``layer_norm2``) so that its
checkpoints map key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

ZONES = ("shallow", "middle", "deep")


def zone_layers(
    num_layers: int, zone: str, bounds: tuple[float, float] | list[float] = (12 / 28, 24 / 28)
) -> list[int]:
    """0-based decoder layer indices of a depth zone, numbered as the paper numbers its zones.

    The paper writes the LIM over ``i in [0, L]``, the L + 1 hidden states (0 the embedding output, i >= 1 the
    output of decoder layer i), and its zones of InternVL3-2B's 28 layers as ``i in [12, 23]`` (middle,
    Aesthetic / PickScore) and ``i in [24, 28]`` (deep, CLIP): five deep indices, which fit 28 layers only in
    this numbering. Decoder layer k (0-based, as everywhere here) is hidden state ``k + 1``; a hidden state i
    is deep when ``i >= round(bounds[1] L)``, middle when ``round(bounds[0] L) <= i`` below that, else
    shallow. For 28 layers: shallow = 0-10, middle = 11-22, deep = 23-27 (the paper's 1-11, 12-23, 24-28);
    other depths scale the boundaries by ``num_layers / 28``. The deep zone always holds the last layer; the
    shallow one is empty when ``round(bounds[0] L) <= 1``.
    """
    if zone not in ZONES:
        raise ConfigError(f"unknown zone {zone!r}; choose one of {list(ZONES)}")
    lo = max(round(bounds[0] * num_layers) - 1, 0)
    hi = max(round(bounds[1] * num_layers) - 1, lo)
    start, stop = {"shallow": (0, lo), "middle": (lo, hi), "deep": (hi, num_layers)}[zone]
    return list(range(start, stop))


def select_layers(
    num_layers: int,
    mode: str = "all",
    layer_list: list[int] | None = None,
    interval: int = 2,
    bounds: tuple[float, float] | list[float] = (12 / 28, 24 / 28),
) -> list[int]:
    """The 0-based decoder layers whose query states condition the DiT.

    Modes: ``all``; ``last`` (the last layer only: OpenUni's baseline when the LIM has no LayerNorm,
    ``lim.use_layernorm=false``, as OpenUni's connector has none); ``list`` (explicit, negative indices allowed);
    ``drop_shallow`` / ``drop_middle`` / ``drop_deep`` (remove one zone); ``interval`` (every ``interval``-th
    layer, ending at the last one).
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers={num_layers} must be >= 1")
    if mode == "all":
        return list(range(num_layers))
    if mode == "last":
        return [num_layers - 1]
    if mode == "list":
        if not layer_list:
            raise ConfigError("layer selection 'list' needs a non-empty layer_list")
        out = []
        for i in layer_list:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(f"layer {i} is out of range for a VLM with {num_layers} decoder layers")
            out.append(j)
        if len(set(out)) != len(out):
            raise ConfigError(f"layer_list {layer_list} repeats a layer")
        return sorted(out)
    if mode.startswith("drop_"):
        dropped = set(zone_layers(num_layers, mode[len("drop_") :], bounds))
        kept = [i for i in range(num_layers) if i not in dropped]
        if not kept:
            raise ConfigError(f"{mode} removes every layer of a {num_layers}-layer VLM")
        return kept
    if mode == "interval":
        if interval < 1:
            raise ConfigError(f"interval={interval} must be >= 1")
        return sorted(range(num_layers - 1, -1, -interval))
    raise ConfigError(f"unknown layer selection {mode!r}")


class ConnectorAttention(nn.Module):
    """Bidirectional multi-head self-attention (no mask, no positional embedding)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"connector width {hidden} is not divisible by its {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, S, W) -> (N, S, W)."""
        n, s, w = x.shape
        q, k, v = (
            p(x).view(n, s, self.heads, w // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, S, W/H)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, w))


class ConnectorMLP(nn.Module):
    """fc1 -> gelu(tanh) -> fc2."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ConnectorLayer(nn.Module):
    """Pre-LN block: x += SelfAttn(LN(x)); x += MLP(LN(x)); LayerNorm eps 1e-6."""

    def __init__(self, hidden: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.self_attn = ConnectorAttention(hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = ConnectorMLP(hidden, intermediate)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Connector(nn.Module):
    """A stack of :class:`ConnectorLayer` without a final norm (OpenUni's connector)."""

    def __init__(self, hidden: int, intermediate: int, num_layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([ConnectorLayer(hidden, intermediate, heads) for _ in range(num_layers)])
        self.gradient_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, S, W) -> (N, S, W)."""
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class LayerIntegrationModule(nn.Module):
    """Shared connector + projector + LayerNorm applied to every selected layer, then the mean.

    With one layer (the last) and ``use_layernorm=False`` this is exactly OpenUni's connector and projector
    (its baseline); with the LayerNorm it is this project's last-layer variant, which OpenUni does not have.

    Args:
        in_dim: the VLM width D.
        out_dim: the DiT's ``caption_channels`` C.
        layers: the 0-based VLM layers that condition the DiT (see :func:`select_layers`).
        num_vlm_layers: L, the VLM's decoder depth (the states handed to :meth:`forward` have all L).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        layers: list[int],
        num_vlm_layers: int,
        use_connector: bool = True,
        connector_hidden: int | None = None,
        connector_intermediate: int = 8960,
        connector_layers: int = 6,
        connector_heads: int = 24,
        use_layernorm: bool = True,
        whiten_queries: int = 0,
        whiten_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        if not layers or min(layers) < 0 or max(layers) >= num_vlm_layers:
            raise ConfigError(f"layers {layers} do not fit a VLM with {num_vlm_layers} decoder layers")
        self.layer_ids = list(layers)  # the selected VLM decoder layers (0-based), from lim.layers' mode
        self.num_vlm_layers = num_vlm_layers
        self.register_buffer("layer_index", torch.tensor(self.layer_ids, dtype=torch.long), persistent=False)
        width = connector_hidden or in_dim
        # OpenUni's "proj_enc_proj" layout when the connector is narrower/wider than the VLM.
        self.connector_in = nn.Linear(in_dim, width) if use_connector and width != in_dim else None
        self.connector = (
            Connector(width, connector_intermediate, connector_layers, connector_heads)
            if use_connector
            else None
        )
        self.projector = nn.Linear(width if use_connector else in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim) if use_layernorm else None
        self.whiten = whiten_queries > 0
        self.whiten_floor = whiten_floor
        if self.whiten:  # identity until fit_whitening; saved with the LIM
            n = len(self.layer_ids)
            self.register_buffer("whiten_mean", torch.zeros(n, whiten_queries, in_dim))
            self.register_buffer("whiten_matrix", torch.eye(in_dim).repeat(n, 1, 1))
            self.register_buffer("whiten_samples", torch.zeros((), dtype=torch.long))

    @property
    def whitened(self) -> bool:
        """Whether the whitening statistics have been estimated (``lim.whiten`` only)."""
        return self.whiten and int(self.whiten_samples) > 0

    @torch.no_grad()
    def fit_whitening(self, states: torch.Tensor) -> None:
        """Estimate the whitening of the query states from ``states`` (N, L or L_sel, Q, D) of N prompts.

        Per selected layer l: the mean over prompts of each query's state (Q, D), and ``W_l = C_l^(-1/2)`` of
        the covariance C_l (D, D) of the states' deviations from it, pooled over the queries, with its
        eigenvalues raised to ``whiten_floor`` x the largest. A frozen VLM can spread what tells prompts apart
        very unevenly over the directions of its states; the connector then learns the large directions first
        and the small ones hardly at all, while whitened every direction starts alike (measured on the shapes
        world in docs/world.md, "What colour attribution loses").
        """
        if not self.whiten:
            raise ConfigError("fit_whitening needs a LIM built with lim.whiten=true")
        states = self._selected(states).float()
        if states.shape[0] < 2:
            raise ValueError(f"fit_whitening needs the states of at least 2 prompts, got {states.shape[0]}")
        mean = states.mean(0)  # (L_sel, Q, D)
        dev = (states - mean).transpose(0, 1).flatten(1, 2)  # (L_sel, N * Q, D)
        cov = dev.mT @ dev / dev.shape[1]
        lam, vec = torch.linalg.eigh(cov)  # ascending, (L_sel, D), (L_sel, D, D)
        lam = lam.clamp_min(lam[:, -1:] * self.whiten_floor)
        self.whiten_matrix.copy_(vec @ torch.diag_embed(lam.rsqrt()) @ vec.mT)
        self.whiten_mean.copy_(mean)
        self.whiten_samples.fill_(states.shape[0])

    def _selected(self, states: torch.Tensor) -> torch.Tensor:
        """(B, L_sel, Q, D): the selected layers of states of all L layers (or already selected ones)."""
        if states.dim() != 4:
            raise ValueError(f"expected query states of shape (B, L, Q, D), got {tuple(states.shape)}")
        if states.shape[1] == self.num_vlm_layers and len(self.layer_ids) != self.num_vlm_layers:
            return states.index_select(1, self.layer_index)
        if states.shape[1] != len(self.layer_ids):
            raise ValueError(
                f"got states of {states.shape[1]} layers; expected {self.num_vlm_layers} (all) or "
                f"{len(self.layer_ids)} (the selected ones)"
            )
        return states

    @property
    def layers(self) -> list[int]:
        """:attr:`layer_ids` under its earlier name (the config's ``lim.layers`` is the mode that selects them)."""
        return self.layer_ids

    def per_layer(self, states: torch.Tensor) -> torch.Tensor:
        """Per-layer conditions ``c_i``.

        Args:
            states: (B, L, Q, D) query states of ALL VLM layers, or (B, L_sel, Q, D) already selected.

        Returns:
            (B, L_sel, Q, C).
        """
        states = self._selected(states)
        if self.whiten:
            m, w = self.whiten_mean.to(states.dtype), self.whiten_matrix.to(states.dtype)
            states = torch.einsum("blqd,lde->blqe", states - m, w)
        b, n_layers, q, d = states.shape
        x = states.reshape(b * n_layers, q, d)  # layers folded into the batch: one connector call
        if self.connector_in is not None:
            x = self.connector_in(x)
        if self.connector is not None:
            x = self.connector(x)
        x = self.projector(x)  # (B * L_sel, Q, C)
        if self.norm is not None:
            x = self.norm(x)
        return x.view(b, n_layers, q, -1)

    @staticmethod
    def aggregate(per_layer: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over layers, optionally after a multiplicative per-layer factor (LDAM's ``1 + gamma*eps``).

        per_layer: (B, L_sel, Q, C); scale: broadcastable to it. Returns (B, Q, C).
        """
        if scale is not None:
            per_layer = per_layer * scale
        return per_layer.mean(dim=1)

    def forward(self, states: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """states: (B, L, Q, D) -> condition (B, Q, C)."""
        return self.aggregate(self.per_layer(states), scale)
