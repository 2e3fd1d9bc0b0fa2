"""``python -m qpasses``: the same as the ``qpasses`` command."""

import sys

from qpasses.cli import main

sys.exit(main())
