"""`python -m ldm ...` runs the `ldm` command, so that `accelerate launch -m ldm train unet ...` starts every process
of a multi-process run from the installed package."""

import sys

from ldm.cli import main

sys.exit(main())
