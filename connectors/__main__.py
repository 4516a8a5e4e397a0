"""`python -m connectors`: the whole `kvstore` command line (see `connectors.cli`)."""

import sys

from connectors.cli import main

sys.exit(main())
