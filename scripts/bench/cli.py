"""The command line, for both roles: parses it, then plays the parent or the child.

Runs first in every interpreter of the benchmark (the user's, and each ``--child POOL`` the
parent starts). It imports only the role it plays: a child never loads ``parent``, the parent
never loads the pools or the sections.
"""

from __future__ import annotations

from typing import Any

from .config import ALL_POOLS, ALL_SECTIONS, FULL, PEER_SYSTEMS, PEERS_VENV, QUICK
from .report import ROWS


def parse_args(argv: list[str] | None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        description="Benchmark taskorch against concurrent.futures, loky, multiprocessing.Pool "
                    "and pebble (each pool in a fresh interpreter).",
        epilog="Sections: " + "; ".join(f"{row[0]} {title[2:]}" for row, title in
                                        ((r, t) for r, t in ROWS if len(r) == 1)))
    parser.add_argument("--quick", action="store_true",
                        help="fewer tasks, 1 repetition, no warm-up (whole run under a minute)")
    parser.add_argument("--pools", default=",".join(ALL_POOLS),
                        help=f"comma-separated subset of {','.join(ALL_POOLS)} (default: all)")
    parser.add_argument("--sections", default=ALL_SECTIONS,
                        help=f"letters of the sections to run (default: {ALL_SECTIONS})")
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default: 2)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions per section (default: 1 with --quick, else 3)")
    parser.add_argument("--child-timeout", type=float, default=None,
                        help="kill a pool's interpreter after this many seconds "
                             f"(default: {QUICK['child_timeout']:g} quick, "
                             f"{FULL['child_timeout']:g} full)")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="also draw a bar chart (only if matplotlib imports)")
    peers = parser.add_argument_group(
        "peers", "taskorch serve against Celery, RQ, Huey and Dramatiq (bench/peers/)")
    peers.add_argument("--peers", action="store_true",
                       help="run the peers section instead of the pools (W1-W4; --reps rounds)")
    peers.add_argument("--systems", default=",".join(PEER_SYSTEMS),
                       help=f"comma-separated subset of {','.join(PEER_SYSTEMS)} (default: all)")
    peers.add_argument("--peers-venv", default=PEERS_VENV,
                       help="the peers' own venv, created and filled if missing (default: "
                            ".bench-peers-venv at the repository's top)")
    peers.add_argument("--no-install", action="store_true",
                       help="never create or pip install into the peers' venv")
    parser.add_argument("--cost", action="store_true",
                        help="run the per-task cost section instead: CPU of the parent (and of "
                             "the server, for remote run()) per no-op task")
    parser.add_argument("--defaults", action="store_true",
                        help="run the default-settings section instead: remote run() at "
                             "taskorch serve's defaults against a local pool, each with a "
                             "producer that waits for room")
    # The child role: internal.
    parser.add_argument("--child", choices=ALL_POOLS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-loops", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serial-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    unknown = [p for p in pools if p not in ALL_POOLS]
    if unknown or not pools:
        parser.error(f"--pools: unknown {unknown}; choose from {','.join(ALL_POOLS)}")
    args.pool_list = list(dict.fromkeys(pools))
    args.sections = "".join(s for s in ALL_SECTIONS if s in args.sections.upper())
    if not args.sections:
        parser.error(f"--sections: choose letters from {ALL_SECTIONS}")
    if args.workers < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--workers and --reps must be at least 1")
    args.system_list = list(dict.fromkeys(s.strip() for s in args.systems.split(",")
                                          if s.strip()))
    if not args.system_list or any(s not in PEER_SYSTEMS for s in args.system_list):
        parser.error(f"--systems: choose from {','.join(PEER_SYSTEMS)}")
    if args.child and not args.child_out:
        parser.error("--child needs --child-out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        from . import child_main

        return child_main.main(args)
    if args.peers:
        from .peers import run

        return run.main(args)
    if args.cost:
        from . import cost

        return cost.main(args)
    if args.defaults:
        from . import defaults

        return defaults.main(args)
    from . import parent

    return parent.main(args)
