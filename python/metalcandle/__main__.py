"""`python -m metalcandle ...`: the same command line as the `metalcandle` script."""

import sys

from metalcandle.cli import main

sys.exit(main())
