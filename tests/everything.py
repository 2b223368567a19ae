"""What a local run checks and what CI adds: the costliest matrices run whole where ``CI`` is set.

``.ci/run`` exports ``CI=true``. A local run checks a covering subset of each such matrix (every value of
every factor at least once, chosen in the code, not at random), so that the suite stays quick to run while
working; CI checks every case. Each test that uses this says which subset it keeps; one, the distributed
guide's script under ``torchrun`` (``test_ddp_exit.py``, three interpreters), runs in CI only.
"""

from __future__ import annotations

import os

#: Whether this run checks every case of the costly matrices (``CI`` set to 1, true or yes).
EVERYTHING = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}
