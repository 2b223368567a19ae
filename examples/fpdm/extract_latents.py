"""Encode an image folder into VAE latents for latent-space training (``--data latents:FILE``).

::

    python examples/fpdm/extract_latents.py --images /data/imagenet/train --out imagenet256.pt \\
        --vae stabilityai/sd-vae-ft-ema --image-size 256

The code is in :mod:`fpdm.latents`; ``--help`` lists the options.
"""

import sys

from fpdm.latents import main

if __name__ == "__main__":
    sys.exit(main())
