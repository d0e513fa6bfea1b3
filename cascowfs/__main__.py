"""``python -m cascowfs``: the CLI."""

import sys

from .cli import main

sys.exit(main())
