"""A teacher for ``train.condition_distill`` that any ParaUni has: its own frozen language model.

Trained from scratch with the paper's flow loss alone, a small ParaUni's condition collapses to one for every
prompt (issue 18: spread across prompts 0.0017 of its norm after 300 steps on digits, prompt accuracy at
chance), because the query states of prompts that differ in one word differ by a few per cent and the DiT
first learns the unconditional images. The shapes world distils the condition towards the text encoder its
DiT was pretrained with; a DiT trained from scratch has none, so this teacher is the LM itself:

    prompt -> the frozen LM (template applied, no queries) -> last-layer states (B, S, D)
           -> mean over real tokens -> standardised over channels -> fixed random projection D -> C  (B, 1, C)

:func:`parauni.diffusion.flow.condition_match_loss` then pulls the condition's first token towards it, and
its variation across the batch towards the teacher's, so the condition tells prompts apart as the LM does.
The projection is seeded and never trains; at generation time nothing of it is used. A departure from the
paper, on only when ``train.condition_distill > 0``.
"""

from __future__ import annotations

import torch

from ..models.parauni import ParaUni, distinct_prompts


def lm_teacher(model: ParaUni, seed: int = 0):
    """``captions (None = unconditional) -> (states (B, 1, C), mask (B, 1))`` from ``model``'s own frozen LM.

    C is the DiT's ``caption_channels`` (the width of the condition); the projection (D, C) has N(0, 1/D)
    entries drawn from ``seed``, so a standardised state maps to about unit RMS per channel.
    """
    vlm = model.vlm
    width = model.dit.config.caption_channels
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(vlm.hidden_size, width, generator=gen) / vlm.hidden_size**0.5  # (D, C)

    @torch.no_grad()
    def teacher(captions: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, rows = distinct_prompts(vlm.encode_prompts(captions).to(model.device))  # (U, S), (B,)
        out = vlm.decoder(inputs_embeds=vlm.prompt_embeds(batch), attention_mask=batch.attention_mask)
        states = out.last_hidden_state.float()  # (U, S, D)
        keep = batch.attention_mask[..., None].float()
        pooled = (states * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (U, D)
        pooled = (pooled - pooled.mean(-1, keepdim=True)) / pooled.std(-1, keepdim=True).clamp_min(1e-6)
        target = (pooled @ projection.to(pooled.device))[rows]  # (B, C)
        return target[:, None], torch.ones(len(captions), 1, device=target.device)

    return teacher
