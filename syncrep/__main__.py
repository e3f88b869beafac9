"""``python -m syncrep``: the same command line as the ``syncrep`` console script."""

import sys

from syncrep.cli import main

if __name__ == "__main__":
    sys.exit(main())
