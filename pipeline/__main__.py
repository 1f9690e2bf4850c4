"""``python -m pipeline`` is the ``carve`` command."""

import sys

from .cli import main

sys.exit(main())
