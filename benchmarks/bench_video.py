"""Selection time against the pruned prefill it saves, over the frames of a video.

Run from the repository root::

    python benchmarks/bench_video.py                 # 8, 16 and 32 frames, a 0.5B-class LLM, CPU (minutes)
    python benchmarks/bench_video.py --frames 8 16 32 64 --device cuda
    python benchmarks/bench_video.py --smoke         # tiny sizes, seconds (CI)

A video of ``F`` frames at 448x448 px is ``F/2`` frame pairs of 16x16 tokens on Qwen2.5-VL
(256 per pair, ``N = 128 F``). Per frame count the benchmark times, in one run:
- the selection the ``resprune-video`` pipeline makes: residual energy weighted by text
  relevance to the prompt's keywords, seeded by the norm, over every token of the clip
  (``video.allocation: global``), frame pair by frame pair with equal shares (``uniform``)
  and with shares by residual energy after the previous pair (``energy``);
- the prefill of the LLM on the pruned sequence (the kept tokens plus a prompt of text).

Both use the LLM of ``bench_e2e --size small``: Qwen2.5-VL's geometry with 32 layers of width
1024, float32. Its embedding table embeds the keywords. The vision tower is left out: it runs on
every frame with or without pruning, so it adds the same time to both sides. The tokens are
correlated like image features (``bench_selection``'s ``correlated`` kind), frame after frame,
with the next frame a small change of the previous one.

The table gives selection ms, pruned prefill ms (medians over ``--repeats`` rounds, each one
selection per allocation and one prefill, so that both sides of the ratio see the same load),
their ratio (the target is under 5 % at 32 frames), and selection time per 1000 tokens and per kept token, to read the growth in
``N`` and ``k``.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import resprune
from resprune.image_selection import EncodedImage, select_images

from bench_e2e import SMALL_SIZE
from bench_selection import make_tokens
from common import device_name, emit, timed

TOKENS_PER_PAIR = 256  # 448x448 px: 32x32 patches, 16x16 after the 2x2 merge
PROMPT = "What does the person in the video do after picking up the red cup from the table?"


def clip_tokens(frames: int, d: int, gen: torch.Generator, per_pair: int = TOKENS_PER_PAIR) -> torch.Tensor:
    """``[1, F/2 * per_pair, d]``: the first pair like image features, each later pair a small change."""
    pairs = max(1, frames // 2)
    first = make_tokens("correlated", 1, per_pair, d, gen)[0]
    out = [first]
    for _ in range(pairs - 1):
        out.append(out[-1] + 0.3 * make_tokens("correlated", 1, per_pair, d, gen)[0])
    return torch.cat(out)[None]


def build_llm(width: int, layers: int, intermediate: int, heads: int, kv_heads: int, device: torch.device):
    """The language model of ``bench_e2e --size small`` (random weights), float32."""
    from transformers import Qwen2Config, Qwen2Model

    cfg = Qwen2Config(vocab_size=32000, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768)
    with torch.device(device):
        return Qwen2Model(cfg).eval()


def run(frames_list: list[int], device: torch.device, repeats: int, *, width: int, layers: int, intermediate: int,
        heads: int, kv_heads: int, per_pair: int, budget: float, text_tokens: int,
        allocations: tuple[str, ...] = ("global", "uniform", "energy")) -> list[dict]:
    llm = build_llm(width, layers, intermediate, heads, kv_heads, device)
    table = llm.get_input_embeddings().weight.detach()

    def embed(word: str) -> torch.Tensor:
        h = sum(ord(ch) * 31**i for i, ch in enumerate(word))
        return table[[(h + j * 7919) % table.shape[0] for j in range(1 + len(word) % 3)]]

    gen = torch.Generator().manual_seed(0)
    rows = []
    for frames in frames_list:
        tokens = clip_tokens(frames, width, gen, per_pair).to(device)
        n = tokens.shape[1]
        pairs = n // per_pair
        video = EncodedImage(tokens[0], frames=torch.arange(pairs).repeat_interleave(per_pair),
                             layout={"kind": "video", "temporal": pairs})
        text = torch.randn(1, text_tokens, width, generator=gen).to(device)
        pipes = {a: resprune.load_pipeline("resprune-video", [f"video.allocation={a}"], budget=budget)
                 for a in allocations}

        def selection(pipe) -> list:
            return select_images(pipe, [video], [0], lambda r: PROMPT, embed)

        with torch.no_grad():
            kept = {a: selection(pipe)[0] for a, pipe in pipes.items()}  # also the warm-up
            ks = {sel.k for sel in kept.values()}
            assert len(ks) == 1, f"the allocations kept different counts: {ks}"
            pruned = torch.cat([tokens[:, kept[allocations[0]].kept.to(device)], text], dim=1)
            llm(inputs_embeds=pruned)  # warm-up
            select_ms: dict[str, list[float]] = {a: [] for a in allocations}
            prefill_ms: list[float] = []
            for _ in range(repeats):  # interleaved, so that both sides of the ratio see the same load
                for a, pipe in pipes.items():
                    select_ms[a].append(timed(lambda: selection(pipe), device, 1, warmup=0))
                prefill_ms.append(timed(lambda: llm(inputs_embeds=pruned), device, 1, warmup=0))
        prefill = statistics.median(prefill_ms)
        for a in allocations:
            sel_ms = statistics.median(select_ms[a])
            rows.append({"frames": frames, "allocation": a, "N": n, "k": kept[a].k,
                         "select_ms": sel_ms, "prefill_ms": prefill})
            print(f"{frames} frames, {a}: N={n}, k={kept[a].k}, selection {sel_ms:.1f} ms, pruned prefill "
                  f"{prefill:.0f} ms", file=sys.stderr)
    return rows


def markdown(rows: list[dict], device: torch.device, args: argparse.Namespace) -> str:
    lines = [f"`resprune-video` (budget {args.budget}) selection against the pruned prefill — {device_name(device)}, "
             f"torch {torch.__version__}, float32; LLM {args.layers} layers x {args.width}, "
             f"{args.per_pair} tokens per frame pair, {args.text_tokens} text tokens",
             "", "| frames | video.allocation | N | k | selection ms | pruned prefill ms | selection / prefill | "
             "selection ms per 1000 N | selection us per kept token |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['frames']} | {r['allocation']} | {r['N']} | {r['k']} | {r['select_ms']:.1f} | "
                     f"{r['prefill_ms']:.0f} | "
                     f"{100 * r['select_ms'] / r['prefill_ms']:.1f} % | {1000 * r['select_ms'] / r['N']:.2f} | "
                     f"{1000 * r['select_ms'] / r['k']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (default 8 16 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per frame count, each one selection per "
                        "allocation and one pruned prefill (medians)")
    parser.add_argument("--budget", type=float, default=0.25, help="share of each video's tokens kept")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    small = SMALL_SIZE["qwen2_5_vl"]["text"]
    if args.smoke:
        args.frames = args.frames or [4, 8]
        args.width, args.layers, args.intermediate, args.heads, args.kv_heads = 64, 2, 128, 4, 2
        args.per_pair, args.text_tokens = 16, 8
    else:
        args.frames = args.frames or [8, 16, 32]
        args.width, args.layers, args.intermediate = small["hidden_size"], 32, small["intermediate_size"]
        args.heads, args.kv_heads = small["num_attention_heads"], small["num_key_value_heads"]
        args.per_pair, args.text_tokens = TOKENS_PER_PAIR, 40
    device = torch.device(args.device)
    rows = run(args.frames, device, args.repeats, width=args.width, layers=args.layers, intermediate=args.intermediate,
               heads=args.heads, kv_heads=args.kv_heads, per_pair=args.per_pair, budget=args.budget,
               text_tokens=args.text_tokens)
    emit(markdown(rows, device, args), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
