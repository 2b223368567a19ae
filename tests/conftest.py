"""Shared test settings and fixtures: hypothesis profiles (CI is derandomised so a red run can be replayed),
the contractive maps and inputs that many modules' tests start from."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import Tensor, nn

from implicitdiff.solvers import SolverResult

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# One thread: the tests' tensors are small, and with two threads every small operation waits for a
# second core, which a busy 2-core machine seldom has free (the chain grid and the correction-loss
# tests ran four times slower with two under load). Results do not depend on the thread count.
torch.set_num_threads(1)


class TanhCell(nn.Module):
    r""":math:`f(z, x) = \tanh(W z + x)` with :math:`\|W\|_2 = L` (a contraction in ``z``)."""

    def __init__(self, n: int, lipschitz: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.linear = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            w = torch.randn(n, n, generator=gen)
            self.linear.weight.copy_(lipschitz * w / torch.linalg.matrix_norm(w, 2))

    def forward(self, z: Tensor, x: Tensor, scale: float = 1.0) -> Tensor:
        return torch.tanh(self.linear(z) + scale * x)


@pytest.fixture
def cell() -> TanhCell:
    return TanhCell(6)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tanh_f():
    """``f(z, x) = tanh(0.5 lin(z) + x)`` on 3 features, with a seeded linear layer."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    return lambda z, x: torch.tanh(0.5 * lin(z) + x)


class RecordingSolver:
    """A user's own solver: a plain class with the Solver call, doing Picard steps itself."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, g, z0, *, max_iter, tol, stop_mode="abs"):
        self.calls.append({"max_iter": max_iter, "tol": tol, "stop_mode": stop_mode})
        z, nfe, trace = z0, 0, []
        batch = z0.shape[0]
        while True:
            fz = g(z)
            nfe += 1
            residual = (fz - z).reshape(batch, -1).norm(dim=1)
            trace.append(float(residual.max()))
            if bool((residual <= tol).all()) or nfe >= max_iter:
                break
            z = fz
        return SolverResult(z=z, residual=residual, converged=residual <= tol, nfe=nfe, trace=trace)


@pytest.fixture(scope="session")
def make_cell():
    """The class :class:`TanhCell`, for tests that build cells of their own sizes and contractions."""
    return TanhCell


@pytest.fixture(scope="session")
def make_recording_solver():
    """The class :class:`RecordingSolver`, a user's own solver (a plain class with the Solver call)."""
    return RecordingSolver


@pytest.fixture
def quick_run(tmp_path, capsys):
    """Run ``python -m benchmarks.<name> --quick --out TMP`` in-process and check what it printed and wrote:
    a table, a results file the generator reads with ``meta.quick`` set, and the committed file untouched."""
    import importlib
    import json

    from benchmarks import harness, tables

    def run(name: str) -> None:
        threads = torch.get_num_threads()
        module = importlib.import_module(f"benchmarks.{name}")
        committed = harness.RESULTS / f"{name}.json"
        before = committed.read_bytes() if committed.exists() else None
        out = tmp_path / f"{name}.json"
        try:
            assert module.main(["--quick", "--out", str(out)]) in (0, None)
        finally:
            torch.set_num_threads(threads)
        printed = capsys.readouterr().out
        assert "| ---" in printed, f"{name} printed no table"
        record = json.loads(out.read_text())
        assert record["meta"]["quick"] is True and record["meta"]["command"].startswith("python")
        assert tables.render(f"{name}.json", record)  # the generator reads what the script wrote
        after = committed.read_bytes() if committed.exists() else None
        assert after == before, "a quick run must not touch the committed results"

    return run
