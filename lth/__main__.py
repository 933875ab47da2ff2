"""``python -m lth``: the ``lth`` command line."""

import sys

from .cli import main

sys.exit(main())
