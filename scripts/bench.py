#!/usr/bin/env python3
"""Benchmark taskorch against the process pools it means to beat: the launcher.

    python scripts/bench.py [--quick] [--pools ...] [--sections ...] [--json F] [--chart F.png]

The benchmark itself is the package ``scripts/bench/`` (its ``__init__`` describes the roles,
pools, sections and modules); this file only puts ``scripts/`` on ``sys.path`` and calls
``bench.cli.main``. ``import bench`` finds the package, not this file: a directory with an
``__init__.py`` comes before a module of the same name on the same path entry, and this file
runs as ``__main__`` anyway. The parent also runs its children through this file
(``bench.py --child POOL``), each in a fresh interpreter.

Hazard: keep this file's top level to ``os`` and ``sys``. loky-style workers (loky, taskorch)
re-import the main module, this file, as ``__mp_main__``; whatever it imported would land in
their cold start (D) and memory (E). The package is imported only under ``__main__``.
"""

import os
import sys

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))
if SCRIPTS_DIR not in sys.path:
    sys.path.insert(0, SCRIPTS_DIR)

if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main())
