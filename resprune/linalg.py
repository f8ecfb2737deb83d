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
- ``blocked`` (CPU): Gram columns for a block of ``BLOCK`` likely picks at once, one GEMM
  that reads ``V`` once. The block is predicted by running the greedy ahead on the
  ``LOOKAHEAD * BLOCK`` tokens of highest weighted energy (their residual Gram matrix is
  small); a pick outside the block refills it, keeping the columns still predicted. Exact
  (the same columns, whichever tokens get picked): a wrong prediction costs time, never a
  different pick. About as many columns get computed as picks are made, so ``V`` is read
  ``k / BLOCK`` times instead of ``k`` times, and the steps run on NumPy views, whose
  per-op cost is a tenth of PyTorch's at these sizes.

``incremental`` and ``gram`` are vectorised over the batch and never read a tensor value on
the host, so on a GPU the loop queues without synchronising. ``blocked`` reads the pick on
the host every step and runs row by row on the CPU (other devices' tensors are copied
there), so ``auto`` picks it on CPU only.

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

import math
from typing import Literal

import numpy as np
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
"""Gram columns the ``blocked`` method computes per refill (32 with ``LOOKAHEAD = 4`` was the
fastest of 16-128 and 1-8 on a 2-core CPU, on video clips of 4096 tokens and on images of
576 and 2880)."""


LOOKAHEAD = 4
"""A ``blocked`` refill predicts its next picks from a pool of this many times ``BLOCK``."""

GRAM_MAX_N = 1024
"""On CPU ``auto`` forms the ``N x N`` Gram matrix (``gram``) only up to this many tokens..."""

GRAM_MIN_BATCH = 4
"""...and for a batch of at least this many images (``blocked`` runs image by image)."""


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

    On CPU: ``gram`` for a batch of at least ``GRAM_MIN_BATCH`` images of at most ``GRAM_MAX_N``
    tokens when ``4k > N``; for narrow tokens (``d < NARROW``, tiny models) the cheaper of the
    Gram GEMM (``2 N^2 d``) and one product per step over the at most ``d`` steps before the
    rank runs out; else ``blocked``. Measured (``python benchmarks/bench_selection.py --auto``;
    committed in ``benchmarks/results/auto-cpu.json`` and checked by a test): for one image
    ``blocked`` is the fastest or within 5 % at every Table I budget at N = 576 and 2880 and on
    video clips of 2048 and 4096 tokens (2x ``gram`` at N = 4096, k = 1024), and it never forms
    an ``N x N`` matrix; ``gram`` shares its loop over a batch, and at N = 576, k = 192 it wins
    from 4 images on (97 against 134 ms; 310 against 475 ms for 16).

    Elsewhere (no host checks in the loop): a rough cost model calibrated on a 2-core CPU, the Gram GEMM at about 150 GFLOP/s against per-step matrix-vector products
    at memory speed (about 60 GB/s while ``V`` fits in cache, 20 GB/s beyond).
    """
    if torch.device(device).type == "cpu":
        if 4 * k > n and n <= GRAM_MAX_N and batch >= GRAM_MIN_BATCH:
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

    if method == "blocked":
        return _blocked_rows(v, k, energy0, w, floor, fallback, first, rs, trace, until_fraction, counts)

    rows_n = torch.arange(b, device=v.device) * n
    energy = energy0.clone()
    factor = torch.zeros(b, k, n, device=v.device, dtype=v.dtype)  # row t: the new column c of step t
    picks: list[Tensor] = []
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
            col = torch.bmm(v, v.view(b * n, d).index_select(0, flat).unsqueeze(-1)).squeeze(-1)
            if rs is not None:
                col.mul_(rs).mul_(rs.take(flat).unsqueeze(-1))
        if t > 0:  # minus the part along the columns so far: col -= L[pick, :t] @ L[:t, :]
            prev = factor[:, :t]  # [B, t, N]
            at_pick = prev.gather(2, pick.view(b, 1, 1).expand(b, t, 1))  # [B, t, 1]
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


def _blocked_rows(v: Tensor, k: int, energy0: Tensor, w: Tensor, floor: Tensor, fallback: Tensor,
                  first: Tensor | None, row_scale: Tensor | None, trace: list[Tensor] | None,
                  until_fraction: float | None, counts: list[int] | None) -> Tensor:
    """The ``blocked`` method: each row on its own on the CPU (``_blocked_row``), the result on
    ``v``'s device. Rows run one by one because each refills its cache at its own steps; on a
    2-core CPU that is faster than the batched loop even for 16 images of 576 tokens."""
    device = v.device
    cpu = [None if x is None else x.cpu() for x in (v, energy0, w, floor, fallback, first, row_scale)]
    v, energy0, w, floor, fallback, first, row_scale = cpu
    b = v.shape[0]

    def row(i: int, picks: int, target: float | None) -> tuple[list[int], list[Tensor] | None]:
        row_trace: list[Tensor] | None = [] if trace is not None else None
        out = _blocked_row(v[i], energy0[i], w[i], floor[i], fallback[i].clone(),
                           None if first is None else int(first[i]), None if row_scale is None else row_scale[i],
                           picks, target, row_trace)
        return out, row_trace

    rows, traces = map(list, zip(*(row(i, k, until_fraction) for i in range(b))))  # each stops at its own count
    own = [len(r) for r in rows]
    steps = max(own)
    for i in range(b):  # with an energy target every row runs to the latest stop (as the batched loop)
        if own[i] < steps:
            rows[i], traces[i] = row(i, steps, None)
    if trace is not None:
        trace.extend(torch.stack(step).to(device) for step in zip(*traces))
    if until_fraction is not None and counts is not None:
        counts.extend(own)
    return torch.tensor(rows, dtype=torch.long, device=device).view(b, steps)


def _blocked_row(v: Tensor, energy0: Tensor, w: Tensor, floor: Tensor, fallback: Tensor, first: int | None,
                 row_scale: Tensor | None, k: int, until_fraction: float | None,
                 trace: list[Tensor] | None) -> list[int]:
    """One row ``[N, d]`` of the ``blocked`` method on CPU: the picks, up to the one that reaches
    the energy target if there is one. The steps of the batched loop, run on NumPy views of the same memory
    (a PyTorch op's dispatch costs more than its math on ``N`` numbers, a NumPy one about a tenth
    of that); Gram columns come from a ``Block`` cache, refilled in PyTorch. ``fallback`` is
    consumed."""
    n = v.shape[0]
    energy = energy0.clone()
    cache = Block(v, k, energy, w, floor, row_scale)
    factor = torch.zeros(k, n, dtype=v.dtype)  # row t: the new column c of step t
    e, wt, fl, fb, f_np = energy.numpy(), w.numpy(), floor.numpy(), fallback.numpy(), factor.numpy()  # views
    left = None if until_fraction is None else float((1.0 - until_fraction) * energy0.sum())
    key, dead = np.empty_like(e), np.empty(n, dtype=bool)
    picks: list[int] = []
    for t in range(k):
        np.multiply(e, wt, out=key)  # the live key w * e; a token at or below its floor gets its fallback key
        np.less_equal(e, fl, out=dead)
        np.copyto(key, fb, where=dead)
        if t == 0 and first is not None:
            p = first
        else:
            p = int(key.argmax())  # the first maximum: ties go to the lower index
            if trace is None and t > 0 and key[p] < 0:  # live keys are >= 0: nothing left above the floors
                picks.extend(fallback.topk(k - t).indices.tolist())  # what the next argmaxes would return
                break
        picks.append(p)
        fb[p] = -np.inf
        e_pick = float(e[p])
        col, built = cache.column(p, key, t, factor)
        if t > built:  # minus the part along the factor rows since the cache was corrected
            col = col - f_np[built:t, p] @ f_np[built:t]
        scale = 1.0 / math.sqrt(e_pick) if e_pick > fl[p] else 0.0  # 0: a degenerate pick
        c = np.multiply(col, np.float32(scale), out=f_np[t])
        e -= c * c
        np.maximum(e, 0.0, out=e)
        e[p] = 0.0
        if trace is not None:
            trace.append(energy.clone())
        if left is not None and float(e.sum()) <= left:
            break
    return picks


class Block:
    """The ``blocked`` method's cache for one row: Gram columns ``V v_j`` (of the tokens scaled by
    ``row_scale``) for up to ``2 * BLOCK`` tokens ``j``, all corrected for the picks before step
    ``built``.

    A pick that is not cached refills it with the tokens the next steps will most likely pick
    (``_predict``), up to ``BLOCK`` of them new to the cache. Columns of tokens still among them
    are kept, brought up to date with one small GEMM over the picks since the last refill; the
    new tokens cost a column ``V v_j`` each (one GEMM reads ``V`` once for all of them) minus its
    part along every factor row so far (one more). A refill computes ``BLOCK`` new columns
    whenever that many picks are left: MKL's GEMM runs 1.5-2x slower per column at 29-31
    columns than at 32.
    """

    def __init__(self, v: Tensor, k: int, energy: Tensor, weights: Tensor, floor: Tensor,
                 row_scale: Tensor | None) -> None:
        self.v, self.k, self.row_scale = v, k, row_scale
        self.energy, self.weights, self.floor = energy, weights, floor  # energy: the loop's, updated in place
        n = v.shape[0]
        self.size = min(2 * BLOCK, k, n)
        self.slot = torch.full((n,), -1, dtype=torch.long)  # token -> column, -1: absent
        self.tokens = torch.empty(0, dtype=torch.long)  # column -> token
        self.cols = torch.empty(self.size, n, dtype=v.dtype)  # [column, token]
        self.built = 0
        self._slot, self._cols = self.slot.numpy(), self.cols.numpy()  # views, for the loop's reads

    def column(self, pick: int, key: np.ndarray, t: int, factor: Tensor) -> tuple[np.ndarray, int]:
        """``(col, built)``: the pick's Gram column (a view) and the step it is corrected up to."""
        if self._slot[pick] < 0:
            self._refill(pick, torch.from_numpy(key), t, factor)
        return self._cols[self._slot[pick]], self.built

    def _refill(self, pick: int, key: Tensor, t: int, factor: Tensor) -> None:
        left = min(self.k - t, self.v.shape[0] - t)  # picks still to make
        cand, pool_factor = self._predict(pick, key, t, factor, min(BLOCK, left), min(self.size, left))
        m = cand.numel()
        had = self.slot.index_select(0, cand)  # the column of each candidate already cached, or -1
        kept, new = (had >= 0).nonzero().flatten(), (had < 0).nonzero().flatten()
        cols = torch.empty(m, self.v.shape[0], dtype=self.v.dtype)
        if kept.numel():  # cached columns, minus the factor rows since they were last corrected
            old = self.cols.index_select(0, had.index_select(0, kept))
            since = factor[self.built:t]  # [t - built, N]
            if since.shape[0]:
                old = torch.addmm(old, since.index_select(1, cand.index_select(0, kept)).T, since, alpha=-1.0)
            cols.index_copy_(0, kept, old)
        if new.numel():
            fresh_tokens = cand.index_select(0, new)
            fresh = self.v @ self.v.index_select(0, fresh_tokens).T  # [N, m_new]: reads V once
            if self.row_scale is not None:
                fresh.mul_(self.row_scale.unsqueeze(1)).mul_(self.row_scale.index_select(0, fresh_tokens))
            if t:  # minus L[:t, :]^T L[:t, new], one GEMM instead of one product per later step
                fresh = torch.addmm(fresh, factor[:t].T, pool_factor.index_select(1, new), alpha=-1.0)
            cols.index_copy_(0, new, fresh.T)
        self.cols[:m] = cols
        self.slot.index_fill_(0, self.tokens, -1).index_copy_(0, cand, torch.arange(m))
        self.tokens = cand
        self.built = t

    def _predict(self, pick: int, key: Tensor, t: int, factor: Tensor, fresh: int,
                 most: int) -> tuple[Tensor, Tensor]:
        """``(tokens, factor[:t, tokens])``: the tokens the next steps will most likely pick, in that
        order, ``pick`` first, up to the ``fresh``-th not cached or ``most`` in all. The greedy runs
        ahead exactly on a pool of the ``LOOKAHEAD * BLOCK`` best tokens by ``key`` (their residual
        Gram matrix is small), as if no token outside the pool could overtake; a wrong guess only
        costs an earlier refill."""
        n = self.v.shape[0]
        others = key.clone()
        others[pick] = float("-inf")
        pool = torch.cat([torch.tensor([pick]), others.topk(min(LOOKAHEAD * BLOCK, n - t) - 1).indices])  # [P]
        pool_factor = factor[:t].index_select(1, pool)  # [t, P]
        cached = self._slot[pool.numpy()] >= 0
        if most == 1 or pool.numel() <= most and int((~cached).sum()) <= fresh:
            return pool[:most], pool_factor[:, :most]
        vp = self.v.index_select(0, pool)
        gram = vp @ vp.T
        if self.row_scale is not None:
            rs = self.row_scale.index_select(0, pool)
            gram.mul_(rs.unsqueeze(0)).mul_(rs.unsqueeze(1))
        if t:
            gram = torch.addmm(gram, pool_factor.T, pool_factor, alpha=-1.0)
        # the run-ahead: a few dozen steps on P numbers, in NumPy, in float64
        g = gram.double().numpy()
        e = self.energy.index_select(0, pool).double().numpy()
        w = self.weights.index_select(0, pool).double().numpy()
        live_floor = self.floor.index_select(0, pool).double().numpy()
        prev = np.zeros((most, pool.numel()))
        chosen, out = [0], np.zeros(pool.numel(), dtype=bool)  # out: taken, or at or below its floor
        keys = np.empty_like(e)
        new = 1  # the pick is not cached
        for j in range(most - 1):
            if new == fresh:
                break
            p = chosen[-1]
            out[p] = True
            col = g[p] - prev[:j, p] @ prev[:j]
            prev[j] = col / np.sqrt(e[p]) if e[p] > live_floor[p] else 0.0
            e -= prev[j] ** 2
            np.multiply(e, w, out=keys)
            np.copyto(keys, -1.0, where=out | (e <= live_floor))
            nxt = int(keys.argmax())
            if keys[nxt] < 0:  # nothing live left in the pool: fill up with the best by key
                break
            chosen.append(nxt)
            new += int(not cached[nxt])
        if new < fresh and len(chosen) < most:
            rest = np.ones(pool.numel(), dtype=bool)
            rest[chosen] = False
            for i in np.flatnonzero(rest).tolist():
                if new == fresh or len(chosen) == most:
                    break
                chosen.append(i)
                new += int(not cached[i])
        index = torch.tensor(chosen)
        return pool.index_select(0, index), pool_factor.index_select(1, index)


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
