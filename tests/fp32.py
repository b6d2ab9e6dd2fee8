"""How far two float32 computations of the same values may differ when they differ only in the order of
their sums (another kernel, batch shape, fused path or library): a bound derived from fp32 rounding, not read
off one machine (issue 17: a bound of 1e-6 set from an Intel figure failed at 1.9e-6 on an AMD EPYC).

* One addition rounds by at most eps32 / 2 relative (eps32 = 2^-23 = 1.19e-7), so a sum of n terms in any
  order is within about n * eps32 * (sum of |terms|) of the exact sum (Higham, *Accuracy and Stability of
  Numerical Algorithms*, 2nd ed., section 4.2); two orders are within twice that of each other.
* Along a computation the errors of its successive sums add up; normalisations and softmaxes in between do
  not amplify them at these sizes (their inputs are O(1)). ``additions`` is the length of that chain: the
  sum of the reduction lengths met on the way to one output value, counted by each test from the model's
  sizes.
* "sum of |terms|" is taken as the largest |value| of the result, the values' scale; the bound is therefore
  ``additions * eps32 * max|expected|``. Random-sign terms cancel (their |sum| is about sqrt(n) below the
  sum of their sizes), while their rounding errors, of random sign too, grow like sqrt(n) rather than n:
  the two effects are of the same order, so the linear count stands for both.

Which order a machine takes, hence the exact difference, depends on its CPU and BLAS; a real error (a wrong
position, mask, layer, token or weight) moves values by a sizeable fraction of their scale, orders of
magnitude above these bounds at the sizes of the tiny test models.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def order_tolerance(expected: torch.Tensor, additions: int) -> float:
    """The largest |difference| two summation orders may cause: ``additions * eps32 * max|expected|``."""
    return additions * EPS32 * float(expected.detach().abs().max())


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
