"""``python -m benchmarks.gpu`` runs end to end in quick mode on the CPU, so it cannot rot unseen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_quick_mode_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gpu",
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data) == {"meta", "solvers", "chain", "fpdm"}
    assert data["meta"]["quick"] and data["meta"]["torch"]
    solvers = data["solvers"]
    assert {row["mode"] for row in solvers["rows"]} == {"fixed", "tol"}
    # The driver's fixed budget reads nothing from the device inside the loop.
    assert all(row["syncs_per_iter"] == 0 for row in solvers["rows"] if row["mode"] == "fixed")
    assert all(row["new_graphs_after_second_call"] == 0 for row in solvers["compile"])
    chain = data["chain"]["rows"]
    # parallel_gpu_rows: both models, batch 1, 4 and 16, every full-window rule of fpdm_chains.CONFIGS.
    assert {(row["model"], row["batch"]) for row in chain} == {
        (model, batch) for model in ("FPDM-Digits/2", "DiT-Digits/2") for batch in (1, 4, 16)
    }
    assert {row["solver"] for row in chain} >= {"Picard", "Anderson(m=6)"}
    for row in chain:
        assert row["converged"] and 1 <= row["sweeps"] <= row["steps"]
        assert row["speedup"] == pytest.approx(row["sequential_s"] / row["parallel_s"])
        assert row["block_evals"] >= row["sequential_block_evals"] and row["max_diff"] >= 0
        assert row["max_batch"] is None and row["tau"] > 0  # max_batch="auto" is no limit off CUDA
    fpdm = data["fpdm"]
    assert {row["config"] for row in fpdm["training"]} >= {"FPDM eager", "FPDM compiled", "DiT eager"}
    compiled = next(row for row in fpdm["training"] if row["config"] == "FPDM compiled")
    assert compiled["graphs_after_warmup"] == 0  # S-JFB's loop runs eagerly over compiled blocks
    assert all(row["syncs_per_timestep"] <= 1 for row in fpdm["sampler"])
    assert all(data[name]["quick"] and data[name]["meta"]["date"] for name in ("solvers", "chain", "fpdm"))
