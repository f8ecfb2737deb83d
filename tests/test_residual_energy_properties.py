"""Property-based tests of the subspace invariants of ``residual_energy`` (ResPrune).

Each test states one invariant of greedy residual selection and checks it on random
token sets drawn by hypothesis: generic, low-rank, with duplicated and with zero rows.
Comparisons against float64 brute force allow for numerical ties only (two candidates
whose weighted energies agree to 1e-4 of the largest), never for a different answer.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resprune
from resprune.linalg import greedy_residual_select
from resprune.testing.reference import (
    greedy_residual_reference,
    optimal_rank_k_residual,
    residual_energies,
    total_residual,
)

from helpers import assert_same_up_to_ties, make_tokens

settings.register_profile("resprune", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("resprune")

METHODS = ("incremental", "gram", "blocked")


@st.composite
def token_sets(draw, *, degenerate: bool = True, max_n: int = 24, max_d: int = 12):
    """``(tokens [N, d], k)``: Gaussian tokens, optionally low-rank / duplicated / zero rows."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    rank = draw(st.one_of(st.none(), st.integers(1, max(1, min(n, d))))) if degenerate else None
    dups = draw(st.integers(0, n // 3)) if degenerate else 0
    zeros = draw(st.integers(0, n // 4)) if degenerate else 0
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    seed = draw(st.integers(0, 2**16))
    tokens = make_tokens(n, d, rank=rank, dups=dups, zeros=zeros, scale=scale, seed=seed)
    k = draw(st.integers(1, n))
    return tokens, k


@st.composite
def generic_sets(draw, *, max_n: int = 20, max_d: int = 12):
    """Well-conditioned Gaussian tokens and a budget at most their rank."""
    n = draw(st.integers(2, max_n))
    d = draw(st.integers(2, max_d))
    tokens = make_tokens(n, d, seed=draw(st.integers(0, 2**16)))
    k = draw(st.integers(1, min(n, d)))
    return tokens, k


def relevance_for(tokens: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.rand(tokens.shape[0], generator=torch.Generator().manual_seed(seed))


def picks(tokens: torch.Tensor, k: int, **params) -> list[int]:
    return resprune.select(tokens, k, order="selection", **params).tolist()


# --- k distinct indices -----------------------------------------------------------------


@given(token_sets(), st.sampled_from(METHODS), st.floats(0.0, 2.0), st.integers(0, 99))
def test_k_distinct_in_range_indices_for_every_budget(case, method, alpha, seed):
    tokens, k = case
    r = relevance_for(tokens, seed)
    out = picks(tokens, k, method=method, alpha=alpha, scores={"relevance": r})
    assert len(out) == k
    assert len(set(out)) == k
    assert all(0 <= i < tokens.shape[0] for i in out)


def test_budget_above_rank_uses_documented_fallback():
    # rank 2 and exact duplicates: after the span is full, the rest come in descending
    # ||v||^2 (weights are uniform here), ties by lower index.
    v = torch.tensor([[3.0, 0.0], [0.0, 1.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    out = picks(v, 6)
    assert out[:2] == [0, 5]  # largest energy, then the largest residual orthogonal to it
    assert out[2:] == [2, 3, 1, 4]  # fallback: energies 9, 4, 1, 0


def test_zero_tokens_only():
    v = torch.zeros(5, 3)
    assert picks(v, 5) == [0, 1, 2, 3, 4]


# --- incremental energies equal brute force; picks are argmaxes ----------------------------


@given(generic_sets(), st.sampled_from(METHODS), st.booleans(), st.integers(0, 99))
def test_incremental_energies_equal_brute_force_projection(case, method, weighted, seed):
    tokens, k = case
    weights = relevance_for(tokens, seed) + 0.05 if weighted else None
    trace: list[torch.Tensor] = []
    out = greedy_residual_select(tokens[None], k, weights=None if weights is None else weights[None],
                                 method=method, trace=trace)[0].tolist()
    scale = float(tokens.pow(2).sum(-1).max())
    for t in range(k):
        brute = residual_energies(tokens, out[: t + 1]).float()
        torch.testing.assert_close(trace[t][0], brute, rtol=0, atol=2e-5 * scale,
                                   msg=f"incremental residual energies differ from ||v - P_S v||^2 after pick {t}")


@given(generic_sets(), st.sampled_from(METHODS), st.booleans(), st.integers(0, 99))
def test_each_pick_is_argmax_of_weighted_brute_force_energy(case, method, weighted, seed):
    tokens, k = case
    r = relevance_for(tokens, seed)
    params = {"alpha": 1.0, "scores": {"relevance": r}} if weighted else {}
    w = (r + 1e-6) if weighted else torch.ones(tokens.shape[0])
    out = picks(tokens, k, method=method, **params)
    scale = float((tokens.double().pow(2).sum(-1) * w.double()).max())
    for t, i in enumerate(out):
        e = residual_energies(tokens, out[:t]) * w.double()
        e[out[:t]] = float("-inf")
        assert float(e[i]) >= float(e.max()) - 1e-4 * scale, f"pick {t} ({i}) is not the weighted argmax"


@given(token_sets(), st.sampled_from(METHODS), st.booleans(), st.integers(0, 99))
def test_fast_kernel_matches_naive_reference(case, method, weighted, seed):
    tokens, k = case
    w = relevance_for(tokens, seed) + 0.01 if weighted else None
    fast = greedy_residual_select(tokens[None], k, weights=None if w is None else w[None], method=method)
    slow = greedy_residual_reference(tokens, k, weights=w)
    assert_same_up_to_ties(tokens, fast[0].tolist(), slow, w)


# --- nesting and total residual -----------------------------------------------------------


@given(token_sets(), st.sampled_from(METHODS), st.integers(0, 99))
def test_greedy_nesting_budget_k_is_prefix_of_k_plus_1(case, method, seed):
    tokens, k = case
    r = relevance_for(tokens, seed)
    kw = {"method": method, "alpha": 0.75, "scores": {"relevance": r}}
    longer = picks(tokens, k, **kw)
    for j in range(1, k):
        assert picks(tokens, j, **kw) == longer[:j]


@given(generic_sets(max_n=16, max_d=8))
def test_nesting_with_auto_method_up_to_ties(case):
    tokens, k = case  # 'auto' may switch between methods as k grows; only ties may differ
    longer = picks(tokens, k)
    for j in range(1, k):
        assert_same_up_to_ties(tokens, picks(tokens, j), longer[:j])


@given(token_sets(), st.sampled_from(METHODS))
def test_total_residual_non_increasing_zero_at_span_and_above_svd_optimum(case, method):
    tokens, k = case
    n, d = tokens.shape
    out = picks(tokens, n, method=method)
    total = float(tokens.double().pow(2).sum())
    rank = int(torch.linalg.matrix_rank(tokens.double(), rtol=1e-6)) if total > 0 else 0
    prev = total
    for j in range(1, n + 1):
        res = total_residual(tokens, out[:j])
        assert res <= prev + 1e-9 * total, "total residual energy increased when a token was added"
        assert res >= optimal_rank_k_residual(tokens, j) - 1e-6 * total, "below the SVD optimum"
        prev = res
    # once rank(V) tokens are kept their span is the token space
    assert total_residual(tokens, out[: max(rank, 1)]) <= 1e-4 * max(total, 1e-30)


# --- invariances ---------------------------------------------------------------------------


@given(generic_sets(), st.integers(0, 2**16), st.floats(1e-2, 1e2))
def test_invariant_to_common_rotation_and_positive_scaling(case, seed, scale):
    tokens, k = case
    d = tokens.shape[1]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    moved = (tokens.double() @ q * scale).float()
    assert_same_up_to_ties(tokens, picks(moved, k), picks(tokens, k))


@given(generic_sets(), st.integers(0, 2**16), st.integers(0, 99))
def test_permutation_equivariance(case, seed, rseed):
    tokens, k = case
    n = tokens.shape[0]
    r = relevance_for(tokens, rseed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    kw = {"alpha": 0.5}
    permuted = picks(tokens[perm], k, scores={"relevance": r[perm]}, **kw)
    mapped_back = [int(perm[i]) for i in permuted]
    assert_same_up_to_ties(tokens, mapped_back, picks(tokens, k, scores={"relevance": r}, **kw),
                           (r + 1e-6) ** 0.5)


# rank 1 with duplicated tokens (0 = 17, 1 = 16): every pick after the first is in the fallback
# order, where `pow` of a constant relevance vector can differ by an ulp between vectorised and
# tail lanes, so exact duplicates may swap (found by hypothesis in CI)
_DUPLICATES = torch.tensor([-2.3104e-03, -3.7325e-04, -1.2609e-03, -7.2695e-04, -1.9965e-05, 2.1030e-04, 1.7719e-04,
                            -8.3051e-04, 2.3872e-04, 7.3353e-04, -7.7301e-04, -1.5952e-03, -6.8700e-04, 1.4881e-03,
                            -4.4842e-04, -8.9100e-04, -3.7325e-04, -2.3104e-03])[:, None]


def test_the_tie_check_accepts_fallback_ties_and_nothing_else():
    geometric = picks(_DUPLICATES, 13)
    assert geometric[-1] == 1
    assert_same_up_to_ties(_DUPLICATES, geometric[:12] + [16], geometric)  # 16 duplicates 1: a tie
    with pytest.raises(AssertionError, match="weighted initial energies differ"):
        assert_same_up_to_ties(_DUPLICATES, geometric[:12] + [4], geometric)


@given(token_sets(), st.integers(0, 99), st.floats(0.01, 5.0))
def test_alpha_zero_or_constant_relevance_is_purely_geometric(case, seed, const):
    tokens, k = case
    geometric = picks(tokens, k)
    r = relevance_for(tokens, seed)
    assert picks(tokens, k, alpha=0.0, scores={"relevance": r}) == geometric
    constant = picks(tokens, k, alpha=0.8, scores={"relevance": torch.full((tokens.shape[0],), const)})
    assert_same_up_to_ties(tokens, constant, geometric)


@given(token_sets(max_n=16, max_d=8), st.sampled_from([torch.bfloat16, torch.float16]))
def test_half_precision_input_selects_like_its_float32_upcast(case, dtype):
    tokens, k = case
    low = tokens.clamp(-6e4, 6e4).to(dtype)
    assert torch.equal(resprune.select(low, k), resprune.select(low.float(), k))


# --- seed ---------------------------------------------------------------------------------


@given(generic_sets(), st.integers(0, 99))
def test_seed_score_argmax_is_first_pick_then_greedy(case, seed):
    tokens, k = case
    s = relevance_for(tokens, seed + 1)
    out = picks(tokens, k, seed="norm_like", scores={"norm_like": s})
    assert out[0] == int(s.argmax())
    reference = greedy_residual_reference(tokens, k, first=int(s.argmax()))
    assert_same_up_to_ties(tokens, out, reference)


# --- batches and devices ---------------------------------------------------------------------


@given(st.integers(1, 4), st.integers(2, 16), st.integers(1, 8), st.sampled_from(METHODS), st.integers(0, 999))
def test_batch_equals_one_image_at_a_time(b, n, d, method, seed):
    tokens = make_tokens(n, d, seed=seed, batch=b, rank=max(1, d // 2), dups=1)
    k = max(1, n // 2)
    r = torch.rand(b, n, generator=torch.Generator().manual_seed(seed))
    batched = resprune.select(tokens, k, scores={"relevance": r}, method=method, order="selection")
    for i in range(b):
        one = resprune.select(tokens[i], k, scores={"relevance": r[i]}, method=method, order="selection")
        assert torch.equal(batched[i], one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    tokens = make_tokens(96, 32, seed=3, batch=3)
    r = torch.rand(3, 96, generator=torch.Generator().manual_seed(0))
    cpu = resprune.select(tokens, 24, scores={"relevance": r}, method=method, order="selection")
    gpu = resprune.select(tokens.cuda(), 24, scores={"relevance": r.cuda()}, method=method, order="selection")
    assert gpu.device.type == "cuda"
    for i in range(3):
        assert_same_up_to_ties(tokens[i], gpu[i].cpu().tolist(), cpu[i].tolist(), (r[i] + 1e-6))


# --- scale and memory layout -----------------------------------------------------------------------

SCALED_SELECTORS = ("residual_energy", "dpp", "divprune")


@given(token_sets(), st.sampled_from(SCALED_SELECTORS), st.integers(-100, 100), st.booleans(), st.integers(0, 99))
def test_picks_are_the_same_at_every_scale_from_1e_30_to_1e30(case, selector, exponent, weighted, seed):
    """Scaling all tokens by 2^e (|e| <= 100: 1e-30..1e30) changes nothing: float32 squares would
    overflow or underflow there, so the selectors rescale by an exact power of two first."""
    tokens, k = case
    scores = {"relevance": relevance_for(tokens, seed)} if weighted and selector != "divprune" else None
    base = resprune.select(tokens, k, selector=selector, scores=scores, order="selection")
    scaled = tokens * 2.0 ** exponent
    assert bool(torch.isfinite(scaled).all())
    assert torch.equal(resprune.select(scaled, k, selector=selector, scores=scores, order="selection"), base)


@pytest.mark.parametrize("selector", SCALED_SELECTORS)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e19, 1e30])
def test_extreme_decimal_scales_do_not_collapse_to_the_first_indices(selector, scale):
    tokens = make_tokens(64, 16, seed=3)
    base = resprune.select(tokens, 8, selector=selector, order="selection")
    got = resprune.select(tokens * scale, 8, selector=selector, order="selection")
    assert got.tolist() != list(range(8))
    assert torch.equal(got, base)


@given(token_sets(), st.sampled_from(SCALED_SELECTORS), st.booleans(), st.integers(0, 99))
def test_picks_do_not_depend_on_memory_layout(case, selector, weighted, seed):
    """A transposed copy or a strided view of the same values picks the same tokens (ties included)."""
    tokens, k = case
    scores = {"relevance": relevance_for(tokens, seed)} if weighted and selector != "divprune" else None
    base = resprune.select(tokens, k, selector=selector, scores=scores, order="selection")
    transposed = tokens.T.contiguous().T
    strided = torch.zeros(tokens.shape[0], 2 * tokens.shape[1] + 1)[:, 1::2]
    strided.copy_(tokens)
    for layout in (transposed, strided):
        assert torch.equal(resprune.select(layout, k, selector=selector, scores=scores, order="selection"), base)


def test_dpp_without_relevance_breaks_its_exact_first_step_tie_by_index():
    """Every unit-norm row has quality 1: the first pick is the lowest index, in any layout."""
    tokens = make_tokens(50, 8, seed=1) * torch.linspace(0.5, 40.0, 50).unsqueeze(-1)
    for layout in (tokens, tokens.T.contiguous().T):
        assert int(resprune.select(layout, 5, selector="dpp", order="selection")[0]) == 0
