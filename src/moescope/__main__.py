"""`python -m moescope`: the same entry point as the `moescope` command."""

import sys

from moescope.cli import main

sys.exit(main())
