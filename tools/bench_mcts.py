#!/usr/bin/env python3
"""The tree-search benchmark; its parts live in tools/bench/ (``python -m tools.bench.mcts``)."""

import sys

from tools.bench.mcts import main

if __name__ == "__main__":
    sys.exit(main())
