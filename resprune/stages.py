"""Stage: one pruning step of a pipeline, where it acts and what it runs.

A stage acts on the patch tokens **inside the vision tower** (``vision_layer=K``: the
tower's ``hidden_states[K]``, entering encoder layer K, CLS protected), on the visual tokens
**before** the LLM (the ``input`` stage, projector outputs), or on the hidden states
**entering decoder layer K** (``layer=K``). Each has its own scorers, selector, budget and
optional merger::

    Stage("topk", budget=0.5, layer=2, scorers=["llm_attention"])   # FastV
    Stage("topk", budget=288, vision_layer=12, scorers=["cls_attention"])  # inside the tower

Scorers write named scores, the selector picks ``k - slots`` tokens, and a merger (if any)
turns the dropped tokens into ``slots`` more, so ``k`` tokens leave the stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from .budget import Budget, check_budget, resolve_budget
from .context import PruneContext
from .errors import ConfigError, InvalidInputError, MissingContextError
from .interfaces import Merger, Scorer, Selector
from .selection import DeferredChecks, Selection, check_scores, make_merger, make_scorer, make_selector, \
    run_merger, run_scorer, run_selector

__all__ = ["Stage"]

ScorerSpec = str | Scorer | tuple[str, str | Scorer]

POSITIONS = ("keep", "reindex")
"""What a stage inside the LLM does with the positions of the tokens it keeps."""


class Stage:
    """Scorers -> selector (-> merger) under a budget, at the input or at decoder layer ``layer``.

    Args:
        selector: a registry name or a ``Selector`` instance.
        budget: tokens kept per image (int), or the share kept (float in (0, 1]) of the tokens
            entering the stage.
        scorers: scorer names or instances, or ``(score_name, scorer)`` pairs.
        merger: a merger name or instance, or ``None``.
        layer: ``None`` for the input stage, else the decoder layer ``K >= 1``.
        vision_layer: a vision-encoder layer ``K >= 0`` instead (``hidden_states[K]``, the input
            of encoder layer K); the budget counts patch tokens per tile.
        positions: inside the LLM, ``"keep"`` the kept tokens' original positions (FastV, DART)
            or ``"reindex"`` them 0, 1, ... over each row's kept tokens (PyramidDrop).
    """

    def __init__(self, selector: str | Selector, *, budget: Budget, scorers: Iterable[ScorerSpec] = (),
                 merger: str | Merger | None = None, layer: int | None = None, positions: str = "keep",
                 vision_layer: int | None = None) -> None:
        for name, value in (("layer", layer), ("vision_layer", vision_layer)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                hint = f" ({name}={int(value)})" if isinstance(value, str) and value.strip().isdigit() else ""
                raise ConfigError(f"stage {name}={value!r}: a layer number must be an int, got a "
                                  f"{type(value).__name__}{hint}.")
        if vision_layer is not None:
            if vision_layer < 0:
                raise ConfigError(f"stage vision_layer={vision_layer!r}: a stage inside the vision tower acts on "
                                  f"hidden_states[K] of the tower, K >= 0 (0: the embeddings).")
            if layer is not None or positions != "keep":
                raise ConfigError(f"stage vision_layer={vision_layer}: a stage is inside the vision tower or inside the "
                                  f"LLM (layer=, positions=), not both.")
        if layer is not None and layer < 1:
            raise ConfigError(f"stage layer={layer!r}: an in-LLM stage acts on decoder layer K >= 1 (scores come "
                              f"from layer K-1); use layer=None for the input stage.")
        if positions not in POSITIONS or (positions == "reindex" and layer is None):
            raise ConfigError(f"stage positions={positions!r}: 'keep', or 'reindex' for a stage inside the LLM "
                              f"(the input stage's tokens take their places in the prompt).")
        self.layer = layer
        self.vision_layer = vision_layer
        self.positions = positions
        self.selector = make_selector(selector)
        if self.selector.adaptive and (layer is not None or vision_layer is not None):
            raise ConfigError(f"{self.where} stage: selector '{self.selector.name}' decides each image's count "
                              f"(adaptive); it runs in the input stage, one image at a time.")
        self.budget = check_budget(budget, where=f"{self.where} stage budget")
        if merger is None and self.selector.default_merger is not None:
            merger = self.selector.default_merger  # a selector whose picks mean nothing unmerged (pool)
        self.merger = None if merger is None else make_merger(merger)
        if self.merger is not None and self.merger.selector not in (None, self.selector.name):
            raise ConfigError(f"{self.where} stage: merger '{self.merger.name}' merges what selector "
                              f"'{self.merger.selector}' picks, not selector '{self.selector.name}'; use "
                              f"selector: {self.merger.selector} (it runs this merger by itself).")
        self.scorers: list[tuple[str, Scorer]] = []
        for item in scorers:
            out, scorer = item if isinstance(item, tuple) else (None, item)
            scorer = make_scorer(scorer)
            self.scorers.append((out or scorer.output, scorer))
        names = [n for n, _ in self.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{self.where} stage: two scorers write score '{dupes[0]}'; rename one (output=...).")
        parts = [(f"scorer '{s.name}'", frozenset(s.requires)) for _, s in self.scorers]
        parts.append((f"selector '{self.selector.name}'", frozenset(self.selector.requires)))
        if self.merger is not None:
            parts.append((f"merger '{self.merger.name}'", frozenset(self.merger.requires)))
        self._requirements = tuple(parts)
        self._requires = frozenset().union(*(needs for _, needs in parts))

    @property
    def where(self) -> str:
        """``"vision layer K"``, ``"input"`` or ``"layer K"``."""
        if self.vision_layer is not None:
            return f"vision layer {self.vision_layer}"
        return "input" if self.layer is None else f"layer {self.layer}"

    @property
    def in_vision_tower(self) -> bool:
        return self.vision_layer is not None

    @property
    def score_names(self) -> list[str]:
        return [n for n, _ in self.scorers]

    def requirements(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """``(who, context fields)`` for each scorer, the selector and the merger, in running order."""
        return self._requirements

    @property
    def requires(self) -> frozenset[str]:
        """Every context field the stage's strategies need."""
        return self._requires

    def budget_for(self, n: int) -> int:
        """Tokens kept out of the ``n`` entering the stage (a selector that resized the image to a
        float budget before the processor keeps them all)."""
        if self.selector.resizes_images and isinstance(self.budget, float):
            return n
        return resolve_budget(self.budget, n)

    def run(self, context: PruneContext, *, scores: Mapping[str, Tensor] | None = None,
            k: int | None = None, deferred: DeferredChecks | None = None) -> Selection:
        """Score, select (and merge) the batch of ``context`` (tokens ``[B, N, d]``).

        ``deferred``: keep the checks of the plugins' output values on the device (stages
        inside the LLM read them after the forward pass)."""
        for requester, needs in self._requirements:  # all of it up front, before any scorer runs
            context.check(needs, requester=f"{requester} ({self.where} stage)")
        tokens = context.tokens
        b, n = tokens.shape[:2]
        computed = check_scores(scores, b, n)
        for name, scorer in self.scorers:
            computed[name] = run_scorer(scorer, context, checked=True, deferred=deferred)
        k = self.budget_for(n) if k is None else min(int(k), n)
        if self.selector.adaptive:  # the selector decides each image's count, up to the budget
            counts = self.selector.count(MappingProxyType(computed), context)
            if len(set(counts)) > 1:
                raise InvalidInputError(f"selector '{self.selector.name}' ({self.where} stage) keeps {counts} tokens of "
                                        f"the {b} images of one batch; an adaptive count runs one image at a time.")
            k = max(1, min(k, counts[0]))
        slots = extra = 0
        if self.merger is not None and k < n:
            slots = int(self.merger.slots(k, n))
            if not 0 <= slots < k:
                raise ConfigError(f"merger '{self.merger.name}' asked for {slots} of {k} tokens; a merger makes "
                                  f"0 to k-1 of them (the selector needs at least one).")
            missing = sorted(self.merger.required_scores() - set(computed))
            if missing:
                raise MissingContextError(f"merger '{self.merger.name}' ({self.where} stage) reads score '{missing[0]}', "
                                          f"which no scorer of the stage wrote (it has: "
                                          f"{', '.join(sorted(computed)) or 'none'}).")
            extra = int(self.merger.extra(k - slots, n))
            if not 0 <= extra <= n - k:
                raise ConfigError(f"merger '{self.merger.name}' asked for {extra} tokens on top of {k} of {n}; it "
                                  f"can make 0 to {n - k} (one per dropped token at most).")
        order = run_selector(self.selector, tokens, k - slots, computed, context, checked=True, deferred=deferred)
        kept = order.sort(dim=-1).values
        if self.merger is None or k >= n:
            return Selection(kept=kept, order=order, k=k, n=n, scores=computed)
        indices, features = run_merger(self.merger, tokens, kept, slots + extra, computed, context, deferred=deferred)
        places = indices.sort(dim=1).values
        merged = _added(indices, kept, n)  # the carriers of merged tokens come after the picks, in order
        return Selection(kept=places, order=torch.cat([order, merged], dim=1), k=k + extra, n=n, scores=computed,
                         features=features, sources=indices, merged=slots + extra)  # the merger's order

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "at": self.where,
            "budget": self.budget,
            "scorers": [{**s.describe(), "output": n} for n, s in self.scorers],
            "selector": self.selector.describe(),
        }
        if self.merger is not None:
            out["merger"] = self.merger.describe()
        if self.positions != "keep":  # only then: runs recorded before the option keep their keys
            out["positions"] = self.positions
        return out

    def summary(self) -> str:
        """One line: where, budget, scorers, the selector's changed params, the merger."""
        sel = self.selector
        defaults = type(sel).Params()
        changed = {k: v for k, v in vars(sel.params).items() if getattr(defaults, k) != v}
        args = ", ".join(f"{k}={v}" for k, v in changed.items())
        scorers = ", ".join(n if n == s.name else f"{s.name}->{n}" for n, s in self.scorers) or "none"
        merger = f"; merger: {self.merger.name}" if self.merger is not None else ""
        positions = "; positions re-indexed" if self.positions == "reindex" else ""
        return f"{self.where}: budget {self.budget}; scorers: {scorers}; selector: {sel.name}({args}){merger}{positions}"

    def __repr__(self) -> str:
        scorers = ", ".join(f"{n}={s!r}" for n, s in self.scorers)
        merger = f", merger={self.merger!r}" if self.merger is not None else ""
        return f"Stage({self.where}, budget={self.budget!r}, scorers=[{scorers}], selector={self.selector!r}{merger})"


def _added(indices: Tensor, kept: Tensor, n: int) -> Tensor:
    """The entries of each row of ``indices`` that are not in ``kept`` (ascending), ``[B, slots]``
    (no host read: a stable sort puts them first)."""
    b = indices.shape[0]
    is_kept = torch.zeros(b, n, dtype=torch.bool, device=indices.device).scatter_(1, kept.to(indices.device), True)
    extra = ~is_kept.gather(1, indices)
    slots = indices.shape[1] - kept.shape[1]
    first = torch.sort(extra.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :slots]
    return indices.gather(1, first)
