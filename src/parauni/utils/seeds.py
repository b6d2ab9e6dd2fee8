"""Every seed a training loop derives, in one place, each draw named by its purpose.

Two derivations, both fixed (changing one changes every run that uses it):

* :func:`stream_seed` ``(seed, position)``: the draws of one position of a data stream (an example of Stages
  I/II, a step of a Stage-0 fit), independent of how the stream is split over processes and micro-steps;
* :func:`purpose_seed` ``(seed, epoch, purpose, *index)``: the draws of a Stage-III epoch, one stream per
  :class:`Purpose` and sample (or inner epoch), the same on every process.
"""

from __future__ import annotations

from enum import IntEnum

import torch

STREAM_STRIDE = (
    1_000_003  # a prime: seeds of different base seeds do not collide for a stream's first positions
)


class Purpose(IntEnum):
    """What a Stage-III draw is for; its value is a part of the seed."""

    INITIAL_NOISE = 0  # the rollout's starting latent of a sample
    SDE_NOISE = 1  # the rollout's SDE noise of a sample
    LDAM_NOISE = 2  # LDAM's perturbation of a sample's condition
    UPDATE_ORDER = 3  # the shuffle of the samples in an inner epoch of the update
    UPDATE_SAMPLES = 4  # which samples the update keeps (rl.drop_zero_advantage)
    SHARED_LATENT = 5  # the starting latent shared by a prompt draw's group (rl.same_latent)
    NFT_TIMES = 6  # the times a sample is trained at (rl.objective=nft), per sample and inner epoch
    NFT_NOISE = 7  # the forward process's noise of a sample (rl.objective=nft), per sample and inner epoch


def stream_seed(seed: int, position: int) -> int:
    """The seed of ``position`` (an example, or a step) of the data stream of ``seed``."""
    return seed * STREAM_STRIDE + position


def derived_seed(*parts: int) -> int:
    """One 62-bit seed from integer parts (seed, epoch, purpose, sample index): the same on every process."""
    h = 0
    for p in parts:
        h = (h * STREAM_STRIDE + int(p) + 1) % (2**62)
    return h


def purpose_seed(seed: int, epoch: int, purpose: Purpose, *index: int) -> int:
    """The seed of the ``purpose`` draw of ``epoch`` (and of a sample or inner epoch ``index``)."""
    return derived_seed(seed, epoch, int(purpose), *index)


def purpose_generator(seed: int, epoch: int, purpose: Purpose, *index: int) -> torch.Generator:
    """A CPU generator seeded with :func:`purpose_seed`."""
    return torch.Generator().manual_seed(purpose_seed(seed, epoch, purpose, *index))


def purpose_generators(seed: int, epoch: int, purpose: Purpose, indices: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded with :func:`purpose_seed`."""
    return [purpose_generator(seed, epoch, purpose, i) for i in indices]
