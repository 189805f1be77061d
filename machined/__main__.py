"""mctl (bin/mctl imports this module to run it)."""

import gc
import sys

if sys.argv[1:2] in (["run"], ["start"]):
    # No cyclic collections on the start-up path: mctl's imports would set off a few (~3 ms), the
    # supervisor's more, and each writes to the pages a fork shares. What lives on (supervisor,
    # helpers) turns them back on once it is up.
    gc.disable()
    from machined import prewarm  # first of all: its wait overlaps with everything else (see prewarm)

    prewarm.start()
    from machined import netagent

    netagent.prefork_early(sys.argv[1:])  # (links or helper ~2 ms sooner than the parser could say)
from machined.cli import run  # (after the prewarm on purpose)

run()
