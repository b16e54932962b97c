"""``python -m genkernel``: the ``genkernel`` command (:mod:`genkernel.cli`)."""

import sys

from .cli import main

sys.exit(main())
