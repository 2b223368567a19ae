"""The FPDM example's benchmark scripts run their quick paths (see tests/test_benchmarks.py for the rules
every script follows)."""

from __future__ import annotations

import pytest

QUICK = ["fpdm_sampling", "fpdm_compile", "fpdm_memory"]


@pytest.mark.parametrize("name", QUICK)
def test_a_quick_run_prints_its_table_and_writes_only_where_told(name, quick_run):
    quick_run(name)
