"""The Triton kernels (``resprune.kernels``) against the PyTorch reference loops.

Without a GPU they run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``),
so CI checks every kernel's picks on the property-test inputs: generic, low-rank, duplicate
and zero rows, budgets above the rank, forced first picks, virtual row scales, batches.
Exact ties (duplicates, the fallback order) must break the same way; float near-ties may
part (``assert_same_up_to_ties``). On a CUDA machine the same tests also run on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resprune
from resprune import kernels
from resprune.linalg import greedy_residual_select
from resprune.strategies.divprune import greedy_max_min

from helpers import assert_same_up_to_ties, make_tokens

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not kernels.available("cpu") and not torch.cuda.is_available(),
                                reason="needs a GPU, or TRITON_INTERPRET=1 (tests/conftest.py sets it without one)")
interpreted = pytest.mark.skipif(not kernels.available("cpu"), reason="CPU tensors need TRITON_INTERPRET=1")


@st.composite
def cases(draw, max_n: int = 36, max_d: int = 10):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max_d))
    rank = draw(st.one_of(st.none(), st.integers(1, max(1, min(n, d)))))
    tokens = make_tokens(n, d, rank=rank, dups=draw(st.integers(0, n // 3)), zeros=draw(st.integers(0, n // 4)),
                         scale=draw(st.sampled_from([1e-3, 1.0, 50.0])), seed=draw(st.integers(0, 2**16)), batch=b)
    k = draw(st.integers(1, n))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    weights = torch.rand(b, n, generator=gen) if draw(st.booleans()) else None
    first = torch.randint(0, n, (b,), generator=gen) if draw(st.booleans()) else None
    row_scale = torch.rand(b, n, generator=gen) + 0.1 if draw(st.booleans()) else None
    return tokens, k, weights, first, row_scale


def _same(tokens, got, ref, weights=None, row_scale=None):
    assert got.shape == ref.shape and got.dtype == torch.long
    for i in range(tokens.shape[0]):
        v = tokens[i] if row_scale is None else tokens[i] * row_scale[i, :, None]
        assert_same_up_to_ties(v, got[i].tolist(), ref[i].tolist(), None if weights is None else weights[i])


@interpreted
@pytest.mark.parametrize("variant", ["persistent", "step"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_residual_kernels_pick_what_the_pytorch_loop_picks(monkeypatch, variant, case):
    tokens, k, weights, first, row_scale = case
    monkeypatch.setattr(kernels, "choose_variant", lambda b, n: variant)
    ref = greedy_residual_select(tokens, k, weights=weights, first=first, row_scale=row_scale, method="gram")
    got = greedy_residual_select(tokens, k, weights=weights, first=first, row_scale=row_scale, method="triton")
    _same(tokens, got, ref, weights, row_scale)


@interpreted
@pytest.mark.parametrize("variant", ["persistent", "step"])
def test_residual_kernels_across_blocks_and_exact_ties(monkeypatch, variant):
    """Several blocks of tokens per image (the cross-block argmax), duplicate rows whose
    energies tie exactly (the lower index wins) and a budget above the rank (fallback order)."""
    monkeypatch.setattr(kernels, "choose_variant", lambda b, n: variant)
    tokens = make_tokens(90, 6, dups=30, zeros=8, seed=4, batch=2)
    for k in (5, 40):
        ref = greedy_residual_select(tokens, k, method="gram")
        got = greedy_residual_select(tokens, k, method="triton")
        _same(tokens, got, ref)
    one = kernels.residual_select(*_prepared(tokens, 24), first=None, k=24, variant=variant, block_n=16)
    _same(tokens, one, greedy_residual_select(tokens, 24, method="gram"))


def _prepared(tokens, k):
    """Gram matrix, energies, weights, floors and fallback keys as the PyTorch loop builds them."""
    v = tokens.float()
    e0 = v.pow(2).sum(-1)
    w = torch.ones_like(e0)
    order = torch.sort(w * e0, dim=-1, descending=True, stable=True).indices
    fallback = torch.empty_like(e0).scatter_(1, order, -1.0 - torch.arange(e0.shape[1]).float().expand_as(e0)
                                             .contiguous())
    return torch.bmm(v, v.transpose(1, 2)), e0, w, e0 * 1e-4, fallback


@interpreted
@pytest.mark.parametrize("selector, params", [("residual_energy", {"seed": "norm", "alpha": 0.75}),
                                              ("dpp", {}), ("dpp", {"normalize": "none"})])
def test_selectors_with_method_triton(selector, params):
    tokens = make_tokens(48, 12, seed=7, batch=2)
    scores = {"norm": tokens.norm(dim=-1), "relevance": torch.rand(2, 48, generator=torch.Generator().manual_seed(1))}
    ref = resprune.select(tokens, 16, selector=selector, scores=scores, order="selection", method="gram", **params)
    got = resprune.select(tokens, 16, selector=selector, scores=scores, order="selection", method="triton", **params)
    assert torch.equal(got, ref)


@interpreted
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(max_n=48))
def test_divprune_kernel_picks_exactly_what_the_pytorch_loop_picks(case):
    """Max-min only compares distances, so the picks are identical, ties included."""
    tokens, k, *_ = case
    unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    dist = 1.0 - unit @ unit.transpose(1, 2)
    ref = greedy_max_min(dist, k, "torch")
    assert torch.equal(greedy_max_min(dist, k, "triton"), ref)


@interpreted
def test_auto_uses_the_kernels_on_cuda_only():
    from resprune.linalg import choose_method

    assert kernels.available("cpu")  # the interpreter
    assert choose_method(576, 4096, 64, device="cpu") in ("gram", "blocked")
    assert kernels.available("meta") is False


@interpreted
def test_kernels_are_unavailable_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.available("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["persistent", "step"])
def test_cuda_kernels_match_the_cpu_reference(monkeypatch, variant):
    monkeypatch.setattr(kernels, "choose_variant", lambda b, n: variant)
    tokens = make_tokens(2000, 256, seed=3, batch=2)
    ref = greedy_residual_select(tokens, 200, method="gram")
    got = greedy_residual_select(tokens.cuda(), 200, method="triton").cpu()
    _same(tokens, got, ref)


@interpreted
@pytest.mark.parametrize("variant", ["persistent", "step"])
@pytest.mark.parametrize("tokens", [torch.eye(40).expand(2, 40, 40) * 3.0, torch.zeros(2, 40, 5)],
                         ids=["orthogonal", "zero"])
def test_exact_ties_go_to_the_lower_index_across_blocks(monkeypatch, variant, tokens):
    """Orthogonal tokens of equal norm tie exactly at every step, zero tokens in the fallback
    order: the picks are 0, 1, 2, ... however the tokens are split into blocks."""
    monkeypatch.setattr(kernels, "choose_variant", lambda b, n: variant)
    expected = torch.arange(20).expand(2, 20)
    assert torch.equal(greedy_residual_select(tokens, 20, method="gram"), expected)
    for block in (16, 64):
        got = kernels.residual_select(*_prepared(tokens, 20), first=None, k=20, variant=variant, block_n=block)
        assert torch.equal(got, expected), block


@interpreted
def test_divprune_kernel_ties_across_blocks():
    tokens = torch.eye(40).expand(2, 40, 40)  # every distance is 1: each step ties across all blocks
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    dist = 1.0 - unit @ unit.transpose(1, 2)
    nearest = dist.masked_fill(torch.eye(40, dtype=torch.bool), float("inf")).min(-1).values
    for block in (16, 64):
        assert torch.equal(kernels.divprune_select(dist, nearest, 30, block_n=block), torch.arange(30).expand(2, 30))


def test_every_kernel_compiles_to_hopper_machine_code(monkeypatch):
    """The interpreter does not type-check as the GPU compiler does (a subnormal float literal
    once passed every interpreted test and failed on the H200): compile every specialisation
    the launchers use to sm_90 machine code with the ptxas in Triton's wheel; no spills."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend")
    from resprune.kernels.compile import SPECIALISATIONS, compile_all

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the GPU compiler's own semantics
    rows = compile_all(90)
    assert len(rows) == len(SPECIALISATIONS) == 10
    assert [r["error"] for r in rows if "error" in r] == []
    for r in rows:
        assert r["local"] in (0, None), f"{r['kernel']} spills {r['local']} bytes to local memory"
