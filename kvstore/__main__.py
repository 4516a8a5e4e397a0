"""`python -m kvstore`: the store's own commands (stats, verify, clear, serve); the full command line
with the connectors' commands is the `kvstore` console script (`python -m connectors`)."""

import sys

from kvstore.cli import main

sys.exit(main())
