"""The GPU check of the speed work: selection and end-to-end tables, and every target PASS/FAIL.

On one H100 or H200 (``bash benchmarks/gpu-check.sh`` installs what the machine lacks and
runs this)::

    python benchmarks/gpu_check.py                 # about 7 minutes on an H200
    python benchmarks/gpu_check.py --smoke         # tiny sizes on any device (CI runs it on CPU)

Prints (1) selection times (``resprune.select``, float32 tokens, median of CUDA-synchronised
runs after a warm-up) beside the naive torch loop and one Gram GEMM, with the agreement of
the GPU's picks with the CPU float32 reference; (2) the end-to-end table of
``bench_e2e.py --size 7b`` for the three backbones at batch 1 and 16 (ResPrune at both
budgets; VisionZip, FastV, PyramidDrop and DART at the first), with the cost of in-LLM
scoring beside one layer's attention (``bench_llm_stages.py``) and the video selection against
its pruned prefill at 8, 32 and 64 frames (``bench_video.py``); (3) each target with
PASS or FAIL. Writes ``gpu-check.md`` (and the raw numbers as ``gpu-check.json``) to
``--out``. The exit status is 0 whatever the targets say: the table is the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import resprune
from resprune import kernels
from resprune.linalg import choose_method
from resprune.testing.reference import residual_energies

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
import bench_llm_stages  # noqa: E402
import bench_video  # noqa: E402
from bench_selection import Case, make_tokens, naive_residual_select, word_embedder  # noqa: E402
from common import device_name, timed  # noqa: E402


CASES = [Case(576, 4096, 64), Case(576, 4096, 192), Case(2880, 4096, 320), Case(576, 4096, 64, 16),
         Case(10000, 3584, 320)]
SMOKE_CASES = [Case(64, 32, 8), Case(96, 48, 24, 3)]

SELECTION_TARGETS_MS = {  # the targets on one H100 / H200
    ("residual_energy", Case(576, 4096, 64)): 0.5, ("residual_energy", Case(576, 4096, 192)): 1.0,
    ("residual_energy", Case(2880, 4096, 320)): 1.5, ("residual_energy", Case(576, 4096, 64, 16)): 1.0,
    ("residual_energy", Case(10000, 3584, 320)): 8.0,
    ("dpp", Case(576, 4096, 64)): 0.5, ("dpp", Case(576, 4096, 192)): 1.0, ("dpp", Case(2880, 4096, 320)): 1.5,
    ("dpp", Case(576, 4096, 64, 16)): 1.0, ("dpp", Case(10000, 3584, 320)): 8.0,
    ("divprune", Case(576, 4096, 64)): 0.5, ("divprune", Case(2880, 4096, 320)): 2.0,
    ("text_relevance B=16", Case(576, 4096, 64, 16)): 1.0,
}


def agreement(tokens: torch.Tensor, got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> str:
    """``identical``, ``tie at step t`` (the two picks' energies agree within ``rtol`` of the
    largest, in float64), or ``DIFFERENT at step t`` for one image's picks."""
    got, ref = got.tolist(), ref.tolist()
    if got == ref:
        return "identical"
    t = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
    e = residual_energies(tokens.double(), ref[:t])
    gap = abs(float(e[got[t]] - e[ref[t]])) / max(float(tokens.double().pow(2).sum(-1).max()), 1e-30)
    return f"tie at step {t}" if gap <= rtol else f"DIFFERENT at step {t} (gap {gap:.1e})"


def selection(cases: list[Case], device: torch.device, repeats: int) -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        tokens_cpu = make_tokens("correlated", case.batch, case.n, case.d, gen)
        tokens = tokens_cpu.to(device)
        relevance = torch.rand(case.batch, case.n, generator=gen).to(device)
        row: dict[str, Any] = {"case": str(case), "key": case,
                               "method": choose_method(case.n, case.d, case.k, batch=case.batch, device=device)}
        row["residual_energy"] = timed(lambda: resprune.select(tokens, case.k), device, repeats)
        row["dpp"] = timed(lambda: resprune.select(tokens, case.k, selector="dpp", scores={"relevance": relevance}),
                           device, repeats)
        row["divprune"] = (timed(lambda: resprune.select(tokens, case.k, selector="divprune"), device, repeats)
                           if case.n <= 4096 else None)
        row["gram_gemm"] = timed(lambda: torch.bmm(tokens, tokens.transpose(1, 2)), device, repeats)
        for variant in ("persistent", "step"):  # both kernel shapes, to tune kernels.choose_variant
            row[variant] = None
            if kernels.available(device) and device.type == "cuda":
                chosen = kernels.choose_variant
                kernels.choose_variant = lambda b, n, v=variant: v
                try:
                    row[variant] = timed(lambda: resprune.select(tokens, case.k, method="triton"), device, repeats)
                finally:
                    kernels.choose_variant = chosen
        row["naive"] = (timed(lambda: naive_residual_select(tokens[0], case.k), device, max(1, repeats // 3))
                        if case.batch == 1 else None)
        if case.batch > 1:
            context = {"text": ["What colour is the umbrella the woman near the red car is holding?"] * case.batch,
                       "text_embedder": word_embedder(case.d, device)}
            row["text_relevance B=16" if case.batch == 16 else "text_relevance"] = timed(
                lambda: resprune.score(tokens, "text_relevance", context=context), device, repeats)
        picks = resprune.select(tokens, case.k, order="selection").cpu()
        ref = resprune.select(tokens_cpu, case.k, order="selection", method="gram")  # the CPU float32 reference
        row["agreement"] = "; ".join(sorted({agreement(tokens_cpu[i], picks[i], ref[i]) for i in range(case.batch)}))
        rows.append(row)
        print(f"  selection {case}: residual_energy {row['residual_energy']:.2f} ms ({row['method']})",
              file=sys.stderr)
    return rows


def selection_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    cell = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [f"Selection, median ms — {device_name(device)}, torch {torch.__version__}, float32 tokens "
             "(correlated, as image features)", "",
             "| case | residual_energy (auto) | triton persistent | triton step | naive torch loop | one Gram GEMM "
             "| dpp | divprune | text_relevance | picks vs CPU float32 reference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        text = r.get("text_relevance B=16", r.get("text_relevance"))
        lines.append(f"| {r['case']} | {cell(r['residual_energy'])} ({r['method']}) | {cell(r['persistent'])} | "
                     f"{cell(r['step'])} | {cell(r['naive'])} | "
                     f"{cell(r['gram_gemm'])} | {cell(r['dpp'])} | {cell(r['divprune'])} | {cell(text)} | "
                     f"{r['agreement']} |")
    return "\n".join(lines)


def video(smoke: bool, device: torch.device, repeats: int) -> str:
    """``bench_video``'s table: the ``resprune-video`` selection (global, uniform, energy) against
    the pruned prefill of its 0.5B-class LLM (tiny sizes under ``smoke``)."""
    small = bench_e2e.SMALL_SIZE["qwen2_5_vl"]["text"]
    args = argparse.Namespace(
        frames=[4, 8] if smoke else [8, 32, 64], budget=0.25, per_pair=16 if smoke else bench_video.TOKENS_PER_PAIR,
        text_tokens=8 if smoke else 40, width=64 if smoke else small["hidden_size"], layers=2 if smoke else 32,
        intermediate=128 if smoke else small["intermediate_size"],
        heads=4 if smoke else small["num_attention_heads"], kv_heads=2 if smoke else small["num_key_value_heads"])
    start = time.perf_counter()
    rows = bench_video.run(args.frames, device, max(1, repeats // 2), width=args.width, layers=args.layers,
                           intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                           per_pair=args.per_pair, budget=args.budget, text_tokens=args.text_tokens)
    print(f"  video: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return bench_video.markdown(rows, device, args)


def end_to_end(smoke: bool, device: torch.device) -> tuple[list[Any], argparse.Namespace]:
    args = argparse.Namespace(size="tiny" if smoke else "7b", device=str(device), backbones=list(bench_e2e.FULL_SIZE),
                              batches=[1] if smoke else [1, 16], budgets=[0.1111] if smoke else None,
                              new_tokens=4 if smoke else 16, repeats=1 if smoke else 3,
                              methods=["resprune", "tome", "fastv"] if smoke else list(bench_e2e.METHODS),
                              other_budgets=1, tiny_layers=4 if smoke else 32)
    start = time.perf_counter()
    rows = bench_e2e.run(args)
    print(f"  end to end: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rows, args


def targets(sel_rows: list[dict[str, Any]], e2e_rows: list[Any]) -> list[tuple[str, str, bool]]:
    out = []
    by_case = {r["key"]: r for r in sel_rows}
    for (name, case), limit in SELECTION_TARGETS_MS.items():
        r = by_case.get(case)
        if r is None or r.get(name) is None:
            continue
        out.append((f"{name}, {case} <= {limit} ms", f"{r[name]:.2f} ms", r[name] <= limit))
    for r in sel_rows:
        out.append((f"picks equal the CPU float32 reference up to ties, {r['case']}", r["agreement"],
                    "DIFFERENT" not in r["agreement"]))
    full = {(r.backbone, r.batch): r for r in e2e_rows if r.variant == "full"}
    oracle = {(r.backbone, r.method, r.batch, r.budget): r for r in e2e_rows if r.variant == "oracle"}
    for r in (r for r in e2e_rows if r.variant == "pruned"):
        f, o = full[(r.backbone, r.batch)], oracle.get((r.backbone, r.method, r.batch, r.budget))
        where = f"{r.backbone} {r.method}, B={r.batch}, budget {r.budget}"
        out.append((f"pruned never slower than full, {where}", f"{r.prefill_ms / f.prefill_ms:.2f}x",
                    r.prefill_ms <= f.prefill_ms))
        if o is None:  # inside the vision tower (ToMe): the selection is part of the tower's run
            continue
        out.append((f"pruned / oracle prefill <= 1.05, {where}", f"{r.prefill_ms / o.prefill_ms:.2f}x",
                    r.prefill_ms <= 1.05 * o.prefill_ms))
        out.append((f"generate tokens/s within 5 % of the oracle's, {where}",
                    f"{r.tokens_per_s / o.tokens_per_s:.2f}x", r.tokens_per_s >= 0.95 * o.tokens_per_s))
    return out


def write_report(out: Path, parts: list[str], sel_rows: list[dict[str, Any]], e2e_rows: list[Any],
                 checks: list[tuple[str, str, bool]]) -> str:
    """Write ``gpu-check.md`` and ``gpu-check.json`` (each through a temporary file and a rename)
    with what has been measured so far and the targets it decides; return the markdown."""
    passed = sum(ok for *_, ok in checks)
    table = "\n".join([f"Targets: {passed} of {len(checks)} pass", "", "| target | measured | |", "|---|---|---|"]
                      + [f"| {name} | {value} | {'PASS' if ok else 'FAIL'} |" for name, value, ok in checks])
    report = "\n\n".join([*parts, table])
    raw = {"selection": [{k: v for k, v in r.items() if k != "key"} for r in sel_rows],
           "end_to_end": [vars(r) for r in e2e_rows], "targets": checks}
    for name, text in (("gpu-check.md", report + "\n"), ("gpu-check.json", json.dumps(raw, indent=1, default=str))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and tiny models, any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-e2e", action="store_true", help="the selection table and its targets only")
    parser.add_argument("--out", default=".", help="folder for gpu-check.md and gpu-check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; Triton kernels: "
              f"{'yes' if kernels.available(device) else 'NO (pip install triton)'}", file=sys.stderr)
    repeats = args.repeats or (1 if args.smoke else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sel_rows = selection(SMOKE_CASES if args.smoke else CASES, device, repeats)
    parts = [selection_table(sel_rows, device)]
    write_report(out, parts, sel_rows, [], targets(sel_rows, []))  # each part lands as soon as it is measured
    parts.append(bench_llm_stages.run(argparse.Namespace(
        device=str(device), dtype="float32" if device.type == "cpu" else "bfloat16", batch=1,
        heads=8 if args.smoke else 32, kv_heads=4 if args.smoke else 32, head_dim=128, instruction=40,
        lengths=[256] if args.smoke else [640, 1360, 2944], repeats=repeats, eager_max=4096)))
    write_report(out, parts, sel_rows, [], targets(sel_rows, []))
    parts.append(video(args.smoke, device, repeats))
    write_report(out, parts, sel_rows, [], targets(sel_rows, []))
    e2e_rows, e2e_args = ([], None) if args.no_e2e else end_to_end(args.smoke, device)
    if e2e_rows:
        parts.append(bench_e2e.markdown(e2e_rows, e2e_args))
        write_report(out, parts, sel_rows, e2e_rows, [])  # the measurements land before any target is judged
    report = write_report(out, parts, sel_rows, e2e_rows, targets(sel_rows, e2e_rows))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
