"""`python -m ldm.cli ...` runs the `ldm` command."""

import sys

from ldm.cli import main

sys.exit(main())
