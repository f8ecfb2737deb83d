"""The ``resprune`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _plugins(args: argparse.Namespace) -> int:
    from .plugins import get_host

    host = get_host()
    rows = host.list_plugins()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'kind':<9} {'name':<18} {'plugin':<38} {'distribution'}")
    for kind in ("scorers", "selectors", "injectors"):
        registry = getattr(host, kind)
        for entry in registry.entries():
            info = next((r for r in rows if r["plugin"] == entry.plugin), {})
            dist = f"{info.get('distribution') or '-'} {info.get('version') or ''}".strip()
            print(f"{kind[:-1]:<9} {entry.name:<18} {entry.plugin:<38} {dist}")
        if not len(registry):
            print(f"{kind[:-1]:<9} {'(none)':<18}")
    for failed in host.failed:
        print(f"FAILED    {failed.name:<18} {type(failed.error).__name__}: {failed.error}", file=sys.stderr)
    return 0


def _configs(args: argparse.Namespace) -> int:
    from .config import shipped_configs

    for name, description in shipped_configs().items():
        print(f"{name:<42} {description}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml

    print(to_yaml(load_config(args.source, args.overrides)), end="")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    budget = float(args.budget) if "." in args.budget else int(args.budget)
    run_demo(photo=args.photo, budget=budget, out=args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .demo import PHOTOS

    parser = argparse.ArgumentParser(prog="resprune", description="Training-free visual token pruning for LVLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list every scorer, selector and injector and the plugin providing it")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_plugins)

    p = sub.add_parser("configs", help="list the shipped pipeline configs")
    p.set_defaults(func=_configs)

    p = sub.add_parser("config", help="print a resolved pipeline config (validates it)")
    p.add_argument("source", help="shipped config name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. budget=64 selector.params.alpha=0.3")
    p.set_defaults(func=_config)

    p = sub.add_parser("demo", help="prune a bundled photo's patch tokens with every selector")
    p.add_argument("--photo", default="astronaut", choices=PHOTOS)
    p.add_argument("--budget", default="64", help="tokens kept (int) or share kept (float in (0, 1])")
    p.add_argument("--out", default="resprune-demo.png", help="where the overlay PNG goes")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``resprune`` command."""
    from .errors import ResPruneError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ResPruneError as exc:
        print(f"resprune: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
