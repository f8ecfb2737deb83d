"""Running scorers and selectors safely, and the functional API ``select`` / ``score``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from .budget import Budget, resolve_budget
from .context import PruneContext
from .errors import InvalidInputError, PluginContractError, PluginError, ResPruneError
from .interfaces import Merger, Scorer, Selector, Strategy
from .plugins import get_host

__all__ = ["Selection", "select", "score", "check_tokens", "check_scores", "run_scorer", "run_selector",
           "run_merger", "make_selector", "make_scorer", "make_merger", "DeferredChecks"]

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
        features: float32 ``[B, k, d]`` the features at the ``kept`` places when a merger ran
            (``None``: the kept tokens unchanged).
        sources: int64 ``[B, k]`` the token each kept place holds, when a merger ran (it may put
            its tokens in another order than their places; ``None``: each place its own token).
        merged: how many of the ``k`` tokens a merger made from dropped ones (``0``: none).
    """

    kept: Tensor
    order: Tensor
    k: int
    n: int
    scores: dict[str, Tensor] = field(default_factory=dict)
    features: Tensor | None = None
    sources: Tensor | None = None
    merged: int = 0

    @property
    def held(self) -> Tensor:
        """``[B, k]``: the token each kept place holds (``sources``, else ``kept``)."""
        return self.kept if self.sources is None else self.sources

    def mask(self) -> Tensor:
        """Boolean ``[B, N]``, True where a token is kept."""
        m = torch.zeros(self.kept.shape[0], self.n, dtype=torch.bool, device=self.kept.device)
        return m.scatter_(1, self.kept, True)


def provider(strategy: Strategy | type[Strategy]) -> str:
    """Name of the plugin that registered ``strategy``'s class (for error messages)."""
    cls = strategy if isinstance(strategy, type) else type(strategy)
    try:
        registry = get_host().registry(cls.kind)
    except KeyError:  # not a kind of plugin
        return cls.__module__
    if cls.name in registry:
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


class _ReadOnly:
    """Notices a plugin writing into the tensors it was handed (through their version counters,
    which every in-place operation bumps): cheap enough to run on every call."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self._seen = [(name, t, t._version) for name, t in tensors.items()
                      if isinstance(t, Tensor) and not t.is_inference()]  # inference tensors keep no version

    def check(self, who: str) -> None:
        changed = [name for name, t, version in self._seen if t._version != version]
        if changed:
            raise PluginContractError(
                f"{who} wrote into {', '.join(changed)} in place; the tensors handed to plugins are read-only "
                f"(other strategies and the model read them afterwards). Clone before modifying: x = x.clone().")


def _inputs(context: PruneContext, **more: Any) -> dict[str, Any]:
    fields = {f"context['{name}']": value for name, value in context._values.items()}
    return {**fields, **more}


def _call(who: str, fn: Any, *args: Any) -> Any:
    """Call a plugin; its own exceptions become a ``PluginError`` naming it (resprune's pass through)."""
    try:
        return fn(*args)
    except (ResPruneError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise PluginError(f"{who} raised {type(exc).__name__}: {exc}") from exc


class DeferredChecks:
    """Value checks of plugin outputs kept on the device and read in one go later (``verify``),
    so code that must not wait for the device (a stage inside the LLM) still checks them."""

    def __init__(self) -> None:
        self._checks: list[tuple[Tensor, type[ResPruneError], str]] = []

    def add(self, ok: Tensor, message: str, error: type[ResPruneError] = PluginContractError) -> None:
        self._checks.append((ok.reshape(()), error, message))

    def verify(self) -> None:
        """Raise the first failed check's error (one host read for all of them)."""
        if not self._checks:
            return
        flags = torch.stack([ok.to(self._checks[0][0].device) for ok, _, _ in self._checks]).tolist()
        checks, self._checks = self._checks, []
        for flag, (_, error, message) in zip(flags, checks):
            if not flag:
                raise error(message)


def run_scorer(scorer: Scorer, context: PruneContext, *, checked: bool = False,
               deferred: DeferredChecks | None = None) -> Tensor:
    """Run ``scorer`` and check its output is a finite float ``[B, N]``; name the plugin if not.

    ``checked``: the caller already checked the context has what the scorer requires.
    ``deferred``: keep the value check on the device (``DeferredChecks.verify`` reads it)."""
    if not checked:
        context.check(scorer.requires, requester=f"scorer '{scorer.name}'")
    who = f"scorer '{scorer.name}' (plugin '{provider(scorer)}')"
    guard = _ReadOnly(_inputs(context))
    result = _call(who, scorer.score, context)
    guard.check(who)
    b, n = context.batch_size, context.num_tokens
    if not isinstance(result, Tensor) or tuple(result.shape) != (b, n) or not result.is_floating_point():
        got = f"shape {tuple(result.shape)} {result.dtype}" if isinstance(result, Tensor) else type(result).__name__
        raise PluginContractError(
            f"{who} returned {got}; a scorer must return a float tensor of shape [B, N] = {(b, n)}.")
    result = result.float()  # checked after the cast: a float64 1e300 becomes inf here
    if deferred is not None:
        deferred.add(torch.isfinite(result).all(), f"{who} returned NaN or Inf scores (in float32).")
    elif not bool(torch.isfinite(result).all()):
        raise PluginContractError(f"{who} returned NaN or Inf scores (in float32).")
    return result


def run_selector(selector: Selector, tokens: Tensor, k: int, scores: Mapping[str, Tensor],
                 context: PruneContext, *, checked: bool = False, deferred: DeferredChecks | None = None) -> Tensor:
    """Run ``selector`` and check it returned ``k`` distinct in-range int64 indices per row.

    ``checked``: the caller already checked the context has what the selector requires.
    ``deferred``: keep the value checks on the device (``DeferredChecks.verify`` reads them)."""
    missing = sorted(selector.required_scores() - set(scores))
    if missing:
        raise InvalidInputError(
            f"selector '{selector.name}' needs score '{missing[0]}' ({selector!r}), but "
            f"{'only ' + str(sorted(scores)) if scores else 'no scores'} were given. Pass scores={{'{missing[0]}': ...}} "
            f"or add a scorer that writes it.")
    if not checked:
        context.check(selector.requires, requester=f"selector '{selector.name}'")
    b, n = tokens.shape[:2]
    who = f"selector '{selector.name}' (plugin '{provider(selector)}')"
    guard = _ReadOnly(_inputs(context, tokens=tokens, **{f"scores['{k_}']": v for k_, v in scores.items()}))
    out = _call(who, selector.select, tokens, k, MappingProxyType(dict(scores)), context)
    guard.check(who)
    if not isinstance(out, Tensor) or tuple(out.shape) != (b, k):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise PluginContractError(f"{who} returned {got}; expected int64 indices of shape [B, k] = {(b, k)}.")
    if out.dtype != torch.long:
        raise PluginContractError(f"{who} returned dtype {out.dtype}; expected torch.int64 indices.")
    if k:  # the value checks in one host read: on a GPU each read waits for the queue
        ordered = out.sort(dim=-1).values
        low, high = ordered[:, 0].min(), ordered[:, -1].max()
        dupes = (ordered.diff(dim=-1) == 0).any() if k > 1 else torch.zeros((), dtype=torch.bool, device=out.device)
        if deferred is not None:
            deferred.add((low >= 0) & (high < n), f"{who} returned indices outside [0, {n}).")
            deferred.add(~dupes, f"{who} returned duplicate indices; the {k} picks must be distinct.")
            return out
        low, high, dupes = torch.stack([low, high, dupes.long()]).tolist()
        if low < 0 or high >= n:
            raise PluginContractError(f"{who} returned indices outside [0, {n}).")
        if dupes:
            raise PluginContractError(f"{who} returned duplicate indices; the {k} picks must be distinct.")
    return out


def run_merger(merger: Merger, tokens: Tensor, kept: Tensor, slots: int, scores: Mapping[str, Tensor],
               context: PruneContext, *, deferred: DeferredChecks | None = None) -> tuple[Tensor, Tensor]:
    """Run ``merger`` and check it returned ``k = kept + slots`` distinct indices that include
    every kept one, and finite float features ``[B, k, d]`` (``deferred``: as in
    ``run_selector``)."""
    b, n, d = tokens.shape
    k = kept.shape[1] + slots
    who = f"merger '{merger.name}' (plugin '{provider(merger)}')"
    guard = _ReadOnly(_inputs(context, tokens=tokens, kept=kept, **{f"scores['{k_}']": v for k_, v in scores.items()}))
    out = _call(who, merger.merge, tokens, kept, slots, MappingProxyType(dict(scores)), context)
    guard.check(who)
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise PluginContractError(f"{who} returned {type(out).__name__}; expected (indices [B, k], features [B, k, d]).")
    indices, features = out
    if tuple(indices.shape) != (b, k) or indices.dtype != torch.long:
        raise PluginContractError(f"{who} returned indices of shape {tuple(indices.shape)} {indices.dtype}; expected "
                                  f"int64 [B, k] = {(b, k)}.")
    if tuple(features.shape) != (b, k, d) or not features.is_floating_point():
        raise PluginContractError(f"{who} returned features of shape {tuple(features.shape)}; expected float "
                                  f"[B, k, d] = {(b, k, d)}.")
    if k:
        inside = (indices >= 0).all() & (indices < n).all()
        has_kept = torch.zeros(b, n, dtype=torch.bool, device=indices.device).scatter_(
            1, indices.clamp(0, n - 1), True)
        ok = (has_kept.sum(dim=1) == k).all()  # distinct
        covers = has_kept.gather(1, kept.to(indices.device)).all()
        checks = DeferredChecks() if deferred is None else deferred
        checks.add(inside & ok, f"{who} returned indices that are not distinct and in [0, {n}).")
        checks.add(covers, f"{who} dropped a token the selector kept; the indices must include `kept`.")
        if deferred is None:
            checks.verify()
    features = features.float()
    finite = torch.isfinite(features).all()
    if deferred is not None:
        deferred.add(finite, f"{who} returned NaN or Inf features.")
    elif not bool(finite):
        raise PluginContractError(f"{who} returned NaN or Inf features.")
    return indices, features


def _make(kind: str, base: type, value: Any, params: Mapping[str, Any] | None) -> Any:
    if isinstance(value, base):
        if params:
            raise InvalidInputError(f"pass params only with a {kind} name or class, not with a {base.__name__} "
                                    f"instance ({value!r}): build it with them instead.")
        return value
    if isinstance(value, type):
        if not issubclass(value, base):
            raise InvalidInputError(f"{value.__qualname__} is not a {base.__name__} subclass; pass a registered "
                                    f"{kind} name, a {base.__name__} subclass or an instance.")
        return value(dict(params or {}))  # an unregistered class works too (e.g. in a notebook)
    if not isinstance(value, str):
        raise InvalidInputError(f"{kind}={value!r}: pass a registered {kind} name, a {base.__name__} subclass or "
                                f"an instance.")
    return getattr(get_host(), f"{kind}s").get(value)(dict(params or {}))


def make_selector(selector: str | Selector | type[Selector], params: Mapping[str, Any] | None = None) -> Selector:
    """A selector instance from a registry name or a ``Selector`` subclass (with params), or an instance."""
    return _make("selector", Selector, selector, params)


def make_scorer(scorer: str | Scorer | type[Scorer], params: Mapping[str, Any] | None = None) -> Scorer:
    """A scorer instance from a registry name or a ``Scorer`` subclass (with params), or an instance."""
    return _make("scorer", Scorer, scorer, params)


def make_merger(merger: str | Merger | type[Merger], params: Mapping[str, Any] | None = None) -> Merger:
    """A merger instance from a registry name or a ``Merger`` subclass (with params), or an instance."""
    return _make("merger", Merger, merger, params)


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
    selector: str | Selector | type[Selector] = "residual_energy",
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
        selector: registry name, a ``Selector`` subclass (built with ``params``) or instance.
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
    scorer: str | Scorer | type[Scorer],
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
