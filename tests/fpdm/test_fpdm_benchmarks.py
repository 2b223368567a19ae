"""The FPDM example's benchmark scripts run their quick paths (see tests/test_benchmarks.py for the rules
every script follows)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.parallel_step_model import Modelled, Trace
from implicitdiff import ChainSecant, solve_chain

QUICK = ["fpdm_sampling", "fpdm_compile", "fpdm_memory", "parallel_step_model"]


@pytest.mark.parametrize("name", QUICK)
def test_a_quick_run_prints_its_table_and_writes_only_where_told(name, quick_run):
    quick_run(name)


def _tanh_chain(k, z):
    # Two samples of three entries; each step mixes a sample's entries only.
    A = torch.tensor([[0.9, 0.3, 0.0], [-0.2, 0.8, 0.4], [0.1, 0.0, 1.1]], dtype=z.dtype)
    return torch.tanh(z @ A.T + 0.05 * k[:, None, None].to(z.dtype)) + 0.1 * z


def test_parallel_step_model_base_one_with_secants_is_chain_secant():
    # The prototype rule behind the figures, with the base I and the secants on, is the library's rule.
    z0 = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    for window in (None, 5):
        trace = Trace(torch.zeros(6, dtype=torch.float64), 30)
        options = {"form": "cumulative", "window": window}
        ours = solve_chain(_tanh_chain, z0, 30, solver=ChainSecant(blocks=2), **options)
        theirs = solve_chain(_tanh_chain, z0, 30, solver=Modelled(1.0, True, trace, blocks=2), **options)
        assert theirs.sweeps == ours.sweeps and len(trace.distance) == ours.sweeps - 1
        torch.testing.assert_close(theirs.zs, ours.zs, rtol=0, atol=1e-12)


def test_chain_secant_with_a_fitted_base_is_the_prototype_measured():
    # ChainSecant(base="fitted") is the rule the benchmark measured as "fitted scalar (from 1) + secants".
    z0 = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)
    for form, window in (("cumulative", None), ("step", 5)):
        options = {"form": form, "window": window}
        ours = solve_chain(_tanh_chain, z0, 30, solver=ChainSecant(blocks=2, base="fitted"), **options)
        proto = Modelled(None, True, None, blocks=2, fit=True)
        theirs = solve_chain(_tanh_chain, z0, 30, solver=proto, **options)
        assert theirs.sweeps == ours.sweeps
        torch.testing.assert_close(theirs.zs, ours.zs, rtol=0, atol=1e-12)


def test_parallel_step_model_exact_linear_part_is_newton_on_an_affine_chain():
    # z_{k+1} = a_k z_k + b_k: the base a_k I alone is the step's Jacobian, so each proposal of a step whose
    # predecessor's change is known is exact: one sweep to evaluate a window's fresh steps, one to confirm.
    steps, window = 12, 4
    a = 0.6 + 0.15 * torch.arange(steps, dtype=torch.float64)

    def affine(k, z):
        return a[k][:, None, None] * z + torch.cos(k.to(z.dtype))[:, None, None]

    z0 = torch.ones(1, 2, dtype=torch.float64)
    trace = Trace(torch.zeros(2, dtype=torch.float64), steps)
    out = solve_chain(affine, z0, steps, solver=Modelled(a, False, trace, blocks=1), tol=1e-12, window=window)
    x = z0
    for k in range(steps):
        x = affine(torch.tensor([k]), x[None])[0]
    torch.testing.assert_close(out.zs[-1], x, rtol=1e-13, atol=0)
    assert out.all_converged and out.sweeps <= 2 * (steps // window)
