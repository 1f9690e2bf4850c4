"""``python -m carve`` is the ``carve`` command."""

import sys

from carve.pipeline.cli import main

if __name__ == "__main__":  # spawned worker processes (carve bench --isolate) import this module too
    sys.exit(main())
