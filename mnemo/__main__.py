"""``python -m mnemo``: the same entry point as the ``mnemo`` command."""

import sys

from mnemo.cli import main

sys.exit(main())
