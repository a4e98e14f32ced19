"""`python -m pagedserve` runs the command line (same as the `pagedserve` script)."""

import sys

from pagedserve.cli import main

sys.exit(main())
