"""`python -m edgefl` runs the command line."""

import sys

from edgefl.cli import main

sys.exit(main())
