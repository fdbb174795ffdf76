"""``python -m gatewayd`` runs the same command as the ``gatewayd`` script."""

import sys

from gatewayd.cli import main

sys.exit(main())
