"""``python -m nlref``: the same as the ``nlref`` console script (:mod:`nlref.cli`)."""

import sys

from .cli import main

sys.exit(main())
