"""Encode an image folder into a folder of VAE latents for latent-space training (``--data latents:DIR``).

::

    torchrun --nproc_per_node 8 examples/fpdm/extract_latents.py --data folder:/data/imagenet/train \\
        --out imagenet256 --vae stabilityai/sd-vae-ft-ema --image-size 256 --crop adm --workers 8

Run it again after an interruption to continue. The code and the folder's format are in :mod:`fpdm.latents`;
``--help`` lists the options.
"""

import sys

from fpdm.latents import main

if __name__ == "__main__":
    sys.exit(main())
