"""`python -m spatia ...`: see `spatia.cli`."""

import sys

from spatia.cli import main

if __name__ == "__main__":
    sys.exit(main())
