"""Contract checks every scorer, selector and merger must pass (built-in or third-party).

Use them in a plugin's own test suite::

    from resprune.testing import check_selector_contract
    def test_my_selector():
        check_selector_contract(MySelector())
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ..context import PruneContext
from ..errors import ResPruneError
from ..interfaces import Merger, Scorer, Selector
from ..plugins import get_host
from ..selection import run_scorer, run_selector

__all__ = ["random_context", "check_selector_contract", "check_scorer_contract", "check_merger_contract"]


def _word_embedder(d: int):
    """A deterministic stand-in for an LLM embedding table: 2 sub-words per word."""

    def embed(word: str) -> Tensor:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
        return torch.randn(2, d, generator=torch.Generator().manual_seed(seed))

    return embed


class _AttentionTable:
    """A stand-in for the ``llm_attention`` field: ``query -> [B, N]`` from fixed tables."""

    def __init__(self, tables: dict[str, Tensor]) -> None:
        self.tables = tables

    def __call__(self, query: str = "last") -> Tensor:
        return self.tables[query]

    def row(self, i: int) -> _AttentionTable:
        return _AttentionTable({q: t[i : i + 1] for q, t in self.tables.items()})


def _projector(c: int, d: int):
    """A stand-in projector ``[..., c] -> [..., d]`` (a fixed random linear map and a tanh)."""
    weight = torch.randn(c, d, generator=torch.Generator().manual_seed(7)) / c ** 0.5
    return lambda features: torch.tanh(features.float() @ weight.to(features.device))


def _post_norm(features: Tensor) -> Tensor:
    """A stand-in for a vision tower's final layer norm (no learned scale)."""
    return torch.nn.functional.layer_norm(features.float(), features.shape[-1:])


def random_context(b: int = 2, rows: int = 3, cols: int = 4, d: int = 8, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> PruneContext:
    """A context with every standard field and every field of a stage inside the LLM
    (``resprune.llm_pruning.LLM_FIELDS``), for ``B`` images of a ``rows x cols`` grid."""
    gen = torch.Generator().manual_seed(seed)
    n = rows * cols
    tokens = torch.randn(b, n, d, generator=gen).to(dtype).float()
    cls_attention = torch.softmax(torch.randn(b, n, generator=gen), dim=-1)
    texts = [f"What colour is the object number {i} near the window?" for i in range(b)]
    attention = _AttentionTable({q: torch.softmax(torch.randn(b, n, generator=gen), dim=-1)
                                 for q in ("last", "instruction")})
    return PruneContext(tokens, source="resprune.testing.random_context", text=texts,
                        text_embedder=_word_embedder(d), cls_attention=cls_attention, grid=(rows, cols),
                        vision_features=torch.randn(b, n, d + 4, generator=gen),
                        cls_attention_layers=torch.softmax(torch.randn(b, n, 3, generator=gen), dim=1),
                        tiles=torch.arange(n) * 3 // n,  # a base tile and two crops
                        frames=torch.arange(rows).repeat_interleave(cols),  # each grid row a frame of a video
                        frame_attention=torch.softmax(torch.randn(b, rows, cols, generator=gen), dim=-1).view(b, n),
                        frame_features=torch.randn(b, rows, 1, d + 4, generator=gen).expand(b, rows, cols, d + 4)
                        .reshape(b, n, d + 4),
                        vision_keys=torch.randn(b, n, 4, generator=gen),
                        vision_cls=torch.randn(b, d + 4, generator=gen),
                        projector=_projector(d + 4, d), vision_post_norm=_post_norm,
                        clip_checkpoint=f"tiny:{d + 4}",  # a random tiny CLIP beside a tower of width d + 4
                        last_keys=torch.randn(b, n, d + 4, generator=gen),
                        last_cls_attention=torch.softmax(torch.randn(b, n, generator=gen), dim=-1)[..., None],
                        llm_attention=attention, llm_keys=torch.randn(b, n, 2 * d, generator=gen),
                        llm_last_hidden=torch.randn(b, d, generator=gen),
                        llm_text_hidden=torch.randn(b, 3, d, generator=gen),
                        llm_text_key_norm=torch.rand(b, 3, generator=gen), layer=2)


def _scores_for(selector: Selector, context: PruneContext, seed: int = 1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    names = selector.required_scores() | selector.optional_scores()
    return {name: torch.rand(context.batch_size, context.num_tokens, generator=gen) for name in sorted(names)}


def _snapshot(context: PruneContext, scores: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    tensors = {f"context['{f}']": context.get(f) for f in sorted(context.available)}
    tensors.update({f"scores['{k}']": v for k, v in (scores or {}).items()})
    return {k: v.clone() for k, v in tensors.items() if isinstance(v, Tensor)}


def _assert_unchanged(before: dict[str, Tensor], context: PruneContext, scores: dict[str, Tensor] | None,
                      who: str) -> None:
    """The inputs still hold their values (a write through ``.data`` or NumPy escapes version counters)."""
    after = _snapshot(context, scores)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{who} modified its input {key}; inputs are read-only"


def check_selector_contract(selector: Selector, *, context: PruneContext | None = None) -> None:
    """Assert the selector interface: shapes, dtype, distinct in-range indices, every budget
    from 1 to N, determinism, that each image's picks do not depend on its batch, and that
    the tokens, scores and context it is handed come back unchanged. A selector that
    ``resizes_images`` spends its budget before the processor: it keeps all ``N`` tokens at
    ``k = N`` and refuses any smaller ``k`` (an image that was not resized) with an error."""
    ctx = context or random_context()
    b, n = ctx.batch_size, ctx.num_tokens
    scores = _scores_for(selector, ctx)
    if selector.resizes_images:
        out = run_selector(selector, ctx.tokens, n, scores, ctx)
        assert torch.equal(out.sort(dim=1).values, torch.arange(n).expand(b, n))
        if n > 1:
            try:
                run_selector(selector, ctx.tokens, n - 1, scores, ctx)
            except ResPruneError:
                return
            raise AssertionError(f"selector '{selector.name}' resizes images, yet picked {n - 1} of {n} tokens of an "
                                 f"image it did not resize instead of refusing it")
        return
    before = _snapshot(ctx, scores)
    for k in sorted(k for k in {1, 2, n // 2, n - 1, n} if 1 <= k <= n):
        out = run_selector(selector, ctx.tokens, k, scores, ctx)  # checks shape, dtype, range, distinctness
        assert out.shape == (b, k) and out.dtype == torch.long
        again = run_selector(selector, ctx.tokens, k, scores, ctx)
        assert torch.equal(out, again), f"selector '{selector.name}' is not deterministic (k={k})"
        for i in range(b):
            one = PruneContext(ctx.tokens[i : i + 1], source=ctx.source,
                               **{f: _row(ctx.get(f), i, b) for f in ctx.available if f != "tokens"})
            single = run_selector(selector, one.tokens, k, {s: v[i : i + 1] for s, v in scores.items()}, one)
            assert torch.equal(single[0], out[i]), (
                f"selector '{selector.name}': image {i} picks differ alone and in a batch (k={k})")
    if n >= 2:
        assert set(run_selector(selector, ctx.tokens, n, scores, ctx)[0].tolist()) == set(range(n))
    _assert_unchanged(before, ctx, scores, f"selector '{selector.name}'")


def check_scorer_contract(scorer: Scorer, *, context: PruneContext | None = None) -> None:
    """Assert the scorer interface: finite float ``[B, N]``, deterministic, batch-independent,
    and the context it reads comes back unchanged."""
    ctx = context or random_context()
    before = _snapshot(ctx)
    out = run_scorer(scorer, ctx)  # checks shape, dtype and finiteness
    _assert_unchanged(before, ctx, None, f"scorer '{scorer.name}'")
    assert out.shape == (ctx.batch_size, ctx.num_tokens)
    assert torch.equal(out, run_scorer(scorer, ctx)), f"scorer '{scorer.name}' is not deterministic"
    for i in range(ctx.batch_size):
        one = PruneContext(ctx.tokens[i : i + 1], source=ctx.source,
                           **{f: _row(ctx.get(f), i, ctx.batch_size) for f in ctx.available if f != "tokens"})
        torch.testing.assert_close(run_scorer(scorer, one)[0], out[i], rtol=1e-5, atol=1e-6,
                                   msg=f"scorer '{scorer.name}': image {i} scores differ alone and in a batch")


def _row(value, i: int, b: int):
    """Slice batch row ``i`` out of a per-image context value (lists and [B, ...] tensors)."""
    if isinstance(value, _AttentionTable):
        return value.row(i)
    if isinstance(value, list) and len(value) == b:
        return [value[i]]
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == b and b > 1:
        return value[i : i + 1]
    return value


def merger_selector(merger: Merger) -> tuple[Selector, list[str]]:
    """The selector (and scorers) a merger's tests run it after: the one it names
    (``Merger.selector``), else ``topk`` by norm."""
    if merger.selector is not None:
        return get_host().selectors.get(merger.selector)(), []
    return get_host().selectors.get("topk")({"score": "norm"}), ["norm"]


def check_merger_contract(merger: Merger, *, context: PruneContext | None = None) -> None:
    """Assert the merger interface through a stage (``topk`` by norm, then the merger) at
    every budget: ``k`` places (plus the merger's ``extra``) including the selector's picks,
    finite features, determinism,
    batch independence, and inputs that come back unchanged."""
    from ..stages import Stage

    ctx = context or random_context()
    b, n = ctx.batch_size, ctx.num_tokens
    before = _snapshot(ctx)
    selector, scorers = merger_selector(merger)
    for k in sorted(k for k in {1, 2, n // 2, n - 1, n} if 1 <= k <= n):
        stage = Stage(selector, budget=k, scorers=scorers, merger=merger)
        sel = stage.run(ctx)  # run_merger checks places, features and that the picks are kept
        made = k + (merger.extra(k - merger.slots(k, n), n) if k < n else 0)  # tokens on top of the budget
        assert sel.kept.shape == (b, made) and sel.k == made
        if k < n:
            assert sel.features is not None and sel.features.shape == (b, made, ctx.tokens.shape[-1])
        again = stage.run(ctx)
        assert torch.equal(sel.kept, again.kept), f"merger '{merger.name}' is not deterministic (k={k})"
        if sel.features is not None:
            assert torch.equal(sel.features, again.features), f"merger '{merger.name}' is not deterministic (k={k})"
            for i in range(b):
                one = PruneContext(ctx.tokens[i : i + 1], source=ctx.source,
                                   **{f: _row(ctx.get(f), i, b) for f in ctx.available if f != "tokens"})
                single = stage.run(one)
                assert torch.equal(single.kept[0], sel.kept[i])
                torch.testing.assert_close(single.features[0], sel.features[i], rtol=1e-5, atol=1e-6,
                                           msg=f"merger '{merger.name}': image {i} differs alone and in a batch")
    _assert_unchanged(before, ctx, None, f"merger '{merger.name}'")
