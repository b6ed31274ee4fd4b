"""``baton bench serve``: drive a running OpenAI-compatible server with a seeded workload and report
TTFT, ITL, E2E percentiles, throughput and goodput at an SLO (``bench/serve_load.py`` does the
work).

The load generator lives in ``bench/`` (a source checkout); the CLI only wires it in, so
``baton --help`` stays fast and an installation without ``bench/`` says so instead of failing.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against a running server")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH")
    bench_sub.required = True
    s = bench_sub.add_parser(
        "serve",
        help="async load generator: Poisson/burst arrivals, rate sweep, goodput at SLO",
        description="Streams /v1/completions with token-id prompts; writes JSON and plots.",
    )
    try:
        from baton.bench.serve_load import add_arguments
    except ImportError as exc:
        reason = str(exc)
        s.set_defaults(func=lambda args: _missing(reason))
        return
    add_arguments(s)
    s.set_defaults(func=run)


def _missing(reason: str) -> int:
    raise FileNotFoundError(f"baton bench needs the bench/ folder of a source checkout ({reason})")


def run(args: argparse.Namespace) -> int:
    from baton.bench.serve_load import run_cli

    return run_cli(args)
