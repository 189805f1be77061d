"""mctl (bin/mctl imports this module to run it)."""

import sys

if sys.argv[1:2] in (["run"], ["start"]):
    from machined import prewarm  # first of all: its wait overlaps with everything else (see prewarm)

    prewarm.start()
from machined.cli import run  # (after the prewarm on purpose)

run()
