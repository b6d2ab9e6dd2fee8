"""How far two float32 computations of the same values may differ when they differ only in the order of
their sums (another kernel, batch shape, fused path or library): a bound derived from fp32 rounding, not read
off one machine (issue 17: a bound of 1e-6 set from an Intel figure failed at 1.9e-6 on an AMD EPYC).

* Each addition rounds by at most u = eps32 / 2 = 2^-24 relative. Rounding errors of independent sign make a
  sum of n terms, in any order, lie within about lambda * sqrt(n) * u * (sum of |terms|) of the exact sum,
  with probability at least 1 - 2n exp(-lambda^2 / 2) (Higham and Mary, "A new approach to probabilistic
  rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019); lambda = 8 makes that 1 - n * 2.5e-14.
  The worst case, n * u, needs every rounding to fall the same way and is not what two kernels produce.
* Along a computation the rounding errors of its successive sums add up in the same way (normalisations and
  softmaxes in between do not amplify them at these sizes: their inputs are O(1)), so n is the length of
  that chain, ``additions``: the reduction lengths met on the way to one output value, counted by each test
  from the model's sizes. "sum of |terms|" is taken as the largest |value| of the result, the values' scale.

The bound is ``8 * sqrt(additions) * u * max|expected|``. Which order a machine takes, hence the exact
difference, depends on its CPU and BLAS; the differences seen so far are a few ulps (at most 2.2e-7 of the
values' scale), 20-100x below these bounds. A real error stays well above them: shifting the tiny VLM's query
positions by one moves its query states by 2.5e-3, 31x its bound of 8e-5.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
LAMBDA = 8.0  # the probabilistic bound's confidence parameter: it fails with probability below n * 2.5e-14


def relative_order_tolerance(additions: int) -> float:
    """The relative difference two summation orders of a chain of ``additions`` fp32 additions may cause."""
    return LAMBDA * math.sqrt(additions) * EPS32 / 2


def order_tolerance(expected: torch.Tensor, additions: int) -> float:
    """The largest |difference| two summation orders may cause, relative to the values' scale max|expected|."""
    return relative_order_tolerance(additions) * float(expected.detach().abs().max())


def decoder_additions(layers: int, width: int, intermediate: int, seq: int) -> int:
    """The chain of one output of a pre-norm transformer decoder: per layer two norms, the q/k/v and output
    projections and the MLP's input projection (width each), the MLP's output projection (intermediate) and
    the attention's softmax and weighted sum (seq each)."""
    return layers * (5 * width + intermediate + 2 * seq)


def assert_close_up_to_order(actual: torch.Tensor, expected: torch.Tensor, additions: int) -> None:
    """``actual`` equals ``expected`` up to :func:`order_tolerance` (absolute, relative to the values' scale)."""
    torch.testing.assert_close(actual, expected, atol=order_tolerance(expected, additions), rtol=0)


def dit_additions(config, tokens: int, queries: int) -> int:
    """The chain of one velocity value of a SANA DiT (diffusers config ``config``) over ``tokens`` image
    tokens and ``queries`` condition tokens: per layer a decoder layer's chain (its linear attention sums over
    the tokens too), the MLP's 3x3 depthwise convolution (9) and the cross-attention (query projection,
    key/value projections of the caption, softmax and weighted sum over the queries)."""
    width = config.num_attention_heads * config.attention_head_dim
    mlp = int(width * config.mlp_ratio)
    cross = width + config.caption_channels + 2 * queries
    return decoder_additions(config.num_layers, width, mlp, tokens) + config.num_layers * (9 + cross)
