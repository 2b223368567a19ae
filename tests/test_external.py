"""The torchdeq and scipy adapters follow the SolverResult contract and agree with our solvers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from external_solvers import ScipySolver, TorchDEQSolver
from hypothesis import given, settings
from test_solvers import (
    LoggedMap,
    assert_result_contract,
    assert_within_contraction_bound,
    exponential,
    nan_after_three,
    noisy,
    problems,
    rounding_allowance,
    tanh_problem,
    tolerance,
)

from implicitdiff import DEQLayer
from implicitdiff.solvers import Anderson, Broyden

# The adapters compare against other libraries: without them (pip install implicitdiff[bench]) these
# tests cannot run; the core's own correctness tests (tests/test_driver.py) need neither.
pytest.importorskip("torchdeq", reason="the torchdeq adapter's tests need torchdeq (the bench extra)")
pytest.importorskip("scipy", reason="the scipy adapter's tests need scipy (the bench extra)")

EXTERNAL = {
    "torchdeq_anderson": TorchDEQSolver("anderson", m=5, lam=1e-8),
    "torchdeq_broyden": TorchDEQSolver("broyden", LBFGS_thres=10),
    "torchdeq_fixed_point_iter": TorchDEQSolver("fixed_point_iter"),
    "scipy_anderson": ScipySolver("anderson", jac_options={"M": 5}),
    "scipy_broyden1": ScipySolver("broyden1"),
    "scipy_hybr": ScipySolver("hybr"),
}


def max_iter_for(name: str, lipschitz: float) -> int:
    return 2000 if name == "torchdeq_fixed_point_iter" else 400


@pytest.mark.parametrize("name", list(EXTERNAL))
@settings(max_examples=6)
@given(spec=problems.filter(lambda spec: spec["lipschitz"] <= 0.9))
def test_external_solvers_converge_on_contractions_and_agree_with_ours(name, spec):
    problem = tanh_problem(**spec)
    dtype = spec["dtype"]
    z0 = torch.zeros(spec["batch"], *spec["shape"], dtype=dtype)
    tol = tolerance(dtype)
    max_iter = max_iter_for(name, spec["lipschitz"])
    result = EXTERNAL[name](problem.g, z0, max_iter=max_iter, tol=tol)
    assert_result_contract(result, z0, tol, max_iter)
    assert result.all_converged, result.summary()
    assert_within_contraction_bound(result, problem, dtype)
    ours = Anderson()(problem.g, z0, max_iter=200, tol=tol)
    gap = (result.z.double() - ours.z.double()).reshape(spec["batch"], -1).norm(dim=1)
    slack = 2 * rounding_allowance(problem, dtype, z0[0].numel())
    bound = (result.residual.double() + ours.residual.double() + slack) / (1 - problem.lipschitz)
    assert bool((gap <= bound).all())


@pytest.mark.parametrize("name", list(EXTERNAL))
def test_external_solvers_report_our_residual_of_the_returned_z(name):
    problem = tanh_problem(3, (2, 2, 2), torch.float64, 0.8, seed=3)
    z0 = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    result = EXTERNAL[name](problem.g, z0, max_iter=20, tol=1e-12, stop_mode="rel")
    flat = result.z.reshape(3, -1)
    recomputed = (problem.g(result.z).reshape(3, -1) - flat).norm(dim=1) / (
        problem.g(result.z).reshape(3, -1).norm(dim=1) + 1e-9
    )
    torch.testing.assert_close(result.residual, recomputed, rtol=1e-9, atol=1e-15)
    assert result.nfe <= 20 and len(result.trace) == result.nfe


@pytest.mark.parametrize("bad_map", [noisy, exponential, nan_after_three], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", list(EXTERNAL))
def test_external_solvers_on_bad_maps_return_the_best_finite_iterate(name, bad_map):
    logged = LoggedMap(bad_map)
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    result = EXTERNAL[name](logged, z0, max_iter=25, tol=1e-6)
    assert_result_contract(result, z0, 1e-6, 25)
    assert len(logged.calls) == result.nfe
    assert not bool(result.converged.any())
    assert bool(torch.isfinite(result.z).all())
    assert torch.equal(result.nonfinite, logged.nonfinite_seen())
    best_seen = logged.residuals().min(dim=0).values
    torch.testing.assert_close(result.residual, best_seen, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(EXTERNAL))
def test_external_solvers_freeze_samples_that_converge_at_once(name):
    # Sample 0 sits at its fixed point from the start (g(0) = 0 exactly); sample 1 must iterate.
    injection = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], dtype=torch.float64)
    logged = LoggedMap(lambda z: torch.tanh(0.5 * z + injection))
    z0 = torch.zeros(2, 3, dtype=torch.float64)
    result = EXTERNAL[name](logged, z0, max_iter=max_iter_for(name, 0.5), tol=1e-9)
    assert result.all_converged and result.nfe > 1
    assert torch.equal(result.z[0], z0[0])


@pytest.mark.parametrize(
    "name", ["torchdeq_anderson", "torchdeq_broyden", "scipy_anderson", "scipy_broyden1"]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_external_solvers_handle_half_precision_states(name, dtype):
    problem = tanh_problem(2, (4,), dtype, 0.6, seed=5)
    z0 = torch.zeros(2, 4, dtype=dtype)
    result = EXTERNAL[name](problem.g, z0, max_iter=100, tol=3e-2)
    assert result.z.dtype == dtype and result.all_converged
    assert_within_contraction_bound(result, problem, dtype)


def test_external_solvers_work_inside_a_layer():
    problem = tanh_problem(2, (5,), torch.float64, 0.7, seed=9)

    def f(z, x):
        return problem.g(z) + 0 * x

    x = torch.zeros(2, 5, dtype=torch.float64)
    for solver in (TorchDEQSolver("broyden"), ScipySolver("broyden2")):
        out = DEQLayer(f, solver=solver, max_iter=100, tol=1e-10)(x)
        assert out.stats.all_converged
        torch.testing.assert_close(out.z, problem.z_star, atol=1e-9, rtol=0)


def test_scipy_adapter_reraises_errors_from_g_and_ends_its_threads():
    import threading

    before = threading.active_count()
    with pytest.raises(ValueError, match="shaped like z0"):
        ScipySolver("anderson")(lambda z: z[:, :1], torch.zeros(3, 2), max_iter=10, tol=1e-6)
    calls = []

    def fails_later(z):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 0.5 * z + 1

    with pytest.raises(RuntimeError, match="boom"):
        ScipySolver("broyden1")(fails_later, torch.zeros(4, 2), max_iter=10, tol=1e-12)
    assert threading.active_count() == before


@pytest.mark.parametrize("solver_cls", [TorchDEQSolver, ScipySolver])
def test_adapters_check_the_solve_arguments(solver_cls):
    with pytest.raises(ValueError):
        solver_cls()(noisy, torch.zeros(2, 3), max_iter=0, tol=1e-3)
    with pytest.raises(ValueError):
        solver_cls()(noisy, torch.zeros(2, 3), max_iter=5, tol=-1.0)
    with pytest.raises(ValueError):
        solver_cls()(noisy, torch.zeros(2, 3), max_iter=5, tol=1e-3, stop_mode="max")


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TorchDEQSolver("newton"), ValueError, "name must be one of"),
        (lambda: TorchDEQSolver("anderson", f_stop_mode="rel"), TypeError, "unknown option"),
        (lambda: TorchDEQSolver("anderson", max_iter=5), TypeError, "unknown option"),
        (lambda: ScipySolver("nelder-mead"), ValueError, "method must be one of"),
        (lambda: ScipySolver("anderson", bogus=1), ValueError, "bogus"),
    ],
)
def test_adapters_reject_unknown_names_and_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("solver_cls", "module"), [(TorchDEQSolver, "torchdeq.solver"), (ScipySolver, "scipy.optimize")]
)
def test_missing_optional_dependency_names_the_extra(monkeypatch, solver_cls, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"implicitdiff\[bench\]"):
        solver_cls()


def test_importing_implicitdiff_does_not_import_torchdeq_or_scipy():
    code = (
        "import sys, implicitdiff, implicitdiff.solvers, implicitdiff.regularizers; "
        "bad = [m for m in ('torchdeq', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_our_solvers_need_fewer_evaluations_than_torchdeq_anderson_at_tight_tolerance():
    # torchdeq's absolute regulariser (lam=1e-4 by default) slows it down near the solution.
    problem = tanh_problem(3, (8,), torch.float64, 0.9, seed=11)
    z0 = torch.zeros(3, 8, dtype=torch.float64)
    ours = Broyden()(problem.g, z0, max_iter=300, tol=1e-10)
    theirs = TorchDEQSolver("anderson")(problem.g, z0, max_iter=300, tol=1e-10)
    assert ours.all_converged
    assert ours.nfe < theirs.nfe
