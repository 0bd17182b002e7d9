"""``python -m qsparse_compile demo``."""

import sys

from .cli import main

sys.exit(main())
