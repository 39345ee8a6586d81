"""``python -m bench`` (from ``scripts/``) or ``python scripts/bench``: the same as
``python scripts/bench.py``. Cheap at import: spawn-style workers re-import the main module."""

import os
import sys

if __name__ == "__main__":
    SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if SCRIPTS_DIR not in sys.path:
        sys.path.insert(0, SCRIPTS_DIR)
    from bench.cli import main

    sys.exit(main())
