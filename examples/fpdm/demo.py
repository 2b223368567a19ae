"""Train a small FPDM on the bundled digits on the CPU, then sample digits under a budget.

::

    python examples/fpdm/demo.py
    python examples/fpdm/demo.py --out runs/demo --train-steps 3000 --budget 40

The code is in :mod:`fpdm.demo`; ``--help`` lists the options.
"""

import sys

from fpdm.demo import main

if __name__ == "__main__":
    sys.exit(main())
