"""``shiza bench``: the benchmark suite (benchmarks/suite.py; the only way in to benchmarks/)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from benchmarks.suite import add_parser as add_bench

    add_bench(sub)


def run(args: argparse.Namespace) -> int:
    from benchmarks.suite import run as run_bench

    return run_bench(args)
