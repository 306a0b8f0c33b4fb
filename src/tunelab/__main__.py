"""`python -m tunelab ...` (and `accelerate launch -m tunelab train ...`) is the `tunelab` command."""

import sys

from tunelab.cli import main

sys.exit(main())
