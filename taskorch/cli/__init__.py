"""The command line (``taskorch ...``): argparse and the commands' front ends. Nothing else in
taskorch imports this package."""

from taskorch.cli.main import main

__all__ = ["main"]
