"""``python -m ocnode`` runs the ``ocnode`` command line."""

import sys

from ocnode.training.cli import main

sys.exit(main())
