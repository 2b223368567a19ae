"""The sweep's statistics: mean and spread over sampling seeds, and paired differences between methods.

Every method of the sweep samples from the same initial noise for a given seed, so two methods can be
compared seed by seed: :func:`paired_differences` takes the differences of a score, then their mean and
standard deviation over the seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["METRICS", "comparisons", "mean_std", "paired_differences"]

METRICS = ("fd", "kid", "fd_pixels", "agreement")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def comparisons(dit_depths: Sequence[int]) -> tuple[tuple[str, str, str], ...]:
    """The paired comparisons ``(label, method, baseline)`` that ``sweep.md`` reports."""
    return (
        ("smoothing", "FPDM smoothing", "FPDM plain"),
        ("reuse", "FPDM reuse", "FPDM plain"),
        ("smoothing + reuse", "FPDM smoothing+reuse", "FPDM plain"),
        ("reuse at 1 iteration/step", "FPDM 1 iteration/step+reuse", "FPDM 1 iteration/step"),
        ("1 iteration/step (vs 2), with reuse", "FPDM 1 iteration/step+reuse", "FPDM smoothing+reuse"),
        ("Anderson, 3 iterations/step", "FPDM reuse, Anderson", "FPDM reuse"),
        ("Anderson, 2 iterations/step", "FPDM smoothing+reuse, Anderson", "FPDM smoothing+reuse"),
        ("tolerance schedule", "FPDM tolerance", "FPDM smoothing+reuse"),
        *((f"FPDM smoothing+reuse vs DiT-{d}", "FPDM smoothing+reuse", f"DiT-{d}") for d in dit_depths),
        *(
            (f"FPDM 1 iteration/step+reuse vs DiT-{d}", "FPDM 1 iteration/step+reuse", f"DiT-{d}")
            for d in dit_depths
        ),
    )


def paired_differences(report: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """Per comparison and budget: ``metric`` of the method minus the baseline's, seed by seed (same noise).

    Returns one dict per comparison with ``label``, ``method``, ``baseline`` and ``cells``: per budget
    ``(mean, std)`` of the differences over the seeds, or ``None`` where either side is not affordable.
    Negative means the method scores lower (better) than its baseline.
    """
    rows = {(r["name"], r["budget"]): r for r in report["results"]}
    out = []
    for label, method, baseline in comparisons(report["config"]["dit_depths"]):
        cells: dict[int, tuple[float, float] | None] = {}
        for budget in report["config"]["budgets"]:
            a, b = rows[(method, budget)], rows[(baseline, budget)]
            if not (a["affordable"] and b["affordable"]):
                cells[budget] = None
                continue
            seeds_b = {s["seed"]: s[metric] for s in b["per_seed"]}
            cells[budget] = mean_std([s[metric] - seeds_b[s["seed"]] for s in a["per_seed"]])
        out.append({"label": label, "method": method, "baseline": baseline, "cells": cells})
    return out
