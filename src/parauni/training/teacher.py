"""A teacher for ``train.condition_distill`` that any ParaUni has: its own frozen language model.

Trained from scratch with the paper's flow loss alone, a small ParaUni's condition collapses to one for every
prompt (issue 18: spread across prompts 0.0017 of its norm after 300 steps on digits, prompt accuracy at
chance), because the query states of prompts that differ in one word differ by a few per cent and the DiT
first learns the unconditional images. The shapes world distils the condition towards the text encoder its
DiT was pretrained with; a DiT trained from scratch has none, so this teacher is the LM itself:

    prompt -> the frozen LM (template applied, no queries) -> last-layer states (B, S, D)
           -> mean over real tokens (B, D) -> standardised -> one fixed random projection D -> C per query
           token (B, Q, C)

Standardised: with the training captions given, each channel is centred and scaled by its mean and standard
deviation over those captions (and the unconditional prompt), so the targets keep only what tells the
captions apart, at unit scale; without them, each state is standardised over its own channels. The part
every caption shares dominates an LM's states (all-MiniLM-L6-v2's ten digit captions: spread 0.33 of the
norm after standardising over channels; a random LM's 0.05) and a DiT trained from scratch learns to use a
condition that varies that little far more slowly (docs/own-data.md).

:func:`parauni.diffusion.flow.condition_match_loss` then pulls each query token of the condition towards its
target, and its variation across the batch towards the teacher's, so the condition tells prompts apart as the
LM does. The projections are seeded and never train; at generation time nothing of this is used. A departure
from the paper, on only when ``train.condition_distill > 0``.
"""

from __future__ import annotations

import random

import torch

from ..models.parauni import ParaUni, distinct_prompts

MAX_CAPTIONS = 1024  # distinct training captions the channel statistics are taken over (a seeded sample)


def lm_teacher(model: ParaUni, seed: int = 0, captions: list[str] | None = None, batch_size: int = 64):
    """``captions (None = unconditional) -> (states (B, Q, C), mask (B, Q))`` from ``model``'s own frozen LM.

    Q is the model's number of query tokens, C the DiT's ``caption_channels`` (the width of the condition);
    each token's projection (D, C) has N(0, 1/D) entries drawn from ``seed``, so a standardised state maps
    to about unit RMS per channel.

    Args:
        captions: the training captions; each channel of the pooled states is standardised by its mean and
            standard deviation over (a seeded sample of at most ``MAX_CAPTIONS`` of) the distinct ones and the
            unconditional prompt. ``None``: every pooled state is standardised over its own channels.
        batch_size: prompts per LM call when taking those statistics.
    """
    vlm = model.vlm
    width, tokens = model.dit.config.caption_channels, model.queries.shape[0]
    gen = torch.Generator().manual_seed(seed)
    projection = (
        torch.randn(tokens, vlm.hidden_size, width, generator=gen) / vlm.hidden_size**0.5
    )  # (Q, D, C)

    @torch.no_grad()
    def pooled_states(texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) mean last-layer state of each distinct prompt, and each text's row in them (B,)."""
        batch, rows = distinct_prompts(vlm.encode_prompts(texts).to(model.device))  # (U, S), (B,)
        out = vlm.decoder(inputs_embeds=vlm.prompt_embeds(batch), attention_mask=batch.attention_mask)
        keep = batch.attention_mask[..., None].float()
        return (out.last_hidden_state.float() * keep).sum(1) / keep.sum(1).clamp_min(1.0), rows

    centre = scale = None
    if captions:
        distinct = sorted(set(captions))
        if len(distinct) > MAX_CAPTIONS:
            distinct = random.Random(seed).sample(distinct, MAX_CAPTIONS)
        texts: list[str | None] = [*distinct, None]
        pooled = torch.cat(
            [pooled_states(texts[i : i + batch_size])[0] for i in range(0, len(texts), batch_size)]
        )
        centre = pooled.mean(0)  # (D,)
        scale = pooled.std(0).clamp_min(1e-6 * float(pooled.std(0).max().clamp_min(1e-12)))  # (D,)

    @torch.no_grad()
    def teacher(captions: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, rows = pooled_states(captions)  # (U, D), (B,)
        if centre is None:
            pooled = (pooled - pooled.mean(-1, keepdim=True)) / pooled.std(-1, keepdim=True).clamp_min(1e-6)
        else:
            pooled = (pooled - centre.to(pooled.device)) / scale.to(pooled.device)
        target = torch.einsum("ud,qdc->uqc", pooled, projection.to(pooled.device))[rows]  # (B, Q, C)
        return target, torch.ones(len(captions), tokens, device=target.device)

    return teacher
