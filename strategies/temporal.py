"""Scores of a video's tokens over time.

``temporal_change``: how much a token differs from the token at the same place in the previous
frame. This is Efficient Video Sampling (EVS), as vLLM runs it for Qwen2.5-VL
(``vllm/multimodal/evs.py``, ``compute_retention_mask``; checked against vllm-project/vllm @ 094f117):
- the score is 1 minus the cosine similarity of the projector outputs of consecutive frames at one
  place;
- every token of the first frame scores 255, so it is kept first;
- top-k by the score, ties to the lower index (``topk``), keeps what changed.

The ``evs`` config pairs the two. A budget below one frame's tokens keeps part of the first
frame, where vLLM's count (``max(tokens per frame, int(N (1 - q)))``) would keep all of it: the
stage's budget rules here. Tokens after the last frame's grid that have no place in it (the
newline LLaVA-OneVision appends to a video) score 255 like the first frame: vLLM runs EVS on
Qwen only, so this is the project's choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.errors import InvalidInputError
from resprune.interfaces import Scorer

FIRST_FRAME = 255.0
"""The score of every token of the first frame (vLLM's constant): above any dissimilarity (at most 2)."""


class TemporalChange(Scorer):
    """1 - cosine similarity to the same place in the previous frame; 255 for the first frame (EVS)."""

    name = "temporal_change"
    output = "temporal_change"
    description = "EVS: 1 - cosine to the same place in the previous frame (first frame 255)"
    requires = frozenset({"frames"})

    def score(self, context: PruneContext) -> Tensor:
        tokens = context.tokens
        b, n, d = tokens.shape
        frames = torch.as_tensor(context.get("frames", requester="scorer 'temporal_change'")).to(tokens.device)
        t = int(frames.max()) + 1 if frames.numel() else 0
        per = int((frames == 0).sum()) if t else 0  # one frame's grid
        grid = per * t
        expected = torch.arange(t, device=tokens.device).repeat_interleave(per)
        if t == 0 or grid > n or not torch.equal(frames[:grid].long(), expected) or \
                bool((frames[grid:] != t - 1).any()):
            raise InvalidInputError(f"scorer 'temporal_change' needs a video's tokens frame by frame, the same number "
                                    f"in each ({n} tokens; frames {frames[:8].tolist()}...).")
        v = tokens[:, :grid].float().view(b, t, per, d)
        change = 1 - torch.nn.functional.cosine_similarity(v[:, 1:], v[:, :-1], dim=-1)
        first = torch.full((b, 1, per), FIRST_FRAME, device=tokens.device, dtype=change.dtype)
        placeless = torch.full((b, n - grid), FIRST_FRAME, device=tokens.device, dtype=change.dtype)
        return torch.cat([torch.cat([first, change], dim=1).view(b, grid), placeless], dim=1)


@hookimpl
def resprune_register_scorers(register):
    register(TemporalChange)
