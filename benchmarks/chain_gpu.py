"""The ``chain`` section of ``benchmarks/gpu.py``: parallel-in-time DDIM against sequential DDIM on a GPU.

The rows come from ``benchmarks/fpdm_parallel.py`` (``parallel_gpu_rows``): wall-clock of the parallel sampler
(``examples/fpdm/parallel.py``, through :func:`implicitdiff.solve_chain`) against sequential sampling at batch
1, 8 and 64, with sweeps and block evaluations.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def chain_section(device: str, quick: bool) -> dict[str, Any]:
    """Run ``parallel_gpu_rows`` and return its rows."""
    from fpdm_parallel import parallel_gpu_rows

    rows = parallel_gpu_rows(device, quick)
    for row in rows:
        print(f"  chain: {row}", file=sys.stderr)
    return {"rows": rows}
