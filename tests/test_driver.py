"""The solver driver: host reads, fixed budgets, frozen samples, trial steps, compilation.

Host synchronisations are counted with :class:`implicitdiff.diagnostics.SyncCounter`, which sees on the CPU
the operations that make the host wait for a GPU (checked against CUDA's sync debug mode on an H100).
Closed forms stand in for external references: on ``g(z) = L z + b`` Picard's residual after ``k`` steps
from ``0`` is ``L^k ||b||``; Anderson with ``m >= n`` is GMRES (Walker & Ni, 2011): its first step is a
Picard step and the ``n`` steps after it are exact, so it ends in ``n + 2`` evaluations; and good Broyden
ends in at most ``2 n`` steps on an affine map (Gay, 1979).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from implicitdiff import DEQLayer, fixed_point
from implicitdiff.diagnostics import SyncCounter
from implicitdiff.solvers import DEFAULT_CHECK_EVERY, Anderson, Broyden, Picard, UpdateRule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from backtracking import BacktrackingPicard

RULES = {
    "picard": Picard(),
    "picard_damped": Picard(tau=0.6),
    "anderson": Anderson(),
    "broyden": Broyden(memory=5),
    "backtracking": BacktrackingPicard(),
}


def affine_map(batch: int, n: int, lipschitz: float, seed: int, dtype=torch.float64):
    """``g(z) = z W^T + b`` with ``||W||_2 = L``, and its exact fixed point."""
    gen = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(torch.randn(n, n, generator=gen, dtype=torch.float64))
    s = lipschitz * torch.rand(n, generator=gen, dtype=torch.float64)
    s[0] = lipschitz
    w = u @ torch.diag(s) @ vh
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - w, b.T).T
    w, b = w.to(dtype), b.to(dtype)
    return (lambda z: z @ w.T + b), z_star


def tanh_map(batch: int, n: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64)
    w = (0.8 * w / torch.linalg.matrix_norm(w, ord=2)).to(dtype)
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64).to(dtype)
    return lambda z: torch.tanh(z @ w.T + x)


# ------------------------------------------------------------------------------------------ host reads


@pytest.mark.parametrize("name", list(RULES))
def test_a_fixed_budget_makes_exactly_max_iter_evaluations_and_at_most_two_host_reads(name):
    g, _ = affine_map(3, 5, 0.7, 1)
    calls = []

    def counted(z):
        calls.append(1)
        return g(z)

    with SyncCounter() as syncs:
        result = RULES[name](counted, torch.zeros(3, 5, dtype=torch.float64), max_iter=17, tol=None)
    assert len(calls) == result.nfe == 17
    assert syncs.count <= 2, syncs.by_op
    assert not bool(result.converged.any())  # no tolerance was set
    assert result.trace.numel() == (17 if name == "backtracking" else 0)


def test_a_fixed_budget_picard_is_the_plain_loop_and_reports_the_last_residual():
    g, _ = affine_map(4, 6, 0.9, 2)
    z = torch.zeros(4, 6, dtype=torch.float64)
    for _ in range(9):
        z = g(z)
    result = Picard()(g, torch.zeros(4, 6, dtype=torch.float64), max_iter=10, tol=None)
    # 10 evaluations: at z_0 ... z_9; the result is z_9 with its image z_10 and residual |z_10 - z_9|.
    assert torch.equal(result.z, z)
    assert torch.equal(result.fz, g(z))
    torch.testing.assert_close(result.residual, torch.linalg.vector_norm(g(z) - z, dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("check_every", [1, 3, DEFAULT_CHECK_EVERY, 10])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_tolerance_mode_reads_the_host_once_every_check_every_iterations(name, check_every):
    g = tanh_map(8, 16, 3)
    with SyncCounter() as syncs:
        result = RULES[name](g, torch.zeros(8, 16, dtype=torch.float64), max_iter=200, tol=1e-10,
                             check_every=check_every)  # fmt: skip
    assert result.all_converged
    # One read after the first evaluation, then one every check_every evaluations.
    assert syncs.count == 1 + (result.nfe - 1 + check_every - 1) // check_every, syncs.by_op
    # And the host stops at the first read after every sample converged.
    assert result.nfe - int(result.evaluations.max()) < check_every


@pytest.mark.parametrize("name", list(RULES))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), lipschitz=st.floats(0.3, 0.95))
def test_results_do_not_depend_on_check_every(name, seed, batch, lipschitz):
    g, _ = affine_map(batch, 4, lipschitz, seed)
    z0 = torch.zeros(batch, 4, dtype=torch.float64)
    results = [RULES[name](g, z0, max_iter=300, tol=1e-9, check_every=k) for k in (1, 2, 5, 50)]
    first = results[0]
    for other in results[1:]:
        assert torch.equal(other.z, first.z)
        assert torch.equal(other.residual, first.residual)
        assert torch.equal(other.converged, first.converged)
        assert torch.equal(other.evaluations, first.evaluations)
        # Only the evaluations of samples that had already converged differ, and they are reported.
        assert other.frozen_evaluations == other.nfe * batch - int(other.evaluations.sum())
        assert other.frozen_evaluations >= 0


def test_a_converged_warm_start_stops_after_one_evaluation():
    g, z_star = affine_map(3, 4, 0.5, 4)
    result = Anderson()(g, z_star.clone(), max_iter=50, tol=1e-8)
    assert result.nfe == 1 and result.all_converged


# ---------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@settings(max_examples=20, deadline=None)
@given(lipschitz=st.floats(0.2, 0.9), log_tol=st.floats(-9, -2), scale=st.floats(0.5, 3.0))
def test_picard_evaluations_and_residuals_match_the_closed_form(stop_mode, lipschitz, log_tol, scale):
    """``g(z) = L z + b`` from 0: ``r_k = L^k ||b||`` (abs) or ``L^k ||b|| / (L^k ||b|| + ||z*|| ...)``."""
    b = torch.full((1, 4), scale, dtype=torch.float64)
    tol = 10.0**log_tol

    def g(z: Tensor) -> Tensor:
        return lipschitz * z + b

    def residual(k: int) -> float:
        # z_k = b (1 - L^k) / (1 - L); g(z_k) - z_k = L^k b; g(z_k) = z_{k+1}.
        diff = lipschitz**k * 2 * scale  # ||L^k b||, ||b|| = 2 * scale for n = 4
        if stop_mode == "abs":
            return diff
        image = 2 * scale * (1 - lipschitz ** (k + 1)) / (1 - lipschitz)
        return diff / (image + 1e-9)

    needed = next(k for k in range(10_000) if residual(k) <= tol)
    if any(abs(residual(k) / tol - 1) < 1e-9 for k in (needed - 1, needed)):
        return  # on the boundary rounding decides; the property is about the count
    result = Picard()(g, torch.zeros(1, 4, dtype=torch.float64), max_iter=10_000, tol=tol,
                      stop_mode=stop_mode, check_every=1)  # fmt: skip
    assert result.nfe == needed + 1
    assert result.trace.numel() == result.nfe
    # Each iterate carries rounding of order eps * ||z*||, and the residual is a difference of iterates.
    slack = 8 * (len(result.trace) + 2) * torch.finfo(torch.float64).eps * 2 * scale / (1 - lipschitz)
    for k, value in enumerate(result.trace.tolist()):
        assert math.isclose(value, residual(k), rel_tol=1e-12, abs_tol=slack)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_anderson_with_enough_memory_solves_an_affine_map_in_n_plus_two_evaluations(n):
    """Anderson(m >= n) on an affine map is GMRES: a Picard step, then exact after ``n`` more."""
    g, z_star = affine_map(2, n, 0.9, 5)
    result = Anderson(m=n, lam=0.0)(g, torch.zeros(2, n, dtype=torch.float64), max_iter=n + 2, tol=1e-9,
                                    check_every=1)  # fmt: skip
    assert result.all_converged
    torch.testing.assert_close(result.z, z_star, rtol=0, atol=1e-9 / (1 - 0.9))


def test_anderson_regulariser_is_relative_to_the_history_and_turns_it_into_picard_when_huge():
    """``lam -> inf`` forces ``gamma -> 0``: each step is then the mixing step, i.e. Picard."""
    g, _ = affine_map(2, 6, 0.8, 6)
    z0 = torch.zeros(2, 6, dtype=torch.float64)
    picard = Picard()(g, z0, max_iter=300, tol=1e-10, check_every=1)
    heavy = Anderson(lam=1e12)(g, z0, max_iter=300, tol=1e-10, check_every=1)
    light = Anderson(lam=1e-10)(g, z0, max_iter=300, tol=1e-10, check_every=1)
    assert heavy.nfe == picard.nfe
    torch.testing.assert_close(heavy.z, picard.z, rtol=0, atol=1e-9)
    assert light.nfe <= 6 + 3 < picard.nfe  # GMRES-like: n + 2 evaluations, one more for lam > 0


@pytest.mark.parametrize("n", [2, 4, 6])
def test_good_broyden_ends_in_at_most_2n_steps_on_an_affine_map(n):
    """Gay (1979): Broyden's good method terminates in at most ``2 n`` steps on ``F(z) = A z - b``."""
    g, z_star = affine_map(3, n, 0.9, 7)
    result = Broyden(memory=2 * n + 1)(g, torch.zeros(3, n, dtype=torch.float64), max_iter=2 * n + 1,
                                       tol=1e-8, check_every=1)  # fmt: skip
    assert result.all_converged, result.summary()
    torch.testing.assert_close(result.z, z_star, rtol=0, atol=1e-8 / (1 - 0.9))


# ----------------------------------------------------------------------------------------- trial steps


def test_backtracking_rejects_trial_steps_and_converges_where_picard_diverges():
    """``g(z) = -1.5 z + 1`` expands: plain Picard diverges; halving the step to 1/2 contracts by 1/4."""

    def g(z: Tensor) -> Tensor:
        return -1.5 * z + 1.0

    z0 = torch.zeros(2, 3, dtype=torch.float64)
    picard = Picard()(g, z0, max_iter=60, tol=1e-10)
    assert not picard.all_converged
    calls = []

    def counted(z: Tensor) -> Tensor:
        calls.append(z.clone())
        return g(z)

    result = BacktrackingPicard()(counted, z0, max_iter=200, tol=1e-10)
    assert result.all_converged
    torch.testing.assert_close(result.z, torch.full_like(z0, 0.4), rtol=0, atol=1e-10 / 2.5)
    # Rejected trials were evaluated (and counted) but never became the iterate: the full step from
    # z0 = 0 is z = 1, whose residual |-1.5 - 1 + 1| * sqrt(3) is larger than the start's.
    assert len(calls) == result.nfe
    assert torch.equal(calls[1], torch.ones_like(z0))
    assert float(result.trace[1]) == float(result.trace[0])  # the rejection kept the old point


def test_backtracking_is_documented_as_one_small_file():
    source = (Path(__file__).resolve().parents[1] / "examples" / "backtracking.py").read_text()
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "custom.md").read_text()
    body = source.split('"""', 2)[2].strip()
    assert body in guide
    assert len(source.splitlines()) <= 40


# -------------------------------------------------------------------------------------- safety checks


def test_a_map_that_writes_into_its_input_is_refused():
    def in_place(z: Tensor) -> Tensor:
        return z.mul_(0.5).add_(1.0)

    with pytest.raises(ValueError, match="modified its input z in place"):
        Picard()(in_place, torch.zeros(2, 3), max_iter=10, tol=1e-6)
    relu = torch.nn.ReLU(inplace=True)
    with pytest.raises(ValueError, match="in place"):
        DEQLayer(lambda z, x: relu(z) * 0.5 + x)(torch.randn(2, 3))


def test_a_fixed_budget_reports_samples_whose_last_residual_is_not_finite():
    def g(z: Tensor) -> Tensor:
        out = 0.5 * z + 1.0
        return torch.cat([out[:1], torch.exp(z[1:] + 50.0)])

    result = Picard()(g, torch.zeros(2, 3), max_iter=5, tol=None)
    assert result.nonfinite.tolist() == [False, True]


@pytest.mark.parametrize(
    "bad", [{"check_every": 0}, {"check_every": 2.5}, {"check_every": True}, {"tol": -1.0}]
)
def test_bad_driver_arguments_raise(bad):
    kwargs = {"max_iter": 5, "tol": 1e-6, **bad}
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        Picard()(lambda z: z, torch.zeros(1, 2), **kwargs)


def test_numpy_numbers_are_accepted_as_solve_arguments():
    np = pytest.importorskip("numpy")
    result = Picard()(lambda z: 0.5 * z, torch.ones(1, 2), max_iter=np.int64(40), tol=np.float32(1e-6),
                      check_every=np.int32(2))  # fmt: skip
    assert result.all_converged


# --------------------------------------------------------------------------------------------- compile


@pytest.mark.parametrize("name", ["picard", "picard_damped", "anderson", "broyden", "backtracking"])
def test_one_step_of_each_rule_compiles_without_graph_breaks(name):
    rule: UpdateRule = RULES[name]
    g = tanh_map(3, 8, 8, dtype=torch.float32)
    z = torch.zeros(3, 8)
    fz = g(z)
    state = rule.init(z, fz)
    residual = torch.linalg.vector_norm(fz - z, dim=1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(rule.step)(state, z, fz, residual)
    # A step with no tensor work (undamped Picard returns g(z) itself) makes no graph at all (-1).
    assert explanation.graph_break_count <= 0, [b.reason for b in explanation.break_reasons]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_a_fixed_budget_solve_is_captured_in_a_cuda_graph(name):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    w = (0.5 * torch.randn(32, 32, generator=gen) / 32**0.5).to(device)
    x = torch.randn(4, 32, generator=gen).to(device)
    static_z0 = torch.zeros(4, 32, device=device)

    def gmap(z: Tensor) -> Tensor:
        return torch.tanh(z @ w.T + x)

    solver = RULES[name]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = solver(gmap, static_z0, max_iter=12, tol=None)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = solver(gmap, static_z0, max_iter=12, tol=None)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.z, eager.z)
    torch.testing.assert_close(captured.residual, eager.residual)


# ----------------------------------------------------------------------------------- fixed_point level


def test_the_layer_passes_check_every_and_tol_none_through():
    lin_calls = []

    def f(z: Tensor, x: Tensor) -> Tensor:
        lin_calls.append(1)
        return 0.5 * z + x

    x = torch.randn(2, 3)
    with torch.no_grad():
        out = fixed_point(f, x, max_iter=7, tol=None)
    assert out.stats.nfe == 7 == len(lin_calls)
    layer = DEQLayer(f, max_iter=50, tol=1e-6, check_every=1)
    with SyncCounter() as syncs:
        layer(x)
    assert syncs.count == layer(x).stats.nfe
    assert layer(x, tol=None).stats.nfe == 50


# ----------------------------------------------------------------------------------- what a user meets


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_a_low_precision_state_reports_the_residual_of_the_z_it_returns(dtype, name):
    # The rule works in float32; the iterate it evaluates is on the state's own grid, so the reported
    # residual is that of the returned z exactly (recomputed here the way the driver computes it).
    gen = torch.Generator().manual_seed(4)
    w = 0.5 * torch.randn(6, 6, generator=gen) / 6**0.5
    x = torch.randn(5, 6, generator=gen)

    def g(z: Tensor) -> Tensor:
        return torch.tanh(z.float() @ w.T + x).to(z.dtype)

    out = RULES[name](g, torch.zeros(5, 6, dtype=dtype), max_iter=40, tol=1e-2)
    assert out.z.dtype == dtype and out.all_converged
    true = torch.linalg.vector_norm(g(out.z).float() - out.z.float(), dim=1)
    torch.testing.assert_close(out.residual, true, rtol=1e-6, atol=0)
    assert bool((true <= 1e-2).all())


def test_inference_mode_solves_like_no_grad():
    from implicitdiff import solve_chain

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), max_iter=40, tol=1e-6)
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = deq(x).z
        expected_fp = fixed_point(lambda z, x: 0.5 * z + x, x).z
        expected_chain = solve_chain(lambda k, s: 0.5 * s + 1.0, torch.zeros(2), 6).zs
    with torch.inference_mode():
        assert torch.equal(deq(x).z, expected)
        assert torch.equal(fixed_point(lambda z, x: 0.5 * z + x, x).z, expected_fp)
        assert torch.equal(solve_chain(lambda k, s: 0.5 * s + 1.0, torch.zeros(2), 6).zs, expected_chain)


def test_memory_grows_with_the_iterations_done_not_with_max_iter():
    # "Until converged": a budget of 10**9 evaluations for a solve that needs 25 allocates nothing for it.
    out = Picard()(lambda z: 0.5 * z + 1.0, torch.zeros(2, 3), max_iter=10**9, tol=1e-6)
    assert out.all_converged and out.nfe < 40 and out.trace.numel() == out.nfe
