"""``python -m embedlens.report report|summary ...``: see :mod:`embedlens.report.cli`."""

import sys

from .cli import main

sys.exit(main())
