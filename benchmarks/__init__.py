"""Benchmarks of implicitdiff and of its FPDM example: each script prints its table and writes a results file.

Run a script as a module from the repository root::

    python -m benchmarks.solvers            # writes benchmarks/results/solvers.json
    python -m benchmarks.solvers --quick    # a smoke run in seconds; writes only where --out says

Every script records where it ran through :mod:`benchmarks.harness` (machine, processor, cores, torch
threads, OS, Python, torch, numpy, device, git commit, UTC date and time, load) and writes its file
atomically; :mod:`benchmarks.tables` renders the files into the tables the documentation includes.

The FPDM example's package (``examples/fpdm/fpdm``) is not installed with the library: importing this
package puts its folder on ``sys.path`` once, so the ``fpdm_*`` scripts import it as ``fpdm``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "fpdm")
if _EXAMPLE not in sys.path:
    sys.path.append(_EXAMPLE)
