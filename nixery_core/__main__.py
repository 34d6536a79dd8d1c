"""``python -m nixery_core``: the command line."""

import sys

from nixery_core.cli import main

sys.exit(main())
