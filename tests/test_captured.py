"""Captured: fixed-budget solves replayed from CUDA graphs, and eager with one warning where they cannot be.

The replay tests need a CUDA device and skip without one (the reason is printed); the fallbacks are
checked everywhere.
"""

from __future__ import annotations

import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from implicitdiff import DEQLayer, fixed_point
from implicitdiff.solvers import Anderson, Broyden, Captured, CaptureWarning, Picard
from implicitdiff.solvers.captured import _Graph

RULES = {"picard": Picard(), "anderson": Anderson(m=4), "broyden": Broyden(memory=6)}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def layer(solver, device="cpu", tol=None, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(16, 16).to(device)
    return DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), solver=solver, max_iter=12, tol=tol)


@pytest.mark.parametrize("name", list(RULES))
def test_off_cuda_the_solve_runs_eagerly_with_one_warning_and_the_same_result(name):
    x = torch.randn(4, 16)
    eager = layer(RULES[name])(x)
    captured = Captured(RULES[name])
    deq = layer(captured)
    with pytest.warns(CaptureWarning, match="CUDA graphs need a CUDA device"):
        first = deq(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = deq(x)  # the same reason is said once
    for out in (first, second):
        torch.testing.assert_close(out.z, eager.z, rtol=0, atol=0)
        assert out.stats.nfe == eager.stats.nfe == 12
    assert captured.captures == 0


def test_a_tolerance_or_a_plain_map_is_refused_with_its_reason():
    x = torch.randn(3, 16)
    with pytest.warns(CaptureWarning, match="only fixed budgets"):
        out = layer(Captured(Anderson()), tol=1e-5)(x)
    assert out.stats.all_converged
    with pytest.warns(CaptureWarning, match="does not say which tensors it reads"):
        result = Captured(Picard())(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), max_iter=60, tol=None)
    torch.testing.assert_close(result.z, torch.full((2, 3), 2.0))


def test_captured_rejects_a_solver_that_is_not_callable():
    with pytest.raises(TypeError, match="solver must be callable"):
        Captured("anderson")


@CUDA
@pytest.mark.parametrize("name", list(RULES))
def test_a_replay_equals_the_eager_solve_for_new_inputs(name):
    deq_eager = layer(RULES[name], device="cuda")
    captured = Captured(RULES[name])
    deq = layer(captured, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureWarning)
        for seed in range(3):
            x = torch.randn(4, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            with torch.no_grad():
                out, ref = deq(x), deq_eager(x)
            torch.testing.assert_close(out.z, ref.z)
            torch.testing.assert_close(out.stats.residual, ref.stats.residual)
    assert captured.captures == 1  # one shape, one budget: captured once, replayed after


@CUDA
def test_a_map_that_reads_the_host_falls_back_with_the_reason():
    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(0.5 * z + x) * float(x.abs().max() > 0)

    x = torch.randn(2, 5, device="cuda")
    with pytest.warns(CaptureWarning, match="capture failed"):
        out = fixed_point(f, x, solver=Captured(Picard()), max_iter=30, tol=None)
    torch.testing.assert_close(out.z, fixed_point(f, x, solver=Picard(), max_iter=30, tol=None).z)


class ReplayingOnCpu(Captured):
    """Captured with a stand-in for a CUDA graph, so that its cache can be tested on any device.

    Like a CUDA graph it does not hold the function it captured: a replay runs that function again on the
    static inputs while it lives, and once it is freed replays what the graph last computed (a real graph
    would replay the freed function's kernels on whatever memory its parameters had).
    """

    def _why_not(self, g, z0, tol):
        reason = super()._why_not(g, z0, tol)
        return None if reason is not None and "CUDA device" in reason else reason

    def _capture(self, g, z0, inputs, max_iter, stop_mode, options):
        static_z0, static_inputs = z0.detach().clone(), tuple(t.detach().clone() for t in inputs)
        static_map, function = g.with_inputs(*static_inputs), weakref.ref(g.f)

        def solve():
            return self._solve(static_map, static_z0, max_iter=max_iter, tol=None, stop_mode=stop_mode)

        result = solve()
        static_map.f = None  # not held by the graph

        def replay():
            static_map.f = function()
            if static_map.f is not None:
                for name, value in vars(solve()).items():
                    if isinstance(value, Tensor):
                        getattr(result, name).copy_(value)
            static_map.f = None

        self.captures += 1
        return _Graph(SimpleNamespace(replay=replay), static_z0, static_inputs, result)


def test_a_graph_is_never_replayed_for_another_function_that_took_the_address_of_a_freed_one():
    captured = ReplayingOnCpu(Picard())
    x = torch.randn(3, 4)
    for step in range(12):
        scale = 0.1 + 0.05 * step
        f = lambda z, x, scale=scale: torch.tanh(scale * z + x)  # noqa: E731 (a new function each time)
        out = fixed_point(f, x, solver=captured, max_iter=3, tol=None)
        assert torch.equal(out.z, fixed_point(f, x, solver=Picard(), max_iter=3, tol=None).z), step
        del f  # freed unless the cache holds it: the next function may take its address
    assert captured.captures == 12


def test_intermediate_states_are_named_as_the_reason_a_solve_is_not_captured():
    with pytest.warns(CaptureWarning, match=r"n_states.*replayed graph would skip"):
        out = layer(Captured(Picard()))(torch.randn(2, 16), n_states=3)
    assert len(out.states) == 3
