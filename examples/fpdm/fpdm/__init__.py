"""The FPDM example as a package: models, diffusion, samplers, training and evaluation.

The command-line scripts beside it (``examples/fpdm/*.py``) call the ``main`` of their module here. From
Python, run from ``examples/fpdm/`` or put that folder on ``PYTHONPATH``; the package is not installed.
"""
