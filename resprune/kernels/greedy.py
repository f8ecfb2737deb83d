"""Triton kernels of the greedy selection loops (residual energy / DPP, and DivPrune).

Written as plain functions and decorated with ``triton.jit`` on first use (``build``), once
per mode, since Triton reads ``TRITON_INTERPRET`` when it decorates: one process can run
them on a GPU, or on CPU tensors under Triton's interpreter, which is how CI tests them
against the PyTorch reference. Importing this module needs Triton.

Residual energy (pivoted Cholesky on a Gram matrix ``G [B, N, N]``), two shapes:

- ``residual_persistent``: one program per image runs the whole loop (argmax, new factor
  row, energy update); launch once. Best for small ``N`` and for batches.
- ``residual_step``: one launch per pick over a grid of ``[B, ceil(N / BLOCK_N)]``
  programs. Each program updates its block of tokens and leaves its block's best key in
  a small buffer; the next launch reduces those to the pick. Spreads the ``O(k^2 N)``
  factor work of large ``N`` over the chip.

Both keep the PyTorch loop's rules exactly: the key is ``w * e`` above the token's floor
and the fallback key below it; the first maximum wins (ties go to the lower index); a
taken token gets energy 0 and fallback ``-inf``.

DivPrune (greedy max-min on a distance matrix ``D [B, N, N]``): ``divprune_persistent``,
one program per image.
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl
from triton import knobs

__all__ = ["build"]

def _residual_persistent(G, E, W, FLOOR, FB, FIRST, F, OUT, N, K,
                         s_gb, s_gn, s_eb, s_fb, s_fk, s_ob,
                         HAS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B * N * N passes 2^31 at N = 10k
    offs = tl.arange(0, BLOCK_N)
    e_row = E + b * s_eb
    w_row = W + b * s_eb
    fl_row = FLOOR + b * s_eb
    fb_row = FB + b * s_eb
    f_img = F + b * s_fb
    for t in range(0, K):
        best_val = tl.full([], -float("inf"), tl.float32)
        best_idx = tl.full([], 2147483647, tl.int32)  # above every index: "no pick yet"
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            m = idx < N
            e = tl.load(e_row + idx, mask=m, other=0.0)
            w = tl.load(w_row + idx, mask=m, other=0.0)
            fl = tl.load(fl_row + idx, mask=m, other=0.0)
            fb = tl.load(fb_row + idx, mask=m, other=-float("inf"))
            key = tl.where(e > fl, e * w, fb)
            key = tl.where(m, key, -float("inf"))
            top = tl.max(key, axis=0)
            arg = tl.min(tl.where(key == top, idx, 2147483647), axis=0)
            better = top > best_val  # strictly: an earlier block keeps a tie
            best_idx = tl.where(better, arg, best_idx)
            best_val = tl.where(better, top, best_val)
        pick = best_idx
        if HAS_FIRST:
            if t == 0:
                pick = tl.load(FIRST + b).to(tl.int32)
        e_pick = tl.load(e_row + pick)
        fl_pick = tl.load(fl_row + pick)
        scale = tl.where(e_pick > fl_pick, tl.div_rn(1.0, tl.sqrt_rn(tl.maximum(e_pick, 1.1754943508222875e-38))), 0.0)
        tl.store(OUT + b * s_ob + t, pick.to(tl.int64))
        tl.store(fb_row + pick, -float("inf"))
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            m = idx < N
            col = tl.load(G + b * s_gb + pick * s_gn + idx, mask=m, other=0.0)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for s0 in range(0, t, BLOCK_T):
                rows = s0 + tl.arange(0, BLOCK_T)
                rm = rows < t
                at_pick = tl.load(f_img + rows * s_fk + pick, mask=rm, other=0.0)
                tile = tl.load(f_img + rows[:, None] * s_fk + idx[None, :], mask=rm[:, None] & m[None, :], other=0.0)
                acc += tl.sum(tile * at_pick[:, None], axis=0)
            c = (col - acc) * scale
            tl.store(f_img + t * s_fk + idx, c, mask=m)
            e = tl.load(e_row + idx, mask=m, other=0.0)
            e = tl.maximum(e - c * c, 0.0)
            e = tl.where(idx == pick, 0.0, e)
            tl.store(e_row + idx, e, mask=m)
        tl.debug_barrier()  # the next step's argmax reads what every thread wrote


def _residual_step(G, E0, E, W, FLOOR, FB, FIRST, F, OUT, PART_V, PART_I, PART_E, N, t, NB,
                   s_gb, s_gn, s_eb, s_fb, s_fk, s_ob, s_pb,
                   HAS_FIRST: tl.constexpr, INIT: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr):
    """One pick. Every program reduces the block maxima the previous launch left in slot
    ``t % 2`` of ``PART_* [B, 2, NB]`` to the same pick, updates its own block of tokens, and
    leaves its block's new maximum (key, index, energy) in slot ``(t + 1) % 2``. ``INIT``
    only writes the block maxima of the initial keys, to slot 0. The pick's energy comes
    from the buffer, never from ``E``, which the pick's own program overwrites meanwhile."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    idx = j * BLOCK_N + tl.arange(0, BLOCK_N)
    m = idx < N
    e_row = E + b * s_eb
    fl_row = FLOOR + b * s_eb
    fb_row = FB + b * s_eb
    f_img = F + b * s_fb
    e = tl.load(e_row + idx, mask=m, other=0.0)
    fb = tl.load(fb_row + idx, mask=m, other=-float("inf"))
    if not INIT:
        p = tl.arange(0, BLOCK_P)
        pm = p < NB
        slot = b * s_pb + (t % 2) * NB
        vals = tl.load(PART_V + slot + p, mask=pm, other=-float("inf"))
        top = tl.max(vals, axis=0)
        first_block = tl.min(tl.where(vals == top, p, 2147483647), axis=0)  # blocks are in index order
        pick = tl.load(PART_I + slot + first_block)
        e_pick = tl.load(PART_E + slot + first_block)
        if HAS_FIRST:
            if t == 0:
                pick = tl.load(FIRST + b).to(tl.int32)
                e_pick = tl.load(E0 + b * s_eb + pick)
        fl_pick = tl.load(fl_row + pick)
        scale = tl.where(e_pick > fl_pick, tl.div_rn(1.0, tl.sqrt_rn(tl.maximum(e_pick, 1.1754943508222875e-38))), 0.0)
        if j == 0:
            tl.store(OUT + b * s_ob + t, pick.to(tl.int64))
        col = tl.load(G + b * s_gb + pick * s_gn + idx, mask=m, other=0.0)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for s0 in range(0, t, BLOCK_T):
            rows = s0 + tl.arange(0, BLOCK_T)
            rm = rows < t
            at_pick = tl.load(f_img + rows * s_fk + pick, mask=rm, other=0.0)
            tile = tl.load(f_img + rows[:, None] * s_fk + idx[None, :], mask=rm[:, None] & m[None, :], other=0.0)
            acc += tl.sum(tile * at_pick[:, None], axis=0)
        c = (col - acc) * scale
        tl.store(f_img + t * s_fk + idx, c, mask=m)
        e = tl.maximum(e - c * c, 0.0)
        e = tl.where(idx == pick, 0.0, e)
        fb = tl.where(idx == pick, -float("inf"), fb)
        tl.store(e_row + idx, e, mask=m)
        tl.store(fb_row + idx, fb, mask=m)
    w = tl.load(W + b * s_eb + idx, mask=m, other=0.0)
    fl = tl.load(fl_row + idx, mask=m, other=0.0)
    key = tl.where(e > fl, e * w, fb)
    key = tl.where(m, key, -float("inf"))
    best = tl.max(key, axis=0)
    arg = tl.min(tl.where(key == best, idx, 2147483647), axis=0)
    e_arg = tl.sum(tl.where(idx == arg, e, 0.0), axis=0)
    out = b * s_pb + j
    if not INIT:
        out += ((t + 1) % 2) * NB
    tl.store(PART_V + out, best)
    tl.store(PART_I + out, arg)
    tl.store(PART_E + out, e_arg)


def _divprune_persistent(D, NEAREST, TOKEPT, OUT, N, K, s_db, s_dn, s_nb, s_ob, BLOCK_N: tl.constexpr):
    """Max-min diversity: the first pick maximises the distance to its nearest neighbour,
    each later one the distance to its nearest kept token; first maximum on ties."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    row = TOKEPT + b * s_nb
    for start in range(0, N, BLOCK_N):  # the first pick's keys
        idx = start + offs
        m = idx < N
        tl.store(row + idx, tl.load(NEAREST + b * s_nb + idx, mask=m, other=0.0), mask=m)
    tl.debug_barrier()
    for t in range(0, K):
        best_val = tl.full([], -float("inf"), tl.float32)
        best_idx = tl.full([], 2147483647, tl.int32)
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            m = idx < N
            key = tl.load(row + idx, mask=m, other=-float("inf"))
            top = tl.max(key, axis=0)
            arg = tl.min(tl.where(key == top, idx, 2147483647), axis=0)
            better = top > best_val
            best_idx = tl.where(better, arg, best_idx)
            best_val = tl.where(better, top, best_val)
        pick = best_idx
        tl.store(OUT + b * s_ob + t, pick.to(tl.int64))
        tl.debug_barrier()
        for start in range(0, N, BLOCK_N):
            idx = start + offs
            m = idx < N
            key = tl.load(row + idx, mask=m, other=-float("inf"))
            dist = tl.load(D + b * s_db + pick * s_dn + idx, mask=m, other=0.0)
            if t == 0:
                key = dist  # to_kept starts at +inf: the first kept token sets it
            else:
                key = tl.where(key == -float("inf"), key, tl.minimum(key, dist))
            key = tl.where(idx == pick, -float("inf"), key)
            tl.store(row + idx, key, mask=m)
        tl.debug_barrier()


_built: dict[bool, dict[str, Any]] = {}


def build() -> dict[str, Any]:
    """The kernels compiled for the current mode (GPU, or the interpreter if
    ``TRITON_INTERPRET=1``), decorated once per mode."""
    interpret = bool(knobs.runtime.interpret)
    if interpret not in _built:
        _built[interpret] = {
            "residual_persistent": triton.jit(_residual_persistent),
            # the pick index changes every launch: no recompiles for t == 1 or t % 16 == 0
            "residual_step": triton.jit(_residual_step, do_not_specialize=["t"]),
            "divprune_persistent": triton.jit(_divprune_persistent),
        }
    return _built[interpret]
