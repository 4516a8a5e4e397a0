"""The `kvstore` console script: the whole command line, composed from above.

`kvstore.cli` holds the registry and the store's own commands; importing `connectors.commands` adds the
ones `connectors` owns (`demo`, `precompute`). `python -m connectors` runs the same.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import connectors.commands  # noqa: F401  (registers demo, precompute)
    from kvstore.cli import main as kvstore_main

    return kvstore_main(argv)


if __name__ == "__main__":
    sys.exit(main())
