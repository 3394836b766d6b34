"""`python -m inferq` runs the command line."""

import sys

from inferq.cli import main

sys.exit(main())
