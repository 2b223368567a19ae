"""Train FPDM or DiT on the digits, an image folder or VAE latents (one process or torchrun).

::

    python examples/fpdm/train.py --out runs/fpdm-digits --steps 5000
    torchrun --nproc_per_node 8 examples/fpdm/train.py --model FPDM-XL/2 --data latents:imagenet256 \\
        --batch-size 256 --lr 1e-4 --out runs/fpdm-xl

The code is in :mod:`fpdm.training`; ``--help`` lists the options.
"""

import sys

from fpdm.training import main

if __name__ == "__main__":
    sys.exit(main())
