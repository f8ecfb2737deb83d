"""Selection time per selector over N, d, k and batch, against the naive reference.

Run from the repository root::

    python benchmarks/bench_selection.py            # the paper's sizes (CPU: ~1 min)
    python benchmarks/bench_selection.py --smoke    # tiny sizes, seconds (CI)
    python benchmarks/bench_selection.py --device cuda --markdown docs/bench.md
    python benchmarks/bench_selection.py --auto     # `auto` against each method at Table I's budgets

The naive reference is greedy residual selection that keeps the whole residual matrix
``R = V - P_S V`` and updates all of it every step (``R <- R - (R q) q^T``), in float32 on
the same device: the textbook implementation the fast kernel replaces. Both run in the same
process, so the speed-up column is a same-machine ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import resprune
from resprune.linalg import choose_method, greedy_residual_select

from common import device_name, emit, timed


@dataclass(frozen=True)
class Case:
    n: int
    d: int
    k: int
    batch: int = 1

    def __str__(self) -> str:
        return f"{'B=%d, ' % self.batch if self.batch > 1 else ''}N={self.n}, d={self.d}, k={self.k}"


PAPER_CASES = [
    Case(576, 4096, 64),     # LLaVA-1.5, 88.9% pruned
    Case(576, 4096, 192),    # LLaVA-1.5, 66.7% pruned
    Case(2880, 4096, 320),   # LLaVA-NeXT, 5 tiles
    Case(576, 4096, 64, 16), # a batch of 16 images
]
LARGE_CASES = [Case(10000, 3584, 320)]  # Qwen2.5-VL high resolution
SMOKE_CASES = [Case(64, 32, 8), Case(96, 48, 24, 3)]

SELECTORS: list[tuple[str, dict]] = [
    ("residual_energy", {}),
    ("residual_energy", {"method": "incremental"}),
    ("residual_energy", {"method": "gram"}),
    ("residual_energy", {"method": "blocked"}),
    ("residual_energy", {"alpha": 0.75}),  # text-weighted (relevance given)
    ("dpp", {}),
    ("cdpruner", {"relevance": "relevance"}),  # CDPruner's own fast-MAP loop on the N x N kernel
    ("divprune", {}),
    ("tome", {}),  # ToMe's matching in rounds on the tokens (a plain selector)
    ("topk", {}),
    ("random", {}),
    ("uniform", {}),
]


def word_embedder(d: int, device: torch.device, vocab: int = 32000):
    """A stand-in for an LLM's input-embedding table: 1-3 sub-word rows per word."""
    table = torch.randn(vocab, d, generator=torch.Generator().manual_seed(1)).to(device)

    def embed(word: str) -> torch.Tensor:
        h = sum(ord(ch) * 31**i for i, ch in enumerate(word))
        ids = [(h + j * 7919) % vocab for j in range(1 + len(word) % 3)]
        return table[ids]

    return embed


TOKEN_KINDS = ("gaussian", "correlated")


def make_tokens(kind: str, b: int, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Benchmark tokens. ``gaussian``: i.i.d. (nearly orthogonal in high d, so picks follow the
    norms); ``correlated``: neighbouring tokens alike, as in image features (a smooth curve
    through ``n / 16`` random points, plus noise), so every pick changes its neighbours' energy."""
    if kind == "gaussian":
        return torch.randn(b, n, d, generator=gen)
    coarse = torch.randn(b, d, max(2, n // 16), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=n, mode="linear", align_corners=True)
    return smooth.transpose(1, 2).contiguous() + 0.2 * torch.randn(b, n, d, generator=gen)


def naive_residual_select(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy residual selection with a full residual-matrix update per step (one image)."""
    resid = tokens.float().clone()
    picked = torch.empty(k, dtype=torch.long, device=tokens.device)
    taken = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for t in range(k):
        energy = resid.pow(2).sum(-1).masked_fill(taken, -1.0)
        i = energy.argmax()
        picked[t] = i
        taken[i] = True
        q = resid[i] / resid[i].norm().clamp_min(1e-30)
        resid.addr_(resid @ q, q, alpha=-1.0)  # in place: no N x d temporary (allocator noise) per step
    return picked


def run(cases: list[Case], device: torch.device, repeats: int, with_reference: bool,
        kinds: tuple[str, ...] = TOKEN_KINDS) -> list[dict]:
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        ref_ms = None  # the naive reference does the same work whatever the tokens: timed once per case
        for kind in kinds:
            tokens = make_tokens(kind, case.batch, case.n, case.d, gen).to(device)
            relevance = torch.rand(case.batch, case.n, generator=gen).to(device)
            if with_reference and ref_ms is None:
                ref_ms = timed(lambda: [naive_residual_select(tokens[i], case.k) for i in range(case.batch)],
                               device, max(1, repeats // 2))
            rows += _time_selectors(case, kind, tokens, relevance, device, repeats, ref_ms)
    return rows


def _time_selectors(case: Case, kind: str, tokens: torch.Tensor, relevance: torch.Tensor, device: torch.device,
                    repeats: int, ref_ms: float | None) -> list[dict]:
    rows = []
    for name, params in SELECTORS:
        scores = {"relevance": relevance}
        ms = timed(lambda: resprune.select(tokens, case.k, selector=name, scores=scores, **params), device, repeats)
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        if name in ("residual_energy", "dpp") and "method" not in params:
            label += f" [{choose_method(case.n, case.d, case.k, batch=case.batch, device=device)}]"
        rows.append({"selector": label, "tokens": kind, "B": case.batch, "N": case.n, "d": case.d, "k": case.k,
                     "ms": ms, "ref_ms": ref_ms if name == "residual_energy" else None})
    context = {"text": ["What colour is the umbrella the woman near the red car is holding?"] * case.batch,
               "text_embedder": word_embedder(case.d, device)}
    ms = timed(lambda: resprune.score(tokens, "text_relevance", context=context), device, repeats)
    rows.append({"selector": "text_relevance (scorer)", "tokens": kind, "B": case.batch, "N": case.n,
                 "d": case.d, "k": "-", "ms": ms, "ref_ms": None})
    return rows


def growth(device: torch.device, repeats: int, ns: tuple[int, ...] = (576, 2880, 10000), d: int = 3584,
           ks: tuple[int, ...] = (64, 320)) -> str:
    """residual_energy time over N and k (correlated tokens): cost should grow at most linearly in each."""
    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[int, int], float] = {}
    methods: dict[tuple[int, int], str] = {}
    for n in ns:
        tokens = make_tokens("correlated", 1, n, d, gen).to(device)
        for k in ks:
            times[(n, k)] = timed(lambda: resprune.select(tokens, k), device, repeats)
            methods[(n, k)] = choose_method(n, d, k, device=device)
    lines = [f"residual_energy (auto) over N and k, d={d}, correlated tokens — {device_name(device)}; "
             "ms, and ms per 1000 N",
             "", "| N | " + " | ".join(f"k={k}" for k in ks) + " | " + " | ".join(f"k={k} per 1000 N" for k in ks) + " |",
             "|---:|" + "---:|" * (2 * len(ks))]
    for n in ns:
        cells = [f"{times[(n, k)]:.1f} ({methods[(n, k)]})" for k in ks]
        per = [f"{times[(n, k)] / n * 1000:.2f}" for k in ks]
        lines.append(f"| {n} | " + " | ".join(cells) + " | " + " | ".join(per) + " |")
    return "\n".join(lines)


AUTO_NS = (576, 2880)  # LLaVA-1.5; LLaVA-NeXT with 5 tiles
AUTO_KS = (64, 128, 192)  # the paper's Table I budgets
AUTO_VIDEO = ((2048, 1024, 512), (4096, 1024, 1024))  # bench_video's 16 and 32 frames at budget 0.25
METHODS = ("incremental", "gram", "blocked")


def auto_table(device: torch.device, repeats: int, ns: tuple[int, ...] = AUTO_NS, ks: tuple[int, ...] = AUTO_KS,
               d: int = 4096, extra: tuple[tuple[int, int, int], ...] = AUTO_VIDEO) -> tuple[str, list[dict]]:
    """residual_energy's ``auto`` against each method at the Table I budgets (correlated tokens,
    one image), and at the ``extra`` shapes ``(N, d, k)`` (video clips): the table, and one record
    per shape (``{"n", "d", "k", "auto", "ms": {method: ms}}``, what ``tests/test_selection_auto.py``
    checks ``choose_method`` against)."""
    gen = torch.Generator().manual_seed(0)
    records = []
    lines = [f"`auto` against each method, residual_energy, correlated tokens — {device_name(device)}; "
             "median ms", "", "| N | d | k | auto picks | auto ms | " + " | ".join(f"{m} ms" for m in METHODS)
             + " | auto / best |", "|---:|---:|---:|---|---:|" + "---:|" * (len(METHODS) + 1)]
    shapes = [(n, d, k) for n in ns for k in ks] + list(extra)
    for n, d, k in shapes:
        tokens = make_tokens("correlated", 1, n, d, gen).to(device)
        ms = {m: timed(lambda: greedy_residual_select(tokens, k, method=m), device, repeats) for m in METHODS}
        auto = choose_method(n, d, k, device=device)
        auto_ms = timed(lambda: greedy_residual_select(tokens, k), device, repeats)
        best = min(ms.values())
        records.append({"n": n, "d": d, "k": k, "auto": auto, "ms": ms})
        lines.append(f"| {n} | {d} | {k} | {auto} | {auto_ms:.1f} | " + " | ".join(f"{ms[m]:.1f}" for m in METHODS)
                     + f" | {ms[auto] / best:.2f} |")
    return "\n".join(lines), records


def markdown(rows: list[dict], device: torch.device) -> str:
    lines = [
        f"Selection time, median ms — {device_name(device)}, torch {torch.__version__}, float32.",
        "`naive` = full residual-matrix update per step (same device, same run).",
        "",
        "`gaussian` tokens are i.i.d.; `correlated` ones resemble image features (neighbours alike).",
        "",
        "| selector | tokens | B | N | d | k | ms | naive ms | speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = f"{r['ref_ms']:.1f}" if r["ref_ms"] is not None else ""
        speed = f"{r['ref_ms'] / r['ms']:.1f}x" if r["ref_ms"] is not None else ""
        lines.append(f"| {r['selector']} | {r['tokens']} | {r['B']} | {r['N']} | {r['d']} | {r['k']} | {r['ms']:.2f} "
                     f"| {ref} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for CI)")
    parser.add_argument("--large", action="store_true", help="also N=10000 (Qwen2.5-VL high resolution)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per cell (median reported)")
    parser.add_argument("--no-reference", action="store_true", help="skip the naive reference")
    parser.add_argument("--growth", action="store_true", help="also time residual_energy over N in "
                        "{576, 2880, 10000} and k in {64, 320} (d=3584; slow on CPU)")
    parser.add_argument("--auto", action="store_true", help="only `auto` against each method at the Table I "
                        "budgets (k=64/128/192 at N=576 and 2880, d=4096)")
    parser.add_argument("--calibration", metavar="FILE", help="with --auto: also write the measured times as JSON "
                        "(tests check choose_method against the committed one)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.auto:
        table, records = (auto_table(device, args.repeats or 2, ns=(96, 192), ks=(8, 48), d=64, extra=()) if args.smoke
                          else auto_table(device, args.repeats or 5))
        emit(table, args.markdown)
        if args.calibration:
            info = {"device": device_name(device), "torch": torch.__version__, "command": " ".join(sys.argv),
                    "shapes": records}
            Path(args.calibration).write_text(json.dumps(info, indent=1) + "\n")
        return 0
    cases = SMOKE_CASES if args.smoke else PAPER_CASES + (LARGE_CASES if args.large else [])
    repeats = args.repeats or (2 if args.smoke else 5)
    rows = run(cases, device, repeats, with_reference=not args.no_reference)
    table = markdown(rows, device)
    if args.growth:
        table += "\n\n" + (growth(device, repeats, ns=(64, 128, 256), d=32, ks=(8, 16)) if args.smoke
                             else growth(device, min(repeats, 3)))
    emit(table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
