"""The ``chain`` section of ``benchmarks/gpu.py``: parallel-in-time DDIM against sequential DDIM on a GPU.

The rows come from ``benchmarks/fpdm_parallel.py`` (``parallel_gpu_rows``): FPDM-XL/2 and DiT-XL/2 with random
weights, 100 DDIM timesteps, batch 1, 4 and 16; the parallel sampler (``examples/fpdm/fpdm/parallel.py``,
through :func:`implicitdiff.solve_chain`) with every timestep in flight, its noise-scaled tolerances and
``max_batch="auto"`` (model calls chunked to fit the free memory), one row per full-window rule of
``CONFIGS``. Per row: sweeps (sequential rounds), evaluations, seconds of both samplers, the speed-up and
the largest difference between their samples."""

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
