"""``python -m recipes [--quick] ...`` runs every experiment: see :mod:`.run_all`."""

import sys

from .run_all import main

if __name__ == "__main__":
    sys.exit(main())
