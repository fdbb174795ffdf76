"""Exit statuses of every ``gatewayd`` command: part of the interface contract (DESIGN.md).

Scripts and monitoring depend on them, so every subcommand uses these three and no others.
"""

from typing import Final

EXIT_OK: Final = 0  # success: valid, allowed, intact
EXIT_NEGATIVE: Final = 1  # a negative answer: invalid, denied (or step-up), tampered, no match
EXIT_USAGE: Final = 2  # the command line or its inputs could not be used
