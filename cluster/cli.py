"""The ``baton`` console script: one argparse subcommand per module in ``COMMAND_MODULES``.

Each module exposes ``register(subparsers) -> None`` and sets ``func`` on its parser via ``set_defaults``;
``func(args) -> int`` is the exit status. Modules are imported lazily by name so ``baton --help`` stays fast
and one broken optional dependency does not take the whole CLI down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES: tuple[str, ...] = (
    "baton.cluster.cmd_generate",
    "baton.cluster.cmd_serve",
    "baton.cluster.cmd_cache",
    "baton.cluster.cmd_bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton", description="Baton: disaggregated prefill/decode LLM serving on Ray."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"baton {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
