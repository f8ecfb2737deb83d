"""Scores computed from the tokens alone: norm, mean_similarity, center."""

from __future__ import annotations

import torch
from torch import Tensor

from resprune import hookimpl
from resprune.context import PruneContext
from resprune.interfaces import Scorer


class Norm(Scorer):
    """``||v_i||_2``; its argmax is the paper's Qwen2.5-VL seed."""

    name = "norm"
    output = "norm"
    description = "L2 norm of each token"

    def score(self, context: PruneContext) -> Tensor:
        return context.tokens.norm(dim=-1)


class MeanSimilarity(Scorer):
    """Cosine similarity of each token to the mean visual token (Table VII, S4)."""

    name = "mean_similarity"
    output = "mean_similarity"
    description = "cosine similarity to the mean token"

    def score(self, context: PruneContext) -> Tensor:
        v = context.tokens
        mean = v.mean(dim=1, keepdim=True)
        return torch.nn.functional.cosine_similarity(v, mean.expand_as(v), dim=-1, eps=1e-12)


class Center(Scorer):
    """Closeness to the centre of the image: minus the distance in grid units (Table VII, S5).

    Tokens without a position (NaN, e.g. LLaVA-NeXT newlines) score below every other.
    """

    name = "center"
    output = "center"
    description = "minus the distance to the image centre"
    requires = frozenset({"positions"})

    def score(self, context: PruneContext) -> Tensor:
        pos = torch.as_tensor(context.get("positions", requester="scorer 'center'"),
                              dtype=torch.float32, device=context.tokens.device)
        spatial = ~torch.isnan(pos).any(dim=-1)
        if not bool(spatial.any()):
            return torch.zeros(context.tokens.shape[:2], device=context.tokens.device)
        p = pos[spatial]
        centre = (p.min(dim=0).values + p.max(dim=0).values) / 2
        dist = (pos - centre).norm(dim=-1)
        worst = dist[spatial].max() + 1.0
        score = -torch.where(spatial, dist, worst)
        return score.unsqueeze(0).expand(context.batch_size, -1).contiguous()


@hookimpl
def resprune_register_scorers(register):
    register(Norm)
    register(MeanSimilarity)
    register(Center)
