#!/usr/bin/env python3
"""The benchmark report; its parts live in tools/bench/ (``python -m tools.bench.report``)."""

import sys

from tools.bench.report import main

if __name__ == "__main__":
    sys.exit(main())
