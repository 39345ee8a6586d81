"""``python -m taskorch``: the same as the ``taskorch`` command."""

import sys

from taskorch.cli.main import main

sys.exit(main())
