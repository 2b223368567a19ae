"""Quality against compute: FPDM and DiT trained with the same compute, sampled under a range of budgets.

::

    python examples/fpdm/sweep.py                  # the full sweep
    python examples/fpdm/sweep.py --quick --out /tmp/sweep --work /tmp/sweep-runs   # smoke test

The code is in :mod:`fpdm.sweeping`; ``--help`` lists the options.
"""

import sys

from fpdm.sweeping import main

if __name__ == "__main__":
    sys.exit(main())
