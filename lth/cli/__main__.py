"""``python -m lth.cli``: the ``lth`` command."""

import sys

from . import main

sys.exit(main())
