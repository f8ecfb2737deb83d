"""What scoring inside the LLM costs: attention rows at layer K-1 vs that layer's attention.

Run from the repository root::

    python benchmarks/bench_llm_stages.py                  # CPU, Vicuna-7B head sizes, L = 640 / 1360 / 2944
    python benchmarks/bench_llm_stages.py --device cuda --dtype bfloat16
    python benchmarks/bench_llm_stages.py --smoke          # one small size (CI)

For each prompt length ``L`` it times, on the same random queries and keys of one layer
(``H`` heads of ``hd``, batch ``B``):

- ``sdpa``: the layer's causal attention itself (``scaled_dot_product_attention``), what the
  model runs anyway;
- ``last``: ``resprune.llm_pruning.attention_rows`` for each row's last token (FastV,
  PyramidDrop), what an in-LLM stage adds at layer K-1;
- ``instruction``: the same for the mean over ``--instruction`` instruction tokens;
- ``eager``: the full ``L x L`` softmax matrix that ``output_attentions`` would need.

The ratios to ``sdpa`` are the overhead; the issue's target is ``last`` < 1 % at L = 2944 on
CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from resprune.llm_pruning import attention_rows

from common import device_name, emit, timed


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    b, h, kv, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    lines = [
        f"One layer's attention vs the rows an in-LLM stage scores, {device_name(device)}, {args.dtype}, "
        f"B={b}, H={h} (kv {kv}), hd={hd}, torch {torch.__version__}; median ms of {args.repeats}.",
        "",
        "| L | sdpa ms | last-row ms | last / sdpa | instruction-rows ms | instr / sdpa | eager matrix ms "
        "| eager / sdpa |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gen = torch.Generator(device="cpu").manual_seed(0)
    for length in args.lengths:
        q = torch.randn(b, h, length, hd, generator=gen).to(device, dtype)
        k = torch.randn(b, kv, length, hd, generator=gen).to(device, dtype)
        v = torch.randn(b, kv, length, hd, generator=gen).to(device, dtype)
        valid = torch.ones(b, length, dtype=torch.bool, device=device)
        scale = hd ** -0.5
        last = torch.full((b, 1), length - 1, device=device)
        instr = (length - args.instruction + torch.arange(args.instruction, device=device)).expand(b, -1)
        ones = torch.ones(b, 1, dtype=torch.bool, device=device)
        many = torch.ones(b, args.instruction, dtype=torch.bool, device=device)

        def sdpa() -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                    enable_gqa=kv != h)

        def eager() -> torch.Tensor:
            kk = k.repeat_interleave(h // kv, dim=1)
            logits = (q @ kk.transpose(2, 3)).float() * scale
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            return logits.masked_fill(~causal, float("-inf")).softmax(-1)

        with torch.no_grad():
            t_sdpa = timed(sdpa, device, args.repeats)
            t_last = timed(lambda: attention_rows(q, k, None, valid, last, ones, scale), device, args.repeats)
            t_instr = timed(lambda: attention_rows(q, k, None, valid, instr, many, scale), device, args.repeats)
            t_eager = timed(eager, device, max(1, args.repeats // 3)) if length <= args.eager_max else float("nan")
        lines.append(f"| {length} | {t_sdpa:.2f} | {t_last:.3f} | {100 * t_last / t_sdpa:.2f} % | {t_instr:.3f} | "
                     f"{100 * t_instr / t_sdpa:.2f} % | {t_eager:.1f} | {t_eager / t_sdpa:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--lengths", nargs="+", type=int, default=[640, 1360, 2944])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--instruction", type=int, default=40, help="instruction tokens averaged over")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--eager-max", type=int, default=4096, help="skip the eager matrix above this length")
    parser.add_argument("--smoke", action="store_true", help="L = 256, 8 heads, 2 repeats")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.kv_heads, args.repeats = [256], 8, 4, 2
    emit(run(args), args.markdown)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
