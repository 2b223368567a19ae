"""Score samples against real images: Fréchet distance, KID and class agreement.

::

    python examples/fpdm/evaluate.py --samples runs/fpdm-digits/samples/samples.npz --real digits-test

The code is in :mod:`fpdm.evaluation`; ``--help`` lists the options.
"""

import sys

from fpdm.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
