"""``python -m skdattri``: see :mod:`skdattri.cli`."""

import sys

from .cli import main

sys.exit(main())
