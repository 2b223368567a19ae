"""Rehearse the at-scale path at small size on the CPU: extract, train, sample, evaluate, each checked.

::

    python examples/fpdm/rehearsal.py              # or: make rehearsal
    python examples/fpdm/rehearsal.py --keep /tmp/rehearsal

The stages and their checks are in :mod:`fpdm.rehearsal`; ``--help`` lists the options.
"""

import sys

from fpdm.rehearsal import main

if __name__ == "__main__":
    sys.exit(main())
