"""The ``resprune`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from collections.abc import Sequence

__all__ = ["main"]


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import KINDS, get_host

    host = get_host()
    rows = host.list_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'kind':<9} {'name':<18} {'plugin':<38} {'distribution'}")
    aliases = []
    for kind in KINDS:
        registry = getattr(host, kind.registry)
        for entry in registry.entries():
            info = next((r for r in rows if r["plugin"] == entry.plugin), {})
            dist = f"{info.get('distribution') or '-'} {info.get('version') or ''}".strip()
            print(f"{kind.name:<9} {entry.name:<18} {entry.plugin:<38} {dist}")
        if not len(registry):
            print(f"{kind.name:<9} {'(none)':<18}")
        aliases += [(alias, kind.name, name) for alias, name in registry.aliases().items()]
    for alias, kind, name in sorted(aliases):
        print(f"{'alias':<9} {alias:<18} -> {kind} {name}")
    for failed in host.failed:
        print(f"FAILED    {failed.name:<18} {type(failed.error).__name__}: {failed.error}", file=sys.stderr)
    return 0


def _configs(args: argparse.Namespace) -> int:
    from .config import shipped_configs

    for name, description in shipped_configs().items():
        print(f"{name:<42} {description}")
    return 0


def _sweeps(args: argparse.Namespace) -> int:
    from .sweep import shipped_sweeps

    for name, description in shipped_sweeps().items():
        print(f"{name:<12} {description}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml

    print(to_yaml(load_config(args.source, args.overrides)), end="")
    return 0


def _budget(text: str | None) -> int | float | None:
    if text is None:
        return None
    from .errors import BudgetError

    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise BudgetError(f"--budget {text!r} is not a budget: use an int k >= 1 or a ratio in (0, 1].") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, run_video_demo

    if args.video is not None:
        out = args.out if args.out != DEMO_OUT else "resprune-video.png"
        run_video_demo(args.video, model=args.model or "tiny:qwen2_5_vl", config=args.config,
                       prompt=args.prompt or "What happens in the video?", budget=_budget(args.budget),
                       overrides=args.overrides, out=out, max_new_tokens=args.max_new_tokens, device=args.device)
        return 0
    run_demo(args.model or "tiny:llava", config=args.config, photo=args.photo, prompt=args.prompt,
             budget=_budget(args.budget), overrides=args.overrides, out=args.out, max_new_tokens=args.max_new_tokens, device=args.device)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import run_one

    result = run_one(args.config, args.overrides, model=args.model, image=args.image, video=args.video,
                     prompt=args.prompt, max_new_tokens=args.max_new_tokens, device=args.device, out=args.out,
                     compare=args.compare,
                     print_fn=(lambda line: None) if args.json else print)
    if args.json:
        print(json.dumps(result["summary"], indent=2))
    return 0


def _visualize(args: argparse.Namespace) -> int:
    from .run import visualize_one

    visualize_one(args.config, args.overrides, model=args.model, image=args.image, video=args.video,
                  prompt=args.prompt, device=args.device, out=args.out)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, run_sweep

    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file and not Path(file).exists():  # `resprune sweep key=value ...`
        file, overrides = None, [file, *overrides]
    spec = load_sweep(file, overrides)
    table = run_sweep(spec, out_dir=args.out, progress=not args.quiet)
    out = args.out or spec.out_dir
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    done = sum(r["status"] == "done" for r in table)
    print(f"sweep: {done} of {len(table)} rows done; results in {out}/results.jsonl "
          f"(resprune report {out} turns them into tables and plots)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.run_dir, plots=not args.no_plots, csv_path=args.csv, against=args.against,
                        split=args.split, split_on=args.split_on)
    print(f"report: {path}")
    if args.csv:
        print(f"table: {args.csv}")
    return 0


def _lmms_tasks(args: argparse.Namespace) -> int:
    from .lmms import TASKS_DIR

    print(TASKS_DIR)
    return 0


def _config_image_args(p: argparse.ArgumentParser, *, prompt: str | None, video: bool = False) -> None:
    """CONFIG [overrides] --model M --image IMG --prompt TEXT (``run`` and ``visualize``; with
    ``video``, ``--video CLIP`` instead of ``--image``)."""
    p.add_argument("config", help="shipped config name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. budget=64")
    _model_args(p, default_model=None)
    media = p.add_mutually_exclusive_group(required=True) if video else p
    media.add_argument("--image", required=not video, help="image path")
    if video:
        media.add_argument("--video", help=f"a video: a file (PyAV; 32 frames spread over it), a folder of its frames, "
                                           f"or a demo clip ({', '.join(DEMO_CLIPS)}); Qwen2.5-VL and LLaVA-OneVision "
                                           "models; writes a contact sheet")
    p.add_argument("--prompt", default=prompt, required=prompt is None, help="the instruction")


def _model_args(p: argparse.ArgumentParser, *, default_model: str | None, required: bool | None = None) -> None:
    p.add_argument("--model", default=default_model, required=default_model is None if required is None else required,
                   help="hub id, local checkpoint folder, or tiny:llava | tiny:llava_next | tiny:qwen2_5_vl[:LAYERS] "
                        "(a random tiny model built offline, with 2 LLM decoder layers unless LAYERS says more: "
                        "tiny:llava:32 for configs with stages inside the LLM)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: where the model loads)")


DEMO_OUT = "resprune-demo.png"
DEMO_CLIPS = ("pan", "cut", "still")  # resprune.video.DEMO_CLIPS, without importing torch for --help


def build_parser() -> argparse.ArgumentParser:
    from .data import PHOTOS

    parser = argparse.ArgumentParser(prog="resprune", description="Training-free visual token pruning for LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list every scorer, selector, merger, injector and metric, and the plugin "
                                       "providing it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_plugins)

    p = sub.add_parser("configs", help="list the shipped pipeline configs")
    p.set_defaults(func=_configs)

    p = sub.add_parser("sweeps", help="list the shipped sweeps (resprune sweep NAME runs one)")
    p.set_defaults(func=_sweeps)

    p = sub.add_parser("config", help="print a resolved pipeline config (validates it)")
    p.add_argument("source", help="shipped config name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. budget=64 selector.params.alpha=0.3")
    p.set_defaults(func=_config)

    p = sub.add_parser("demo", help="prune a bundled photo on a (tiny, offline by default) LVLM; "
                                    "print costs, write an overlay PNG")
    _model_args(p, default_model=None, required=False)  # tiny:llava, or tiny:qwen2_5_vl with --video
    p.add_argument("--config", default=None, help="pipeline config (default: the paper's for the model type; "
                                                  "with --video resprune-video on Qwen2.5-VL, "
                                                  "resprune-llava-onevision on LLaVA-OneVision)")
    p.add_argument("--video", default=None, choices=DEMO_CLIPS, help="prune a clip built from the bundled photos "
                   "(a pan and zoom, a cut between two photos, or a still) on a Qwen2.5-VL or LLaVA-OneVision "
                   "model (default tiny:qwen2_5_vl) and write a contact sheet")
    p.add_argument("--photo", default="astronaut", help=f"bundled photo ({', '.join(PHOTOS)}) or an image path")
    p.add_argument("--prompt", default=None, help="instruction (default: a bundled sample question)")
    p.add_argument("--budget", default=None, help="tokens kept per image (int) or share kept (float in (0, 1])")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--out", default=DEMO_OUT, help="where the overlay PNG goes (resprune-video.png with --video)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. selector.params.alpha=0.3")
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="prune and generate with a config on any supported checkpoint")
    _config_image_args(p, prompt=None, video=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--compare", action="store_true", help="also generate without pruning")
    p.add_argument("--out", default=None, help="also write the overlay PNG here")
    p.add_argument("--json", action="store_true", help="print the kept indices, token counts, merged tokens and "
                                                       "FLOPs as JSON instead of the lines")
    p.set_defaults(func=_run)

    p = sub.add_parser("sweep", help="run an ablation sweep (default: 5 selectors x 3 budgets, tiny model, "
                                     "bundled samples)")
    p.add_argument("file", nargs="?", default=None, help="sweep YAML (default: the bundled default sweep)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model=tiny:qwen2_5_vl grid.budget=[16,32]")
    p.add_argument("--out", default=None, help="run folder (default: out_dir of the sweep file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="markdown tables and plots from a sweep's run folder (or lmms-eval results)")
    p.add_argument("run_dir", help="the folder a sweep wrote, or lmms-eval's --output_path of resprune runs")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    p.add_argument("--csv", metavar="FILE", help="also write the flat table (one row per cell; the columns of "
                                                "ResultTable.to_pandas) to FILE")
    p.add_argument("--against", metavar="NAME", help="paired tests of every row against this method (a row's method "
                                                    "or selector) instead of the run's choice")
    p.add_argument("--split", metavar="BASELINE", help="VTC-Bench's difficulty split: each method on the examples "
                                                      "BASELINE (pool, downsample, ...) at the same budget gets, and "
                                                      "on the rest")
    p.add_argument("--split-on", metavar="KEY", help="the 0/1 metric saying the baseline got an example (default: "
                                                    "accuracy.exact_match, else fidelity.exact_match, else "
                                                    "fidelity.top1_agree)")
    p.set_defaults(func=_report)

    p = sub.add_parser("lmms-tasks", help="print the folder of resprune's lmms-eval tasks (for --include_path)")
    p.set_defaults(func=_lmms_tasks)

    p = sub.add_parser("visualize", help="write the kept-token overlay for a config, image and prompt")
    _config_image_args(p, prompt="Describe the picture.", video=True)
    p.add_argument("--out", default="resprune-overlay.png", help="where the PNG goes")
    p.set_defaults(func=_visualize)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"resprune: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resprune`` command."""
    from .errors import ResPruneError

    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after options (`sweep NAME --out d key=value`) land here
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return rc
    except ResPruneError as exc:
        print(f"resprune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `resprune plugins | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would raise again
        return 0
    except OSError as exc:  # a path the checks up front could not foresee (a disk filling up, a file removed)
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"resprune: error: {exc.strerror or type(exc).__name__}{where}; nothing was left half-written "
              f"(results are written atomically), so a rerun resumes.", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
