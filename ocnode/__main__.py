"""``python -m ocnode`` runs the ``ocnode`` command line."""

import sys

from ocnode.cli import main

sys.exit(main())
