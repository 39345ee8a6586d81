"""``python -m taskorch``: the same as the ``taskorch`` command."""

import sys

from taskorch.cli import main

sys.exit(main())
