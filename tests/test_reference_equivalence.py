"""Every fast selector and scorer against a slow, obviously correct reference."""

from __future__ import annotations

import collections

import math
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from hypothesis import given, settings
from hypothesis import strategies as st

import resprune
from resprune import linalg
from resprune.linalg import choose_method, greedy_residual_select, optimal_residual, span_residual
from resprune.testing.reference import divprune_reference, optimal_rank_k_residual, total_residual

from helpers import assert_same_up_to_ties, make_tokens

settings.register_profile("resprune", deadline=None, max_examples=40)
settings.load_profile("resprune")


def cosine_distance(tokens: torch.Tensor) -> torch.Tensor:
    v = tokens.double()
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - unit @ unit.T


# --- residual energy: the two Gram-column methods ----------------------------------------------


@given(st.integers(1, 40), st.integers(1, 24), st.integers(0, 999), st.booleans(), st.integers(1, 5))
def test_gram_incremental_and_blocked_methods_agree(n, d, seed, weighted, block):
    tokens = make_tokens(n, d, seed=seed, dups=n // 5, rank=max(1, d - 2), batch=2)
    k = max(1, (n * 2) // 3)
    w = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) + 0.01 if weighted else None
    a = greedy_residual_select(tokens, k, weights=w, method="incremental")
    b = greedy_residual_select(tokens, k, weights=w, method="gram")
    with mock.patch.object(linalg, "BLOCK", block):  # small blocks: many misses and refills
        c = greedy_residual_select(tokens, k, weights=w, method="blocked")
    for i in range(2):
        assert_same_up_to_ties(tokens[i], a[i].tolist(), b[i].tolist(), None if w is None else w[i])
        assert_same_up_to_ties(tokens[i], a[i].tolist(), c[i].tolist(), None if w is None else w[i])


@pytest.mark.parametrize("block", [1, 2, 7, 32])
def test_blocked_refills_on_every_kind_of_miss(block):
    """Forced first pick, picks outside the block, the rank fallback and row scaling."""
    tokens = make_tokens(60, 8, seed=4, rank=5, dups=6, batch=3)  # rank 5 < k: the fallback runs
    w = torch.rand(3, 60, generator=torch.Generator().manual_seed(1)) + 0.1
    rs = torch.rand(3, 60, generator=torch.Generator().manual_seed(2)) + 0.5
    first = torch.tensor([7, 0, 59])
    ref = greedy_residual_select(tokens, 20, weights=w, first=first, row_scale=rs, method="incremental")
    with mock.patch.object(linalg, "BLOCK", block):
        got = greedy_residual_select(tokens, 20, weights=w, first=first, row_scale=rs, method="blocked")
    assert got[:, 0].tolist() == first.tolist()
    for i in range(3):
        assert len(set(got[i].tolist())) == 20
        assert_same_up_to_ties(tokens[i] * rs[i, :, None], ref[i].tolist(), got[i].tolist(), w[i])


@pytest.mark.parametrize("predict", ["topk", "worst"])
def test_blocked_predictions_change_the_time_never_the_picks(predict, monkeypatch):
    """A refill's block is a guess: whatever it holds (the plain top by key, or the tokens of
    lowest key), the picks are those of the incremental method."""
    tokens = make_tokens(200, 24, seed=5, batch=2)
    w = torch.rand(2, 200, generator=torch.Generator().manual_seed(3)) + 0.1
    ref = greedy_residual_select(tokens, 60, weights=w, method="incremental")
    real = linalg.Block._predict

    def guess(self, pick, key, t, factor, fresh, most):
        if predict == "topk":
            monkeypatch.setattr(linalg, "LOOKAHEAD", 1)  # a pool of m: the run-ahead only reorders it
            return real(self, pick, key, t, factor, fresh, most)
        others = key.clone()
        others[pick] = float("inf")
        cand = torch.cat([torch.tensor([pick]), (-others).topk(most - 1).indices])
        return cand, factor[:t].index_select(1, cand)

    monkeypatch.setattr(linalg.Block, "_predict", guess)
    monkeypatch.setattr(linalg, "BLOCK", 8)
    got = greedy_residual_select(tokens, 60, weights=w, method="blocked")
    for i in range(2):
        assert_same_up_to_ties(tokens[i], ref[i].tolist(), got[i].tolist(), w[i])


def test_blocked_rows_stop_together_at_an_energy_fraction_like_the_batched_loop():
    """Rows reach an energy target at different steps; like the batched loop, every row runs to
    the latest and each row's own count is reported. The trace holds every step of every row."""
    tokens = make_tokens(80, 16, seed=9, batch=3, rank=12)
    tokens[1] *= torch.linspace(0.01, 1, 16)  # a row that needs fewer picks
    counts_gram: list[int] = []
    counts_blocked: list[int] = []
    a = greedy_residual_select(tokens, 40, method="gram", until_fraction=0.9, counts=counts_gram)
    trace: list[torch.Tensor] = []
    b = greedy_residual_select(tokens, 40, method="blocked", until_fraction=0.9, counts=counts_blocked, trace=trace)
    assert counts_blocked == counts_gram and len(set(counts_gram)) > 1
    assert torch.equal(a, b) and b.shape == (3, max(counts_gram))
    assert len(trace) == b.shape[1] and trace[0].shape == (3, 80)


def test_choose_method_by_device_budget_and_batch(monkeypatch):
    from resprune import kernels

    monkeypatch.setattr(kernels, "available", lambda device: False)  # the PyTorch methods (no Triton / no GPU)
    # CPU: Gram columns in blocks, unless a batch of small images has budgets above a quarter of N
    assert choose_method(576, 4096, 8) == "blocked"
    assert choose_method(576, 4096, 64) == "blocked"
    assert choose_method(2880, 4096, 320) == "blocked"
    assert choose_method(576, 4096, 128) == "blocked"
    assert choose_method(576, 4096, 192) == "blocked"  # one image: measured (tests/test_selection_auto.py)
    assert choose_method(576, 4096, 192, batch=3) == "blocked"
    assert choose_method(576, 4096, 192, batch=4) == "gram"
    assert choose_method(576, 4096, 400, batch=16) == "gram"
    assert choose_method(576, 4096, 128, batch=16) == "blocked"
    # beyond GRAM_MAX_N tokens no N x N matrix: 32 frames of a video, and N = 16k at any budget
    assert choose_method(4096, 1024, 1024) == "blocked"
    assert choose_method(16384, 3584, 8192) == "blocked"
    # other devices (no host check in the loop): incremental for small budgets, Gram for large
    assert choose_method(576, 4096, 8, device="cuda") == "incremental"
    assert choose_method(576, 4096, 400, device="cuda") == "gram"
    # a batch multiplies the bytes every incremental step reads: V no longer sits in cache
    assert choose_method(576, 4096, 64, device="cuda") == "incremental"
    assert choose_method(576, 4096, 64, batch=16, device="cuda") == "gram"
    assert choose_method(576, 4096, 64, device="meta") == "incremental"
    # narrow tokens (tiny models) on CPU: the Gram GEMM, or per-step products when N is large
    # against the at most d steps before the rank runs out
    assert choose_method(576, 64, 64, batch=16) == "gram"
    assert choose_method(2928, 64, 320) == "incremental"
    # with the Triton kernels on a CUDA device, they run the loop
    monkeypatch.setattr(kernels, "available", lambda device: torch.device(device).type == "cuda")
    assert choose_method(576, 4096, 64, device="cuda") == "triton"
    assert choose_method(576, 4096, 64) == "blocked"


def test_span_and_optimal_residual_helpers_match_reference():
    v = make_tokens(30, 10, seed=4)
    kept = [3, 7, 11]
    assert math.isclose(span_residual(v, kept), total_residual(v, kept), rel_tol=1e-9)
    assert math.isclose(optimal_residual(v, 4), optimal_rank_k_residual(v, 4), rel_tol=1e-9)
    assert span_residual(v, []) == pytest.approx(float(v.double().pow(2).sum()))


# --- DivPrune ----------------------------------------------------------------------------------


@given(st.integers(2, 30), st.integers(2, 12), st.integers(0, 999))
def test_divprune_matches_loop_reference(n, d, seed):
    tokens = make_tokens(n, d, seed=seed)
    k = max(1, n // 2)
    fast = resprune.select(tokens, k, selector="divprune", order="selection").tolist()
    slow = divprune_reference(tokens, k)
    dist = cosine_distance(tokens)
    for t, (x, y) in enumerate(zip(fast, slow)):
        if x != y:  # allowed only at a numerical tie of the max-min criterion
            if t == 0:
                eye = torch.eye(n, dtype=torch.bool)
                nearest = dist.masked_fill(eye, float("inf")).min(-1).values
                assert abs(float(nearest[x] - nearest[y])) < 1e-5
            else:
                to_kept = dist[:, fast[:t]].min(-1).values
                assert abs(float(to_kept[x] - to_kept[y])) < 1e-5
            break


def test_divprune_first_pick_is_farthest_from_its_nearest_neighbour():
    v = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.7, 0.7]])
    assert resprune.select(v, 1, selector="divprune").tolist() == [2]


# --- DPP: greedy MAP by explicit determinants ---------------------------------------------------


def dpp_greedy_by_determinants(tokens: torch.Tensor, r: torch.Tensor, k: int) -> tuple[list[int], torch.Tensor]:
    """Greedy MAP: each step adds the item that maximises det(L_S) (L = diag(r) S diag(r))."""
    v = tokens.double()
    unit = v / v.norm(dim=-1, keepdim=True)
    kernel = r.double()[:, None] * (unit @ unit.T) * r.double()[None, :]
    chosen: list[int] = []
    for _ in range(k):
        dets = torch.full((v.shape[0],), float("-inf"), dtype=torch.float64)
        for j in range(v.shape[0]):
            if j not in chosen:
                idx = chosen + [j]
                dets[j] = torch.linalg.det(kernel[idx][:, idx])
        chosen.append(int(dets.argmax()))
    return chosen, kernel


@given(st.integers(3, 14), st.integers(6, 12), st.integers(0, 999))
def test_dpp_is_greedy_determinant_maximisation(n, d, seed):
    tokens = make_tokens(n, d, seed=seed)
    r = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.1
    k = min(n, d) // 2 + 1
    fast = resprune.select(tokens, k, selector="dpp", normalize="none", scores={"relevance": r},
                           order="selection").tolist()
    slow, kernel = dpp_greedy_by_determinants(tokens, r, k)
    for t, (x, y) in enumerate(zip(fast, slow)):
        if x != y:
            base = fast[:t]
            dx = float(torch.linalg.det(kernel[base + [x]][:, base + [x]]))
            dy = float(torch.linalg.det(kernel[base + [y]][:, base + [y]]))
            assert abs(dx - dy) <= 1e-4 * max(abs(dy), 1e-12), f"dpp pick {t} is not the determinant argmax"
            break


def test_dpp_minmax_normalisation_and_missing_relevance():
    v = make_tokens(20, 8, seed=1)
    r = torch.rand(20, generator=torch.Generator().manual_seed(2))
    scaled = resprune.select(v, 6, selector="dpp", scores={"relevance": 3 * r + 5})
    assert torch.equal(scaled, resprune.select(v, 6, selector="dpp", scores={"relevance": r}))
    assert torch.equal(resprune.select(v, 6, selector="dpp"),
                       resprune.select(v, 6, selector="dpp", scores={"relevance": torch.ones(20)}))


# --- top-k, random, uniform -------------------------------------------------------------------


def test_topk_is_the_k_largest_scores_ties_by_lower_index():
    s = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.7])
    v = torch.randn(6, 4)
    out = resprune.select(v, 3, selector="topk", score="relevance", scores={"relevance": s}, order="selection")
    assert out.tolist() == [1, 3, 5]


def test_random_is_seeded_and_independent_of_batch_and_tokens():
    v = torch.randn(3, 50, 4)
    a = resprune.select(v, 10, selector="random", seed=7)
    assert torch.equal(a, resprune.select(v * 2 + 1, 10, selector="random", seed=7))
    assert torch.equal(a[1], resprune.select(v[1], 10, selector="random", seed=7))
    assert not torch.equal(a, resprune.select(v, 10, selector="random", seed=8))


def test_uniform_spreads_over_the_grid():
    v = torch.randn(24 * 24, 4)
    out = resprune.select(v, 144, selector="uniform", context={"grid": (24, 24)})
    rows, cols = out // 24, out % 24
    # a 12 x 12 sub-grid: every other row and column, each exactly 12 times
    assert sorted(set(rows.tolist())) == list(range(1, 24, 2))
    assert torch.bincount(cols, minlength=24)[1::2].tolist() == [12] * 12
    seq = resprune.select(torch.randn(10, 4), 5, selector="uniform")
    assert seq.tolist() == [1, 3, 5, 7, 9]


# --- token scores -----------------------------------------------------------------------------


def test_token_scores_match_their_definitions():
    v = make_tokens(12, 5, seed=9)
    norm = resprune.score(v, "norm")
    torch.testing.assert_close(norm, torch.tensor([float(torch.sqrt(sum(x * x for x in row))) for row in v]))
    mean = v.mean(0)
    cos = torch.tensor([float(row @ mean / (row.norm() * mean.norm())) for row in v])
    torch.testing.assert_close(resprune.score(v, "mean_similarity"), cos)
    pos = torch.tensor([[y, x] for y in range(3) for x in range(4)], dtype=torch.float32)
    centre = resprune.score(v, "center", context={"positions": pos})
    expect = torch.tensor([-math.hypot(y - 1.0, x - 1.5) for y in range(3) for x in range(4)])
    torch.testing.assert_close(centre, expect)


def test_cls_attention_scorer_passes_the_context_through():
    v = torch.randn(2, 6, 4)
    att = torch.softmax(torch.randn(2, 6), -1)
    torch.testing.assert_close(resprune.score(v, "cls_attention", context={"cls_attention": att}), att)


# --- pipeline-level quality sanity: ResPrune reconstructs better than random ----------------------


def test_residual_energy_reconstructs_low_rank_tokens_better_than_random_and_uniform():
    v = make_tokens(256, 64, rank=24, seed=0) + 0.01 * make_tokens(256, 64, seed=1)
    res = {name: total_residual(v, resprune.select(v, 24, selector=name)) for name in
           ("residual_energy", "random", "uniform", "divprune")}
    assert res["residual_energy"] < 0.2 * min(res["random"], res["uniform"], res["divprune"])
    assert res["residual_energy"] >= optimal_rank_k_residual(v, 24) * (1 - 1e-9)


@given(st.integers(2, 30), st.integers(2, 12), st.integers(0, 999), st.sampled_from(["incremental", "gram"]))
def test_row_scale_selects_like_the_scaled_copy(n, d, seed, method):
    tokens = make_tokens(n, d, seed=seed, batch=2)
    s = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) + 0.05
    s[:, 0] = 0.0  # a zero scale makes a zero row
    k = max(1, n // 2)
    scaled = greedy_residual_select(tokens * s.unsqueeze(-1), k, method=method)
    virtual = greedy_residual_select(tokens, k, method=method, row_scale=s)
    for i in range(2):
        assert_same_up_to_ties(tokens[i] * s[i, :, None], virtual[i].tolist(), scaled[i].tolist())


@pytest.mark.parametrize("method", ["incremental", "gram"])
def test_greedy_loop_never_reads_tensor_values_on_the_host(method):
    """No host synchronisation inside the loop: it runs on the meta device, which has no values
    (any `.item()`, `int(tensor)` or data-dependent Python branch would raise)."""
    tokens = torch.randn(3, 96, 32, device="meta")
    weights = torch.rand(3, 96, device="meta")
    first = torch.zeros(3, dtype=torch.long, device="meta")
    out = greedy_residual_select(tokens, 40, weights=weights, first=first, method=method)
    assert out.device.type == "meta" and out.shape == (3, 40) and out.dtype == torch.long


@pytest.mark.parametrize("name, params", [("residual_energy", {"seed": "norm", "alpha": 0.75}), ("dpp", {}),
                                          ("divprune", {}), ("topk", {"score": "norm"}), ("random", {})])
def test_builtin_selectors_never_read_tensor_values_on_the_host(name, params):
    tokens = torch.randn(2, 64, 16, device="meta")
    scores = {"norm": torch.rand(2, 64, device="meta"), "relevance": torch.rand(2, 64, device="meta")}
    out = resprune.get_host().selectors.get(name)(params).select(tokens, 20, scores, None)
    assert out.device.type == "meta" and out.shape == (2, 20)


class _CountOps(TorchDispatchMode):
    """Counts the tensor operations dispatched (views cost no kernel and are left out)."""

    VIEWS = {"view", "_unsafe_view", "select", "slice", "unsqueeze", "squeeze", "transpose", "expand", "permute",
             "alias", "as_strided", "t", "detach"}

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(method: str, device: str, row_scale: bool = False) -> collections.Counter[str]:
    tokens = torch.randn(2, 200, 64, device=device)
    weights = torch.rand(2, 200, device=device)
    rs = torch.rand(2, 200, device=device) + 0.5 if row_scale else None
    counts = []
    for k in (12, 24):
        with _CountOps() as mode:
            greedy_residual_select(tokens, k, weights=weights, method=method, row_scale=rs)
        counts.append(mode.ops)
    per = collections.Counter(counts[1])
    per.subtract(counts[0])
    return collections.Counter({op: n / 12 for op, n in per.items() if n})


@pytest.mark.parametrize("method, limit", [("gram", 18), ("incremental", 19)])
def test_one_greedy_step_dispatches_a_small_fixed_number_of_ops(method, limit):
    """A regression in launch overhead shows here, on CPU: each op is a kernel launch on a GPU."""
    per = _ops_per_step(method, "meta")
    assert sum(per.values()) <= limit, dict(per)
    # nothing is created from a Python scalar, copied between devices or read on the host inside the loop
    assert not {"scalar_tensor", "lift_fresh", "_to_copy", "_local_scalar_dense", "item"} & set(per), dict(per)
    assert sum(_ops_per_step(method, "meta", row_scale=True).values()) <= limit + (3 if method != "gram" else 0)


def test_cpu_loop_reads_one_flag_per_step_to_stop_once_nothing_is_left_above_tol():
    per = _ops_per_step("gram", "cpu")
    assert per["_local_scalar_dense"] == 1 and per["any"] == 1
    # and stops: 40 picks from tokens of rank 4 cost the steps up to the rank, then one topk
    tokens = make_tokens(100, 16, rank=4, seed=2)[None]
    with _CountOps() as mode:
        out = greedy_residual_select(tokens, 40, method="gram")
    assert mode.ops["argmax"] <= 5 and mode.ops["topk"] == 1
    reference = greedy_residual_select(tokens, 40, method="gram", trace=[])  # the trace turns the shortcut off
    assert torch.equal(out, reference)
