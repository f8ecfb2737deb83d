"""Running scorers and selectors safely, and the functional API ``select`` / ``score``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .budget import Budget, resolve_budget
from .context import PruneContext
from .errors import InvalidInputError, PluginContractError
from .interfaces import Scorer, Selector, Strategy
from .plugins import get_host

__all__ = ["Selection", "select", "score", "check_tokens", "check_scores", "run_scorer", "run_selector",
           "make_selector", "make_scorer"]

Order = Literal["sorted", "selection"]


@dataclass
class Selection:
    """The tokens kept for a batch of ``B`` images with ``N`` tokens each.

    Attributes:
        kept: int64 ``[B, k]`` kept indices in original (ascending) order; what the LLM gets.
        order: int64 ``[B, k]`` the same indices in the order the selector picked them.
        k: tokens kept per image.
        n: tokens per image before pruning.
        scores: the named scores that were computed, ``[B, N]`` each.
    """

    kept: Tensor
    order: Tensor
    k: int
    n: int
    scores: dict[str, Tensor] = field(default_factory=dict)

    def mask(self) -> Tensor:
        """Boolean ``[B, N]``, True where a token is kept."""
        m = torch.zeros(self.kept.shape[0], self.n, dtype=torch.bool, device=self.kept.device)
        return m.scatter_(1, self.kept, True)


def provider(strategy: Strategy | type[Strategy]) -> str:
    """Name of the plugin that registered ``strategy``'s class (for error messages)."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    registry = {"scorer": get_host().scorers, "selector": get_host().selectors,
                "injector": get_host().injectors}.get(cls.kind)
    if registry is not None and cls.name in registry:
        entry = registry.entry(cls.name)
        if entry.cls is cls:
            return entry.plugin
    return cls.__module__


def check_tokens(tokens: Any, *, where: str = "tokens") -> Tensor:
    """Validate visual tokens and return them as float32 ``[B, N, d]``."""
    if not isinstance(tokens, Tensor):
        raise InvalidInputError(f"{where} must be a torch.Tensor [N, d] or [B, N, d], got {type(tokens).__name__}.")
    if tokens.dim() not in (2, 3):
        raise InvalidInputError(f"{where} must be 2-D [N, d] or 3-D [B, N, d], got shape {tuple(tokens.shape)}.")
    if not tokens.is_floating_point():
        raise InvalidInputError(f"{where} must be a floating-point tensor, got dtype {tokens.dtype}.")
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    if 0 in tokens.shape:
        raise InvalidInputError(f"{where} is empty: shape {tuple(tokens.shape)} (need B, N, d >= 1).")
    tokens = tokens.float()
    # one cheap reduction; the full scan only runs when the sum is not finite (NaN/Inf, or overflow)
    if not bool(torch.isfinite(tokens.sum())) and not bool(torch.isfinite(tokens).all()):
        bad = (~torch.isfinite(tokens)).nonzero()[0].tolist()
        raise InvalidInputError(f"{where} contains NaN or Inf (first at index {bad} of shape {tuple(tokens.shape)}).")
    return tokens


def check_scores(scores: Mapping[str, Any] | None, b: int, n: int, *, where: str = "scores") -> dict[str, Tensor]:
    """Validate named scores against ``B`` images of ``N`` tokens; return float32 ``[B, N]``."""
    out: dict[str, Tensor] = {}
    for name, value in (scores or {}).items():
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        if value.dim() == 1 and b == 1:
            value = value.unsqueeze(0)
        if tuple(value.shape) != (b, n):
            raise InvalidInputError(
                f"{where}['{name}'] has shape {tuple(value.shape)}, but there are {b} image(s) of N={n} "
                f"tokens: expected {(b, n) if b > 1 else (n,)}.")
        value = value.float()
        if not bool(torch.isfinite(value).all()):
            raise InvalidInputError(f"{where}['{name}'] contains NaN or Inf.")
        out[name] = value
    return out


def run_scorer(scorer: Scorer, context: PruneContext) -> Tensor:
    """Run ``scorer`` and check its output is a finite float ``[B, N]``; name the plugin if not."""
    context.check(scorer.requires, requester=f"scorer '{scorer.name}'")
    result = scorer.score(context)
    b, n = context.batch_size, context.num_tokens
    if not isinstance(result, Tensor) or tuple(result.shape) != (b, n) or not result.is_floating_point():
        got = f"shape {tuple(result.shape)} {result.dtype}" if isinstance(result, Tensor) else type(result).__name__
        raise PluginContractError(
            f"scorer '{scorer.name}' (plugin '{provider(scorer)}') returned {got}; "
            f"a scorer must return a float tensor of shape [B, N] = {(b, n)}.")
    if not bool(torch.isfinite(result).all()):
        raise PluginContractError(f"scorer '{scorer.name}' (plugin '{provider(scorer)}') returned NaN or Inf scores.")
    return result.float()


def run_selector(selector: Selector, tokens: Tensor, k: int, scores: Mapping[str, Tensor],
                 context: PruneContext) -> Tensor:
    """Run ``selector`` and check it returned ``k`` distinct in-range int64 indices per row."""
    missing = sorted(selector.required_scores() - set(scores))
    if missing:
        raise InvalidInputError(
            f"selector '{selector.name}' needs score '{missing[0]}' ({selector!r}), but "
            f"{'only ' + str(sorted(scores)) if scores else 'no scores'} were given. Pass scores={{'{missing[0]}': ...}} "
            f"or add a scorer that writes it.")
    context.check(selector.requires, requester=f"selector '{selector.name}'")
    b, n = tokens.shape[:2]
    out = selector.select(tokens, k, scores, context)
    who = f"selector '{selector.name}' (plugin '{provider(selector)}')"
    if not isinstance(out, Tensor) or tuple(out.shape) != (b, k):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise PluginContractError(f"{who} returned {got}; expected int64 indices of shape [B, k] = {(b, k)}.")
    if out.dtype != torch.long:
        raise PluginContractError(f"{who} returned dtype {out.dtype}; expected torch.int64 indices.")
    if k and (bool((out < 0).any()) or bool((out >= n).any())):
        raise PluginContractError(f"{who} returned indices outside [0, {n}).")
    if k > 1 and bool((out.sort(dim=-1).values.diff(dim=-1) == 0).any()):
        raise PluginContractError(f"{who} returned duplicate indices; the {k} picks must be distinct.")
    return out


def make_selector(selector: str | Selector, params: Mapping[str, Any] | None = None) -> Selector:
    """A selector instance from a registry name (with params) or an instance."""
    if isinstance(selector, Selector):
        if params:
            raise TypeError("pass params only with a selector name, not with a Selector instance")
        return selector
    return get_host().selectors.get(selector)(dict(params or {}))


def make_scorer(scorer: str | Scorer, params: Mapping[str, Any] | None = None) -> Scorer:
    """A scorer instance from a registry name (with params) or an instance."""
    if isinstance(scorer, Scorer):
        if params:
            raise TypeError("pass params only with a scorer name, not with a Scorer instance")
        return scorer
    return get_host().scorers.get(scorer)(dict(params or {}))


def _context(tokens: Tensor, context: PruneContext | Mapping[str, Any] | None) -> PruneContext:
    if isinstance(context, PruneContext):
        if context.tokens.shape[:2] != tokens.shape[:2]:
            raise InvalidInputError(f"context tokens {tuple(context.tokens.shape)} do not match tokens {tuple(tokens.shape)}.")
        return context
    return PruneContext(tokens, source="resprune.select", **dict(context or {}))


def select(
    tokens: Tensor,
    budget: Budget,
    *,
    selector: str | Selector = "residual_energy",
    scores: Mapping[str, Any] | None = None,
    order: Order = "sorted",
    context: PruneContext | Mapping[str, Any] | None = None,
    **params: Any,
) -> Tensor:
    """Pick the tokens to keep.

    Args:
        tokens: ``[N, d]`` or ``[B, N, d]`` (equal-size images), any float dtype, CPU or
            CUDA. The math runs in float32.
        budget: tokens kept per image (int) or the share kept (float in (0, 1]).
        selector: registry name or a ``Selector`` instance.
        scores: score name -> ``[N]`` / ``[B, N]`` (e.g. ``{"relevance": r}``).
        order: ``"sorted"`` (original order, what the LLM gets) or ``"selection"``.
        context: extra context for selectors that use it (e.g. ``{"grid": (24, 24)}``).
        **params: the selector's parameters, validated against its schema.

    Returns:
        int64 ``[k]`` for 2-D input, ``[B, k]`` for 3-D input.
    """
    if order not in ("sorted", "selection"):
        raise InvalidInputError(f"order={order!r} must be 'sorted' or 'selection'.")
    squeeze = isinstance(tokens, Tensor) and tokens.dim() == 2
    v = check_tokens(tokens)
    b, n, _ = v.shape
    k = resolve_budget(budget, n)
    sel = make_selector(selector, params)
    checked = check_scores(scores, b, n)
    picked = run_selector(sel, v, k, checked, _context(v, context))
    if order == "sorted":
        picked = picked.sort(dim=-1).values
    return picked[0] if squeeze else picked


def score(
    tokens: Tensor,
    scorer: str | Scorer,
    *,
    context: PruneContext | Mapping[str, Any] | None = None,
    **params: Any,
) -> Tensor:
    """Compute one score for every token: ``[N]`` for 2-D tokens, ``[B, N]`` for 3-D.

    Example: ``resprune.score(v, "text_relevance", context={"text": q, "text_embedder": f})``.
    """
    squeeze = isinstance(tokens, Tensor) and tokens.dim() == 2
    v = check_tokens(tokens)
    result = run_scorer(make_scorer(scorer, params), _context(v, context))
    return result[0] if squeeze else result
