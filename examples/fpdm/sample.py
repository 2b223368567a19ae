"""Sample a checkpoint of train.py under a budget of block evaluations; write a grid and the arrays.

::

    python examples/fpdm/sample.py runs/fpdm-digits/checkpoint.pt --budget 48 --num 100 --guidance 2 \\
        --out runs/fpdm-digits/samples

The code is in :mod:`fpdm.generation`; ``--help`` lists the options.
"""

import sys

from fpdm.generation import main

if __name__ == "__main__":
    sys.exit(main())
