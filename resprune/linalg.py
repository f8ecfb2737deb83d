"""Greedy subspace selection: the shared kernel of ``residual_energy`` and ``dpp``.

Both are greedy pivoted Cholesky factorisations of a Gram matrix ``G = V V^T``:
step ``t`` picks the token whose residual energy ``e_i = ||v_i - P_S v_i||^2`` (the
diagonal of the Schur complement), times a fixed weight, is largest, and then updates
every residual with one new column ``c = V q_t`` of the factor, ``e <- e - c^2``, where
``q_t`` is the Gram-Schmidt direction of the new token. ``c`` is computed without ever
forming ``q_t``: ``c = (V v_i* - L L[i*]^T) / sqrt(e_i*)``, with ``L`` the columns so far.

Three ways to get ``V v_i*``, with identical results up to float rounding:

- ``incremental``: one matrix-vector product per step, ``O(k N d)`` memory-bound work;
- ``gram``: ``G = V V^T`` once (one GEMM, ``O(N^2 d)`` compute-bound), then a row read;
- ``blocked``: Gram columns for a block of likely picks at once: the pick and the next
  ``BLOCK - 1`` tokens by current weighted energy, one small GEMM that reads ``V`` once.
  Residual energies never grow, so later picks are mostly in the block; a pick outside it
  computes a new block. Exact (the same columns, whichever tokens get picked), and on CPU
  2-3x faster than the other two at the paper's sizes, because ``V`` is read a few times
  instead of ``k`` times.

Everything is vectorised over the batch. ``incremental`` and ``gram`` never read a tensor
value on the host, so on a GPU the loop queues without synchronising; ``blocked`` checks
for a miss on the host each step, so ``auto`` picks it on CPU only.

Scale: the selection does not change when every token of an image is multiplied by the
same factor, but float32 squares overflow above about ``1e19`` and underflow below about
``1e-19``. ``safe_scale`` multiplies an image's tokens by a power of two (exact: every
product and sum scales exactly, so the picks are bit-identical) whenever its squared norms
leave ``[2^-60, 2^60]``; on CPU only then, elsewhere always (checking would synchronise).

Degenerate inputs: a token whose residual energy is at or below ``tol * ||v_i||^2`` lies
(numerically) in the span already kept and is never picked greedily. When no unselected
token is left above that tolerance (budget above the rank, duplicated or zero tokens),
the remaining picks are the unselected tokens in descending order of initial weighted
energy ``w_i ||v_i||^2``, ties broken by the lower index. So exactly ``k`` distinct
indices always come back.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["greedy_residual_select", "choose_method", "safe_scale", "unit_rows", "METHODS", "span_residual",
           "optimal_residual", "DEFAULT_TOL", "BLOCK"]

DEFAULT_TOL = 1e-4
"""Relative residual energy below which a token counts as inside the kept span."""

Method = Literal["auto", "incremental", "gram", "blocked", "triton"]
METHODS: tuple[str, ...] = ("auto", "incremental", "gram", "blocked", "triton")
"""The values of the ``method`` param of ``residual_energy`` and ``dpp``."""

BLOCK = 32
"""Gram columns computed per block by the ``blocked`` method (the best of 16/32/64 measured
on a 2-core CPU over Gaussian, low-rank, clustered and spatially smooth tokens)."""


NARROW = 512
"""Below this token width (tiny test models) ``auto`` on CPU does not use ``blocked``."""

SAFE_EXPONENT = 60
"""``safe_scale`` leaves squared norms in ``[2^-60, 2^60]`` alone (on CPU)."""


def unit_rows(v: Tensor) -> Tensor:
    """Rows divided by their L2 norm; a zero row stays zero (no division by 0)."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def safe_scale(v: Tensor, energy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(v * 2^-e, squared row norms)`` per image, with ``e`` putting the image's largest
    entry in ``[0.5, 1)``, where float32 squares of ``v`` could overflow or underflow.

    ``v`` is float32 ``[B, N, d]``; ``energy`` its squared row norms ``[B, N]`` if already
    computed. Power-of-two factors are exact, so selections on the result equal those on
    ``v`` whenever ``v`` itself was in range. On CPU, images in range are returned as they
    are; on other devices every image is rescaled (no host synchronisation).
    """
    if energy is None:
        energy = v.pow(2).sum(-1)
    if v.device.type == "cpu":
        top = energy.amax(dim=-1)
        low, high = 2.0 ** -SAFE_EXPONENT, 2.0 ** SAFE_EXPONENT
        if bool(((top >= low) & (top <= high)).all()):  # 0 may be an underflow: rescale to tell
            return v, energy
    lo, hi = torch.aminmax(v.reshape(v.shape[0], -1), dim=-1)
    peak = torch.maximum(hi, -lo)
    exponent = torch.frexp(peak).exponent  # peak = m * 2^exponent, m in [0.5, 1); 0 for a zero image
    scale = torch.ldexp(torch.ones_like(peak), -exponent).view(-1, 1, 1)
    v = v * scale
    return v, v.pow(2).sum(-1)


def choose_method(n: int, d: int, k: int, *, batch: int = 1,
                  device: torch.device | str = "cpu") -> Literal["incremental", "gram", "blocked", "triton"]:
    """Pick the cheaper way to get Gram columns for a ``[B, N, d]`` input and budget ``k``.

    On a CUDA device with Triton installed: ``triton`` (``resprune.kernels``: the Gram
    matrix from one GEMM, then the whole loop in fused kernels).

    On CPU: ``gram`` when ``4k > N``; for narrow tokens (``d < NARROW``, tiny models) the
    cheaper of the Gram GEMM (``2 N^2 d``) and one product per step over the at most ``d``
    steps before the rank runs out; else ``blocked``. The crossover is measured at the paper's
    budgets (``python benchmarks/bench_selection.py --auto``; committed in
    ``benchmarks/results/auto-cpu.json`` and checked by a test): at N = 576, d = 4096 ``blocked``
    costs about 0.23 ms a pick against about 30 ms for the whole ``gram`` path, so they cross
    between k = N/5 and N/4 (at N = 2880 ``blocked`` stays ahead up to k = 192 at least).

    Elsewhere (no host checks in the loop): a rough cost model calibrated on a 2-core CPU, the Gram GEMM at about 150 GFLOP/s against per-step matrix-vector products
    at memory speed (about 60 GB/s while ``V`` fits in cache, 20 GB/s beyond).
    """
    if torch.device(device).type == "cpu":
        if 4 * k > n:
            return "gram"
        if d < NARROW:  # tiny models: blocks do not pay, and at most d steps run (the rank)
            return "gram" if n < 20 * min(k, d) else "incremental"
        return "blocked"
    from . import kernels

    if kernels.available(device):
        return "triton"
    gram_s = 2.0 * batch * n * n * d / 150e9
    nbytes = 4.0 * batch * n * d  # every step reads all of V
    bandwidth = 60e9 if nbytes <= 24 * 2**20 else 20e9
    incremental_s = k * nbytes / bandwidth
    return "gram" if gram_s < incremental_s else "incremental"


def greedy_residual_select(
    tokens: Tensor,
    k: int,
    *,
    weights: Tensor | None = None,
    first: Tensor | None = None,
    tol: float = DEFAULT_TOL,
    method: Method = "auto",
    trace: list[Tensor] | None = None,
    row_scale: Tensor | None = None,
    energy0: Tensor | None = None,
    until_fraction: float | None = None,
    counts: list[int] | None = None,
) -> Tensor:
    """Greedily pick ``k`` tokens maximising weighted residual energy.

    Args:
        tokens: float32 ``[B, N, d]``.
        k: number of picks, ``1 <= k <= N``.
        weights: ``[B, N]`` non-negative weights ``w_i`` (``None``: all ones).
        first: ``[B]`` int64 forced first pick per row (``None``: the first pick is the
            argmax of weighted energy like every other).
        tol: relative residual-energy tolerance (see the module docstring).
        method: ``"incremental"``, ``"gram"``, ``"blocked"``, ``"triton"`` (``resprune.kernels``;
            CUDA, or CPU under ``TRITON_INTERPRET=1``) or ``"auto"`` (``choose_method``).
        trace: if a list is given, the residual energies ``[B, N]`` after each pick are
            appended to it (for tests and analysis).
        row_scale: ``[B, N]``: select as if token ``i`` were ``row_scale_i * v_i``, without
            materialising the scaled copy (``dpp`` uses it for ``r_i v_i / ||v_i||``).
        energy0: ``[B, N]`` the exact initial energies of the (scaled) tokens when they are
            known in closed form (``dpp``: ``r_i^2``), so that exact ties stay exact ties and
            go to the lower index whatever the memory layout. ``tokens`` must then already be
            in a safe range (``safe_scale``).
        until_fraction: stop once the kept tokens' span holds this fraction of every row's
            energy (the sum of the tokens' squared norms): the picks then number the most any row
            needed, at most ``k`` (a PyTorch method: ``triton`` becomes ``gram``).
        counts: with ``until_fraction``, each row's own count is appended to this list (``k``
            for a row that never got there).

    Returns:
        int64 ``[B, k]`` indices in the order picked (``[B, t]``, ``t <= k``, with ``until_fraction``).
    """
    b, n, d = tokens.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, N={n}], got {k}")
    v = tokens.float()
    if method == "auto":
        method = choose_method(n, d, k, batch=b, device=v.device)
    if until_fraction is not None and method == "triton":
        method = "gram"  # the fused kernels run all k steps
    v = v.contiguous()  # one layout, so equal values give equal sums whatever the caller's strides
    if energy0 is None:
        v, energy0 = safe_scale(v)  # [B, N]
        if row_scale is not None:
            energy0 = energy0 * row_scale.float().square()
    else:
        energy0 = energy0.float()
    rs = None if row_scale is None else row_scale.float()
    gram = torch.bmm(v, v.transpose(1, 2)) if method in ("gram", "triton") else None
    if gram is not None and rs is not None:
        gram.mul_(rs.unsqueeze(-1)).mul_(rs.unsqueeze(1))
    w = torch.ones_like(energy0) if weights is None else weights.float()
    floor = energy0 * tol  # per-token degeneracy threshold
    # Fallback keys, below every live key (live keys are w * e >= 0): higher initial weighted
    # energy first, then the lower index. One argmax per step then covers both regimes.
    order = torch.sort(w * energy0, dim=-1, descending=True, stable=True).indices
    fallback = torch.empty_like(energy0)
    fallback.scatter_(1, order, -1.0 - torch.arange(n, device=v.device, dtype=v.dtype).expand(b, n).contiguous())

    if method == "triton":
        if trace is not None:
            raise ValueError("trace= needs a PyTorch method (incremental, gram or blocked), not triton")
        from . import kernels

        return kernels.residual_select(gram, energy0, w, floor, fallback, first, k)

    rows_n = torch.arange(b, device=v.device) * n
    energy = energy0.clone()
    factor = torch.zeros(b, k, n, device=v.device, dtype=v.dtype)  # row t: the new column c of step t
    picks: list[Tensor] = []
    cache = Block(v, k) if method == "blocked" else None
    on_cpu = v.device.type == "cpu"
    if until_fraction is not None:
        left = (1.0 - until_fraction) * energy0.sum(-1)  # [B]: the residual energy a row stops at
        reached = torch.full((b,), -1, dtype=torch.long, device=v.device)

    # One step: about 20 tensor ops, no Python scalar turned into a tensor and, off the CPU, no
    # host synchronisation. A taken token's energy is set to exactly 0 (below every floor) and
    # its fallback key to -inf, so no later argmax returns it again.
    for t in range(k):
        live = energy > floor
        if on_cpu and trace is None and t > 0 and not bool(live.any()):
            # nothing left above the tolerance: energies only fall, so the remaining picks are the
            # fallback order of the tokens not taken (what the next argmaxes would return one by one)
            picks.extend(fallback.topk(k - t, dim=-1).indices.unbind(1))
            break
        key = torch.where(live, energy * w, fallback)
        pick = key.argmax(dim=-1) if t > 0 or first is None else first.to(device=v.device, dtype=torch.long)
        picks.append(pick)  # argmax takes the first maximum: ties go to the lower index
        flat = rows_n + pick  # flat index of each row's pick (cheaper than advanced indexing)
        fallback.view(-1).index_fill_(0, flat, float("-inf"))
        e_pick = energy.take(flat)  # [B]
        if gram is not None:
            col = gram.view(b * n, n).index_select(0, flat)  # [B, N] (G is symmetric)
        else:
            if cache is not None:  # scaled, and corrected for the steps before `done`
                col, done = cache.column(pick, flat, key, t, factor, rs)
            else:
                col = torch.bmm(v, v.view(b * n, d).index_select(0, flat).unsqueeze(-1)).squeeze(-1)
                if rs is not None:
                    col.mul_(rs).mul_(rs.take(flat).unsqueeze(-1))
        start = 0 if cache is None else done
        if t > start:  # minus the part along the columns so far: col -= L[pick, start:t] @ L[start:t, :]
            prev = factor[:, start:t]  # [B, t - start, N]
            at_pick = prev.gather(2, pick.view(b, 1, 1).expand(b, t - start, 1))  # [B, t - start, 1]
            if cache is not None and b > 1:  # a row whose block is younger is corrected up to its own start
                at_pick = at_pick * (torch.arange(start, t, device=v.device).view(1, -1, 1)
                                     >= cache.built.view(b, 1, 1))
            col = torch.baddbmm(col.unsqueeze(1), at_pick.transpose(1, 2), prev, alpha=-1.0).squeeze(1)
        # 1 / sqrt(e_pick), or 0 for a degenerate pick (at or below its floor): rsqrt(inf) = 0
        scale = e_pick.masked_fill_(e_pick <= floor.take(flat), float("inf")).rsqrt_()
        c = torch.mul(col, scale.unsqueeze(-1), out=factor[:, t])
        energy.addcmul_(c, c, value=-1.0).clamp_min_(0.0)
        energy.view(-1).index_fill_(0, flat, 0.0)
        if trace is not None:
            trace.append(energy.clone())
        if until_fraction is not None:
            reached = torch.where((reached < 0) & (energy.sum(-1) <= left), t + 1, reached)
            if bool((reached >= 0).all()):  # a host read per step: only with an energy target
                break
    if until_fraction is not None and counts is not None:
        counts.extend(torch.where(reached < 0, len(picks), reached).tolist())
    return torch.stack(picks, dim=1)


class Block:
    """The ``blocked`` method's cache: per row, Gram columns ``V v_j`` for a block of tokens ``j``,
    already corrected for the picks made before the block was built."""

    def __init__(self, v: Tensor, k: int) -> None:
        self.v, self.k = v, k
        b, n, _ = v.shape
        self.slot = torch.full((b, n), -1, dtype=torch.long, device=v.device)  # token -> column, -1: absent
        self.cols = torch.empty(b, n, min(BLOCK, k, n), dtype=v.dtype, device=v.device)
        self.built = torch.zeros(b, dtype=torch.long, device=v.device)  # the step each row's block was built at
        self._built = [0] * b

    def column(self, pick: Tensor, flat: Tensor, key: Tensor, t: int, factor: Tensor,
               row_scale: Tensor | None) -> tuple[Tensor, int]:
        """``(col, start)``: per row ``[B, N]`` the Gram column ``V v_pick`` (of the tokens scaled by
        ``row_scale``) minus its part along the factor rows before the row's block was built, and
        the first step not yet subtracted (the earliest over the rows). A row whose pick is not cached gets a new block: the pick and the
        next best tokens by ``key``, in one GEMM that reads that row's ``V`` once and one that
        subtracts the ``t`` factor rows so far (so each later step corrects only the picks since)."""
        b, n, _ = self.v.shape
        slot = self.slot.take(flat)
        missing = (slot < 0).nonzero().flatten().tolist()  # the host check that keeps this method on CPU
        if missing:
            m = min(self.cols.shape[-1], self.k - t, n - t)
            for row in missing:
                others = key[row].clone()
                others[pick[row]] = float("-inf")
                cand = torch.cat([pick[row].view(1), others.topk(m - 1).indices])
                vr = self.v[row]  # [N, d], a view
                cols = vr @ vr.index_select(0, cand).T  # [N, m]
                if row_scale is not None:
                    cols.mul_(row_scale[row].unsqueeze(1)).mul_(row_scale[row].index_select(0, cand))
                if t:  # minus L[:t, :]^T L[:t, cand], one GEMM instead of one product per later step
                    prev = factor[row, :t]  # [t, N]
                    cols = torch.addmm(cols, prev.T, prev.index_select(1, cand), alpha=-1.0)
                self.cols[row, :, :m] = cols
                self.slot[row].fill_(-1).scatter_(0, cand, torch.arange(m, device=self.v.device))
                self.built[row] = t
                self._built[row] = t
            slot = self.slot.take(flat)
        return self.cols.gather(2, slot.view(b, 1, 1).expand(b, n, 1)).squeeze(-1), min(self._built)


def span_residual(tokens: Tensor, kept: Tensor | list[int]) -> float:
    """``||V - P_S V||_F^2``: energy of all tokens outside the span of the kept ones (float64).

    A squared norm: rounding below zero (keeping every token) is clamped to 0."""
    v = tokens.double()
    basis = v[torch.as_tensor(kept, dtype=torch.long, device=v.device)]
    if basis.numel() == 0:
        return float(v.pow(2).sum())
    u, s, vh = torch.linalg.svd(basis, full_matrices=False)
    q = vh[s > s.max() * 1e-10] if float(s.max()) > 0 else vh[:0]
    return max(float(v.pow(2).sum() - (v @ q.T).pow(2).sum()), 0.0)


def optimal_residual(tokens: Tensor, k: int) -> float:
    """The least ``||V - P V||_F^2`` over rank-``k`` projectors: the SVD tail (float64)."""
    s = torch.linalg.svdvals(tokens.double())
    return float(s[k:].pow(2).sum())
