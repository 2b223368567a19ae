"""solve_chain: a recurrence solved as one fixed point over its trajectory, against the sequential rollout."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from everything import EVERYTHING
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils import _pytree as pytree

from benchmarks.chain_grid import GRID, ROUNDING, ToyChain, check_against_rollout, error_bound, grid_sweeps
from implicitdiff import Anderson, Broyden, ChainSecant, Picard, solve_chain
from implicitdiff.chain import FORMS
from implicitdiff.diagnostics import SyncCounter
from implicitdiff.solvers import UpdateRule

# Anderson and Broyden are run on chains on purpose here: their warning is tested once, below.
pytestmark = pytest.mark.filterwarnings("ignore::implicitdiff.ChainRuleWarning")

SOLVERS: dict[str, Callable[[], Any]] = {
    "picard": lambda: None,
    "damped": lambda: Picard(tau=0.7),
    "anderson": lambda: Anderson(m=3),
    "broyden": lambda: Broyden(memory=4),
    "chain_secant": lambda: ChainSecant(m=3),
}


@st.composite
def chains(draw: st.DrawFn) -> tuple[ToyChain, int | None]:
    steps = draw(st.integers(1, 24))
    gains = draw(st.lists(st.floats(0.1, 1.3), min_size=steps, max_size=steps))
    chain = ToyChain(
        steps,
        draw(st.integers(1, 4)),
        gains,
        draw(st.integers(0, 2**16)),
        draw(st.sampled_from(["tanh", "affine"])),
    )
    window = draw(st.none() | st.integers(1, steps + 2))
    return chain, window


@given(
    chains(), st.sampled_from(sorted(SOLVERS)), st.sampled_from([1e-9, 1e-6, 1e-3]), st.sampled_from(FORMS)
)
def test_chain_matches_the_sequential_rollout_within_the_bound_of_its_residuals(case, solver, tol, form):
    chain, window = case
    steps = chain.A.shape[0]
    rule = SOLVERS[solver]()
    out = solve_chain(chain.step, chain.z0, steps, solver=rule, tol=tol, window=window, form=form)
    check_against_rollout(chain, out, tol)
    # Any rule finishes within num_steps sweeps (each sweep finalises at least one step).
    assert out.sweeps <= steps


@given(chains(), st.sampled_from(FORMS))
def test_picard_never_needs_more_sweeps_than_steps_and_tol_zero_is_the_rollout(case, form):
    chain, window = case
    steps = chain.A.shape[0]
    out = solve_chain(chain.step, chain.z0, steps, tol=0.0, window=window, max_iter=steps, form=form)
    assert out.all_converged and out.sweeps <= steps
    torch.testing.assert_close(out.zs, chain.rollout(), atol=ROUNDING * steps, rtol=0)


@given(chains())
def test_a_window_smaller_than_the_chain_gives_the_same_trajectory_and_bounds_each_call(case):
    chain, window = case
    steps, tol = chain.A.shape[0], 1e-9
    full = solve_chain(chain.step, chain.z0, steps, tol=tol)
    chain.largest_call = 0
    windowed = solve_chain(chain.step, chain.z0, steps, tol=tol, window=window)
    assert chain.largest_call <= (window or steps)
    check_against_rollout(chain, windowed, tol)
    # Both are within the bound of their residuals of the rollout, hence of each other.
    distance = torch.linalg.vector_norm(full.zs[1:] - windowed.zs[1:], dim=1)
    allowed = error_bound(chain, full.residual) + error_bound(chain, windowed.residual)
    assert torch.all(distance <= allowed + ROUNDING * steps)


@given(chains(), st.sampled_from(sorted(SOLVERS)), st.sampled_from(FORMS))
def test_evaluations_count_every_step_passed_to_step_and_nothing_else(case, solver, form):
    chain, window = case
    steps = chain.A.shape[0]
    out = solve_chain(
        chain.step, chain.z0, steps, solver=SOLVERS[solver](), tol=1e-6, window=window, form=form
    )
    assert out.sweeps == chain.calls
    assert out.total_evaluations == int(chain.asked.sum())
    assert torch.equal(out.evaluations_per_step, chain.asked)
    # Final steps are never evaluated again: a step is evaluated at most once per sweep, and step 0
    # (whose predecessor z0 is final from the start) exactly once.
    assert int(chain.asked[0]) == 1
    assert int(chain.asked.max()) <= out.sweeps


def test_picard_takes_every_sweep_on_a_chain_that_never_settles_early():
    # z_{k+1} = 2 z_k + 1 from guesses z0: step j is exact only once every step before it is.
    steps = 12
    calls = []

    def step(k: Tensor, x: Tensor) -> Tensor:
        calls.append(k.tolist())
        return 2.0 * x + 1.0

    out = solve_chain(step, torch.zeros(1, dtype=torch.float64), steps, tol=1e-12)
    expected = torch.tensor([[2.0**j - 1.0] for j in range(steps + 1)], dtype=torch.float64)
    assert torch.equal(out.zs, expected)
    assert out.sweeps == steps
    # Sweep s evaluates the steps s..N-1: the final prefix is never evaluated again.
    assert calls == [list(range(s, steps)) for s in range(steps)]
    assert out.total_evaluations == steps * (steps + 1) // 2


def euler_chain(steps: int, horizon: float) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Explicit Euler on ``dx/dt = tanh(W x + sin t) - x``: steps close to the identity for small ``h``."""
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=generator, dtype=torch.float64) / 6**0.5
    h = horizon / steps

    def step(k: Tensor, x: Tensor) -> Tensor:
        return x + h * (torch.tanh(x @ W.T + torch.sin(h * k.to(x.dtype))[:, None]) - x)

    return step, torch.randn(6, generator=generator, dtype=torch.float64)


def test_the_cumulative_form_is_what_makes_picard_parallel_on_an_integrator():
    # On F an error travels down the chain multiplied by J_k = I + O(h) and never fades: every sweep
    # finalises one step. On G it is multiplied by J_k - I = O(h): Picard-Lindelof, (L T)^s / s!.
    steps = 60
    step, z0 = euler_chain(steps, horizon=1.0)
    on_steps = solve_chain(step, z0, steps, tol=1e-8, form="step")
    cumulative = solve_chain(step, z0, steps, tol=1e-8, form="cumulative")
    assert on_steps.sweeps == steps
    assert cumulative.all_converged and cumulative.sweeps <= steps // 3
    torch.testing.assert_close(cumulative.zs, on_steps.zs, atol=1e-8 * steps, rtol=0)


@pytest.mark.parametrize("solver", ["picard", "anderson", "broyden"])
def test_one_host_read_per_sweep(solver):
    chain = ToyChain(40, 8, [0.9] * 40, seed=3, act="tanh")

    def step(k: Tensor, x: Tensor) -> Tensor:  # the bare step: no counting, no host reads
        return torch.tanh(torch.einsum("kij,kj->ki", chain.A[k], x) + chain.b[k])

    with SyncCounter() as syncs:
        out = solve_chain(step, chain.z0, 40, solver=SOLVERS[solver](), tol=1e-8, window=16)
    assert out.all_converged and out.sweeps >= 2
    assert syncs.count <= out.sweeps, syncs.by_op


def test_the_budget_of_sweeps_is_respected_and_unfinished_steps_say_so():
    chain = ToyChain(20, 4, [1.0] * 20, seed=1, act="tanh")
    out = solve_chain(chain.step, chain.z0, 20, tol=1e-12, max_iter=3, window=5)
    assert out.sweeps == 3
    assert not out.all_converged
    done = int(out.converged.sum())
    assert 3 <= done < 20
    assert torch.all(out.converged[:done]) and not torch.any(out.converged[done:])
    # Known residuals are those of the returned trajectory; unknown ones are inf.
    images = torch.tanh(torch.einsum("kij,kj->ki", chain.A, out.zs[:-1]) + chain.b)
    actual = torch.linalg.vector_norm(images - out.zs[1:], dim=1)
    known = torch.isfinite(out.residual)
    torch.testing.assert_close(out.residual[known], actual[known], atol=ROUNDING, rtol=0)
    assert not known[done] and not torch.any(known[done + 5 :])


def test_a_step_that_returns_nan_stops_the_chain_at_the_last_finite_step():
    def step(k: Tensor, x: Tensor) -> Tensor:
        y = 0.5 * x + 1.0
        return torch.where((k >= 6)[:, None], torch.nan, y)

    out = solve_chain(step, torch.zeros(2, dtype=torch.float64), 10)
    assert out.converged.tolist() == [True] * 6 + [False] * 4
    assert bool(out.nonfinite[6]) and not torch.any(out.nonfinite[:6])
    assert out.sweeps <= 7


def test_states_of_any_shape_and_dtype_come_back_in_that_shape_and_dtype():
    z0 = torch.randn(2, 3, 4)

    def step(k: Tensor, x: Tensor) -> Tensor:
        assert x.shape == (k.shape[0], 2, 3, 4) and x.dtype == torch.float32
        return 0.5 * x + k.to(x.dtype).view(-1, 1, 1, 1)

    out = solve_chain(step, z0, 6, window=4)
    assert out.zs.shape == (7, 2, 3, 4) and out.zs.dtype == torch.float32
    expected = z0
    for k in range(6):
        expected = 0.5 * expected + k
    torch.testing.assert_close(out.zs[-1], expected)
    assert out.residual.dtype == torch.float32 and float(out.residual.max()) <= 1e-5


def test_no_steps_is_the_initial_state():
    out = solve_chain(lambda k, x: x, torch.ones(3), 0)
    assert out.zs.shape == (1, 3) and out.sweeps == 0 and out.total_evaluations == 0
    assert out.all_converged


def _ok(k: Tensor, x: Tensor) -> Tensor:
    return 0.5 * x


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_steps": -1}, ValueError, "num_steps"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
        ({"num_steps": True}, TypeError, "num_steps"),
        ({"tol": -1e-3}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"tol": "1e-3"}, TypeError, "tol"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"window": 0}, ValueError, "window"),
        ({"window": 2.0}, TypeError, "window"),
        ({"error_tol": -1e-3}, ValueError, "error_tol"),
        ({"error_tol": float("inf")}, ValueError, "error_tol"),
        ({"error_tol": "1e-3"}, TypeError, "error_tol"),
        ({"stop_mode": "max"}, ValueError, "stop_mode"),
        ({"form": "integral"}, ValueError, "form"),
        ({"solver": lambda g, z0, **kw: None}, TypeError, "solver must be an update rule"),
        ({"z0": [1.0, 2.0]}, TypeError, "z0"),
        ({"z0": torch.ones(2, dtype=torch.long)}, TypeError, "floating-point"),
        ({"step": "not callable"}, TypeError, "step"),
    ],
)
def test_bad_arguments_raise_errors_that_name_them(kwargs, error, match):
    args: dict[str, Any] = {"step": _ok, "z0": torch.ones(2), "num_steps": 4, **kwargs}
    with pytest.raises(error, match=match):
        solve_chain(args.pop("step"), args.pop("z0"), args.pop("num_steps"), **args)


def test_a_step_that_misbehaves_is_named():
    with pytest.raises(ValueError, match="stacked like z"):
        solve_chain(lambda k, x: x[0], torch.ones(2), 3)
    with pytest.raises(ValueError, match="in place"):
        solve_chain(lambda k, x: x.mul_(0.5), torch.ones(2), 3)


def test_the_relative_residual_does_not_depend_on_the_scale_of_the_states():
    chain = ToyChain(20, 4, [0.7] * 20, seed=5, act="affine")
    out = solve_chain(chain.step, chain.z0, 20, tol=1e-8, stop_mode="rel", window=6)
    scaled = solve_chain(
        lambda k, x: 1e6 * chain.step(k, x / 1e6), 1e6 * chain.z0, 20, tol=1e-8, stop_mode="rel", window=6
    )
    assert out.all_converged and scaled.all_converged and out.sweeps == scaled.sweeps
    images = torch.einsum("kij,kj->ki", chain.A, out.zs[:-1]) + chain.b
    relative = torch.linalg.vector_norm(images - out.zs[1:], dim=1) / (
        torch.linalg.vector_norm(images, dim=1) + 1e-9
    )
    torch.testing.assert_close(out.residual, relative, atol=ROUNDING, rtol=0)


def test_a_rule_that_proposes_non_finite_values_falls_back_to_the_image_and_is_restarted():
    class Broken(UpdateRule):
        restarted = 0

        def step(self, state, z, fz, residual):
            return torch.full_like(z, torch.nan), state

        def restart(self, state, mask):
            Broken.restarted += int(mask.sum())
            return state

    chain = ToyChain(12, 3, [0.5] * 12, seed=2, act="tanh")
    out = solve_chain(chain.step, chain.z0, 12, solver=Broken(), tol=1e-9)
    check_against_rollout(chain, out, 1e-9)
    assert Broken.restarted > 0 and not torch.any(out.nonfinite)


# ----------------------------------------------------------------------------------- per-step tolerances


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_each_step_meets_its_own_tolerance_and_the_bound_follows(solver):
    steps = 24
    chain = ToyChain(steps, 5, [0.8] * steps, seed=11, act="tanh")
    # Loose early, tight late (as a sampler's noise-scaled tolerance), and the reverse.
    for tols in (torch.logspace(-2, -10, steps, dtype=torch.float64), torch.logspace(-10, -3, steps)):
        out = solve_chain(chain.step, chain.z0, steps, solver=SOLVERS[solver](), tol=tols, window=8)
        assert out.all_converged
        assert torch.all(out.residual <= tols.to(out.residual.dtype) + ROUNDING)
        images = chain.act(torch.einsum("kij,kj->ki", chain.A, out.zs[:-1]) + chain.b)
        torch.testing.assert_close(
            out.residual, torch.linalg.vector_norm(images - out.zs[1:], dim=1), atol=ROUNDING, rtol=0
        )
        error = torch.linalg.vector_norm(out.zs[1:] - chain.rollout()[1:], dim=1)
        slack = ROUNDING * torch.arange(1, steps + 1, dtype=torch.float64)
        assert torch.all(error <= error_bound(chain, out.residual) + slack)


def test_a_loose_tolerance_on_some_steps_costs_fewer_sweeps_than_a_tight_one_everywhere():
    steps = 30
    chain = ToyChain(steps, 4, [0.9] * steps, seed=2, act="tanh")
    tight = solve_chain(chain.step, chain.z0, steps, tol=1e-10)
    mixed = solve_chain(chain.step, chain.z0, steps, tol=[1e-3] * 20 + [1e-10] * 10)
    assert mixed.all_converged and mixed.sweeps < tight.sweeps


@pytest.mark.parametrize(
    ("tol", "error", "match"),
    [
        ([1e-6] * 3, ValueError, r"one tolerance per step \(shape \(4,\)\), got shape \(3,\)"),
        (torch.full((2, 2), 1e-6), ValueError, r"got shape \(2, 2\)"),
        ([1e-6, -1.0, 1e-6, 1e-6], ValueError, "finite values >= 0"),
        ([1e-6, float("nan"), 1e-6, 1e-6], ValueError, "finite values >= 0"),
    ],
)
def test_per_step_tolerances_are_checked(tol, error, match):
    with pytest.raises(error, match=match):
        solve_chain(_ok, torch.ones(2), 4, tol=tol)


# ----------------------------------------------------------------------------------------- bounded memory


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("max_batch", [1, 3, 7])
def test_max_batch_bounds_each_call_and_changes_nothing_else(solver, max_batch):
    steps = 20
    whole = ToyChain(steps, 4, [0.7] * steps, seed=4, act="tanh")
    chunked = ToyChain(steps, 4, [0.7] * steps, seed=4, act="tanh")
    a = solve_chain(whole.step, whole.z0, steps, solver=SOLVERS[solver](), tol=1e-10, window=12)
    b = solve_chain(
        chunked.step, chunked.z0, steps, solver=SOLVERS[solver](), tol=1e-10, window=12, max_batch=max_batch
    )
    assert chunked.largest_call <= max_batch < whole.largest_call
    assert a.sweeps == b.sweeps and a.total_evaluations == b.total_evaluations
    torch.testing.assert_close(b.zs, a.zs, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        solve_chain(_ok, torch.ones(2), 4, max_batch=0)


#: Every run checks every seventh chain of the grid (36 chains, every value of every factor, and each
#: activation, form and window together); CI checks all 252 (``.ci/run`` exports ``CI=true``).


@pytest.mark.parametrize("base", ["form", "fitted"])
def test_chain_secant_never_takes_more_sweeps_than_picard_on_the_test_grid(base):
    assert len(GRID) == 252
    cases = GRID if EVERYTHING else GRID[::7]
    fewer = 0
    for case in cases:
        picard = grid_sweeps(case, None).sweeps
        secant = grid_sweeps(case, ChainSecant(base=base)).sweeps
        assert secant <= picard, (case, picard, secant)
        fewer += secant < picard
    assert fewer >= len(cases) // 4  # it couples the steps: not Picard under another name


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_chain_secant_is_newton_on_a_linear_chain_once_each_step_has_dim_pairs(dim, form):
    # x_{k+1} = A_k x_k + b_k with |A_k| = 1 (no contraction: Picard on F needs one sweep per step).
    # Each evaluation gives one secant pair per step; once the pairs span R^dim the model is A_k, the
    # proposal is the Newton step on a linear system (exact), and the next sweep confirms it. The
    # first pair needs two evaluations, the safeguard may forget one pair: dim + 4 sweeps at most.
    steps = 60
    for seed in range(5):
        chain = ToyChain(steps, dim, [1.0] * steps, seed, "affine")
        out = solve_chain(chain.step, chain.z0, steps, solver=ChainSecant(m=dim), tol=1e-9, form=form)
        check_against_rollout(chain, out, 1e-9)
        assert out.sweeps <= dim + 4, (seed, out.sweeps)


def test_chain_secant_takes_fewer_sweeps_than_cumulative_picard_on_an_integrator():
    steps = 60
    step, z0 = euler_chain(steps, horizon=2.0)
    picard = solve_chain(step, z0, steps, tol=1e-8, form="cumulative")
    secant = solve_chain(step, z0, steps, solver=ChainSecant(), tol=1e-8, form="cumulative")
    assert picard.all_converged and secant.all_converged
    assert secant.sweeps < picard.sweeps
    torch.testing.assert_close(secant.zs, picard.zs, atol=2e-8 * steps, rtol=0)


def test_chain_secant_history_follows_its_steps_when_the_window_slides():
    # A window that slides at every sweep: the rule's rows are re-indexed each time. The trajectory must
    # not depend on the window (both are within the bound of the rollout) and the history must help.
    chain = ToyChain(40, 2, [1.0] * 40, 3, "affine")
    whole = solve_chain(chain.step, chain.z0, 40, solver=ChainSecant(m=2), tol=1e-9)
    sliding = solve_chain(chain.step, chain.z0, 40, solver=ChainSecant(m=2), tol=1e-9, window=10)
    check_against_rollout(chain, whole, 1e-9)
    check_against_rollout(chain, sliding, 1e-9)
    picard = solve_chain(chain.step, chain.z0, 40, tol=1e-9, window=10)
    assert sliding.sweeps < picard.sweeps


def test_solve_chain_refuses_a_z0_that_requires_grad():
    z0 = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"z0 requires grad.*z0.detach\(\)"):
        solve_chain(lambda k, x: 0.5 * x + 1.0, z0, 5)
    with torch.no_grad():
        assert solve_chain(lambda k, x: 0.5 * x + 1.0, z0, 5).all_converged
    assert solve_chain(lambda k, x: 0.5 * x + 1.0, z0.detach(), 5).all_converged


def test_solve_chain_takes_a_pytree_and_equals_the_flat_chain():
    z0 = {"a": torch.zeros(3), "b": (torch.ones(2, 2),)}
    seen = []

    def step_tree(k, x):
        seen.append(pytree.tree_map(lambda t: tuple(t.shape), x))
        return {"a": 0.5 * x["a"] + 1 + 0.1 * x["b"][0].sum((1, 2))[:, None], "b": (0.5 * x["b"][0],)}

    def step_flat(k, x):
        a, b = x[:, :3], x[:, 3:].reshape(-1, 2, 2)
        return torch.cat([0.5 * a + 1 + 0.1 * b.sum((1, 2))[:, None], (0.5 * b).reshape(-1, 4)], dim=1)

    tree = solve_chain(step_tree, z0, 6, solver=Anderson(m=2))
    flat = solve_chain(step_flat, torch.cat([torch.zeros(3), torch.ones(4)]), 6, solver=Anderson(m=2))
    assert seen[0] == {"a": (6, 3), "b": ((6, 2, 2),)}
    assert tree.zs["a"].shape == (7, 3) and tree.zs["b"][0].shape == (7, 2, 2)
    assert torch.equal(tree.zs["a"], flat.zs[:, :3])
    assert torch.equal(tree.zs["b"][0], flat.zs[:, 3:].reshape(7, 2, 2))
    assert tree.sweeps == flat.sweeps


def test_solve_chain_names_the_leaf_a_step_got_wrong():
    with pytest.raises(ValueError, match=r"step\(k, z\) returned shape \(2, 1\) at z\['b'\]"):
        z0 = {"a": torch.zeros(3), "b": torch.zeros(2)}
        solve_chain(lambda k, x: {"a": x["a"], "b": x["b"][:, :1]}, z0, 2)


# ------------------------------------------------------------------------------------------ a fixed budget


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("solver", ["picard", "chain_secant", "anderson"])
def test_tol_none_makes_exactly_max_iter_sweeps_with_no_host_reads_and_an_exact_prefix(solver, window):
    chain = ToyChain(30, 3, [0.5] * 30, seed=4, act="tanh")  # contracting: a tolerance would stop early

    def step(k: Tensor, z: Tensor) -> Tensor:  # the bare step: no counting, no host reads
        return torch.tanh(torch.einsum("kij,kj->ki", chain.A[k], z) + chain.b[k])

    with SyncCounter() as syncs:
        out = solve_chain(step, chain.z0, 30, solver=SOLVERS[solver](), tol=None, max_iter=20, window=window)
    assert syncs.count == 0, syncs.by_op
    assert out.sweeps == 20 and out.converged.tolist() == [True] * 20 + [False] * 10
    # The steps made final are exact at their images: the sequential rollout, with residual 0.
    rollout = chain.rollout()
    torch.testing.assert_close(out.zs[:21], rollout[:21], atol=ROUNDING * 20, rtol=0)
    assert torch.equal(out.residual[:20], torch.zeros(20, dtype=torch.float64))
    whole = solve_chain(step, chain.z0, 30, solver=SOLVERS[solver](), tol=None, window=window)
    assert whole.sweeps == 30 and whole.all_converged  # the default budget, num_steps, finishes
    torch.testing.assert_close(whole.zs, rollout, atol=ROUNDING * 30, rtol=0)


def test_tol_none_reports_a_non_finite_step_and_the_steps_after_it_as_not_converged():
    def step(k: Tensor, z: Tensor) -> Tensor:
        # Step 3 is not finite; the steps after it are finite whatever their input, yet not final.
        return torch.where((k == 3)[:, None], torch.nan, torch.where((k > 3)[:, None], 1.0, 0.5 * z + 1.0))

    out = solve_chain(step, torch.zeros(2), 8, tol=None)
    assert out.sweeps == 8  # a fixed budget reads nothing, so it does not stop early
    assert out.converged.tolist() == [True] * 3 + [False] * 5
    assert bool(out.nonfinite[3])


def test_the_default_tolerance_is_the_working_dtypes():
    def step(k: Tensor, z: Tensor) -> Tensor:
        return 0.9 * z + 1.0

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-5)):
        auto = solve_chain(step, torch.zeros(3, dtype=dtype), 40, window=5)
        explicit = solve_chain(step, torch.zeros(3, dtype=dtype), 40, window=5, tol=tol)
        assert auto.sweeps == explicit.sweeps and torch.equal(auto.zs, explicit.zs), dtype


# ------------------------------------------------------------------------------ names and the old names


def test_the_names_before_0_3_still_work_and_warn():
    z0 = torch.zeros(3)
    with pytest.warns(DeprecationWarning, match=r"solve_chain\(x0=\.\.\.\) is deprecated"):
        old = solve_chain(lambda k, z: 0.5 * z + 1.0, x0=z0, num_steps=6)
    new = solve_chain(lambda k, z: 0.5 * z + 1.0, z0=z0, num_steps=6)
    assert torch.equal(old.zs, new.zs)
    with pytest.warns(DeprecationWarning, match="ChainResult.zs"):
        assert old.xs is old.zs
    with pytest.warns(DeprecationWarning, match="total_evaluations"):
        assert old.evaluations == old.total_evaluations == int(old.evaluations_per_step.sum())
    with pytest.raises(TypeError, match="x0, its deprecated name"):
        solve_chain(lambda k, z: z, z0=z0, x0=z0, num_steps=2)


def test_every_error_names_the_callers_own_argument():
    def step(k: Tensor, z: Tensor) -> Tensor:
        return z

    with pytest.raises(TypeError, match=r"z0 must have a floating-point dtype, got torch\.int64"):
        solve_chain(step, torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(TypeError, match=r"z0\['b'\] is torch.float64"):
        solve_chain(step, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}, 3)
    with pytest.raises(ValueError, match=r"step\(k, z\) must return a state with the structure of z0"):
        solve_chain(lambda k, z: (z["a"],), {"a": torch.zeros(2)}, 3)
    with pytest.raises(ValueError, match=r"step\(k, z\) returned torch.float64 on cpu at z\['a'\]"):
        solve_chain(lambda k, z: {"a": z["a"].double()}, {"a": torch.zeros(2)}, 3)
    with pytest.raises(ValueError, match=r"step\(k, z\) must return the next states stacked like z"):
        solve_chain(lambda k, z: z[:1], torch.zeros(2), 3)


# -------------------------------------------------------------------------- per-step tolerances as arrays


def test_per_step_tolerances_may_be_any_array_like():
    chain = ToyChain(12, 3, [0.8] * 12, seed=6, act="tanh")
    tols = [1e-4] * 6 + [1e-9] * 6
    reference = solve_chain(chain.step, chain.z0, 12, tol=torch.tensor(tols), window=5)
    for form in (tols, tuple(tols), np.array(tols), torch.tensor(tols)):
        out = solve_chain(chain.step, chain.z0, 12, tol=form, window=5)
        assert out.sweeps == reference.sweeps and torch.equal(out.zs, reference.zs), type(form)
    assert solve_chain(chain.step, chain.z0, 12, tol=np.float64(1e-6)).all_converged


def test_one_bad_tolerance_among_many_is_named_by_its_step_in_a_short_message():
    tols = np.full(1000, 1e-6)
    tols[417] = np.nan
    with pytest.raises(ValueError, match=r"tol\[417\] is nan \(1 of 1000 values are not\)") as caught:
        solve_chain(_ok, torch.ones(2), 1000, tol=tols)
    assert len(str(caught.value)) < 200
    with pytest.raises(TypeError, match="tol must be a number >= 0, one per step"):
        solve_chain(_ok, torch.ones(2), 4, tol={"a": 1e-3})


def test_max_batch_bounds_each_call_for_a_structured_state_too():
    calls = []

    def step(k: Tensor, z: dict) -> dict:
        calls.append(k.shape[0])
        return {"a": 0.5 * z["a"] + 1.0, "b": 0.9 * z["b"]}

    z0 = {"a": torch.zeros(2), "b": torch.ones(3, 2)}
    whole = solve_chain(step, z0, 20, tol=1e-9)
    calls.clear()
    chunked = solve_chain(step, z0, 20, tol=1e-9, max_batch=3)
    assert max(calls) <= 3 < 20
    assert torch.equal(chunked.zs["a"], whole.zs["a"]) and torch.equal(chunked.zs["b"], whole.zs["b"])


def test_a_first_guess_changes_the_sweeps_not_the_fixed_point():
    # Any guess (here noise around nothing in particular) ends at the rollout, within the residuals'
    # bound, in at most num_steps sweeps; the exact rollout as the guess is confirmed in one sweep.
    for seed, window, form, solver in itertools.product((0, 1), (None, 4), FORMS, (None, ChainSecant())):
        chain = ToyChain(15, 3, [1.0] * 15, seed, "tanh")
        guess = torch.randn(16, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        out = solve_chain(
            chain.step, chain.z0, 15, solver=solver, tol=1e-9, window=window, form=form, init=guess
        )
        check_against_rollout(chain, out, 1e-9)
        assert out.sweeps <= 15
    chain = ToyChain(15, 3, [1.0] * 15, 0, "tanh")
    exact = solve_chain(chain.step, chain.z0, 15, tol=1e-9, init=chain.rollout())
    assert exact.sweeps == 1 and exact.total_evaluations == 15 and torch.equal(exact.zs, chain.rollout())


def test_entering_steps_start_from_their_guess_shifted_by_the_change_of_the_step_before():
    # x_{k+1} = x_k + b_k, guessed as the rollout plus an offset c on every step: the first sweep finds
    # step 0 off by c and the cumulative form corrects the window at once. A step entering the window
    # starts at its guess shifted by the change its predecessor saw (-c): exact, so every later window is
    # final in one sweep. Started from its predecessor's estimate instead, it would cost two per window.
    steps, window = 20, 5
    b = torch.randn(steps, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.zeros(2, dtype=torch.float64)
    rollout = torch.cat([x0[None], torch.cumsum(b, 0)])
    guess = rollout + torch.tensor([0.5, -1.0], dtype=torch.float64)
    out = solve_chain(
        lambda k, x: x + b[k], x0, steps, tol=1e-9, window=window, form="cumulative", init=guess
    )
    assert out.all_converged
    torch.testing.assert_close(out.zs, rollout, atol=ROUNDING, rtol=0)
    assert out.sweeps == 1 + -(-(steps - 1) // window)


def test_a_first_guess_may_be_a_callable_or_a_pytree():
    chain = ToyChain(10, 4, [0.8] * 10, 2, "tanh")
    rollout = chain.rollout()
    seen = []

    def guess(z0: Tensor) -> Tensor:
        seen.append(z0)
        return rollout

    out = solve_chain(chain.step, chain.z0, 10, tol=1e-9, init=guess)
    assert out.sweeps == 1 and torch.equal(seen[0], chain.z0)
    z0 = {"a": chain.z0[:1], "b": chain.z0[1:]}

    def step(k: Tensor, x: dict[str, Tensor]) -> dict[str, Tensor]:
        out = chain.step(k, torch.cat([x["a"], x["b"]], dim=1))
        return {"a": out[:, :1], "b": out[:, 1:]}

    tree = solve_chain(step, z0, 10, tol=1e-9, init={"a": rollout[:, :1], "b": rollout[:, 1:]})
    assert tree.sweeps == 1
    torch.testing.assert_close(torch.cat([tree.zs["a"], tree.zs["b"]], dim=1), rollout, atol=ROUNDING, rtol=0)
    with pytest.raises(ValueError, match=r"init returned shape \(11, 2\) at init\['b'\]"):
        solve_chain(step, z0, 10, init={"a": rollout[:, :1], "b": rollout[:, 2:]})


@pytest.mark.parametrize(
    ("init", "error", "match"),
    [
        (torch.zeros(5, 2), ValueError, r"init must have the trajectory's shape \(4, 2\)"),
        (torch.zeros(4, 2, dtype=torch.float64), ValueError, "dtype torch.float32"),
        (
            torch.tensor([[0.0, 0.0], [1.0, float("nan")], [0.0, 0.0], [0.0, 0.0]]),
            ValueError,
            "init must be finite",
        ),
        ([[0.0, 0.0]] * 4, TypeError, "init must be a Tensor"),
        (lambda x0: "no", TypeError, "got str"),
    ],
)
def test_a_bad_first_guess_is_refused_by_name(init, error, match):
    with pytest.raises(error, match=match):
        solve_chain(_ok, torch.zeros(2), 3, init=init)


def samples_chain(gain: float, seed: int = 0) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """50 steps of ``x_{k+1} = tanh(A_k x_k + b_k)`` on 4 samples of 16 entries, ``x0`` of shape (4, 16)."""
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(50, 16, 16, generator=generator, dtype=torch.float64)
    A = gain * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
    b = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    x0 = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    return lambda k, x: torch.tanh(torch.einsum("kij,ksj->ksi", A[k], x) + b[k][:, None]), x0


def test_chain_secant_refuses_blocks_that_cut_a_sample_and_takes_no_more_sweeps_than_picard_with_the_others():
    # Blocks of one entry (blocks=64 on 4 samples of 16) modelled each entry of a dense Jacobian on its own
    # and took all 50 sweeps where Picard takes about 20: such a split is refused, not run into.
    step, x0 = samples_chain(0.9)
    for blocks in (64, 8, 3):
        with pytest.raises(
            ValueError, match=rf"ChainSecant\(blocks={blocks}\) must divide z0's leading dimension"
        ):
            solve_chain(step, x0, 50, solver=ChainSecant(blocks=blocks))
    with pytest.raises(ValueError, match=r"ChainSecant\(blocks=2\) needs z0 as one tensor"):
        halve = lambda k, x: {name: 0.5 * leaf + 1.0 for name, leaf in x.items()}  # noqa: E731
        solve_chain(halve, {"a": x0, "b": x0}, 5, solver=ChainSecant(blocks=2))
    for gain, form in itertools.product((0.5, 0.9, 1.1), FORMS):
        step, x0 = samples_chain(gain)
        picard = solve_chain(step, x0, 50, tol=1e-8, form=form).sweeps
        for blocks in (1, 2, 4):
            assert (
                solve_chain(step, x0, 50, solver=ChainSecant(blocks=blocks), tol=1e-8, form=form).sweeps
                <= picard
            )


# --- error_tol: the proposal returned once its estimated error is small ---------------------------------


def scalar_chain(a: float, dim: int = 3) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
    """``z_{k+1} = a z_k + 1``: Picard on F from ``z_k = z_0`` has error ``a^s (1 - a^{k-s}) D`` at step
    ``k >= s`` after ``s`` sweeps (``D = z_0 - 1 / (1 - a)``), so each sweep moves every step by
    ``a^s (1 - a) |D|``, the observed rate is ``a`` and ``rho c_s / (1 - rho) = a^{s+1} |D|`` bounds the
    next proposal's error: an estimate that is a bound here. Returns the step and ``z0``."""
    z0 = torch.linspace(-1.0, 2.0, dim, dtype=torch.float64)

    def step(k: Tensor, z: Tensor) -> Tensor:
        return a * z + 1.0

    return step, z0


def exact_trajectory(a: float, z0: Tensor, steps: int) -> Tensor:
    zs = [z0]
    for _ in range(steps):
        zs.append(a * zs[-1] + 1.0)
    return torch.stack(zs)


@pytest.mark.parametrize("a", [0.2, 0.5, 0.7])
@pytest.mark.parametrize("error_tol", [1e-4, 1e-8])
def test_error_tol_stops_early_and_returns_the_proposal_within_it(a, error_tol):
    steps = 80
    step, z0 = scalar_chain(a)
    with SyncCounter() as syncs:
        out = solve_chain(step, z0, steps, tol=0.0, error_tol=error_tol)
    exact = exact_trajectory(a, z0, steps)
    error = float((out.zs - exact).abs().max())
    # tol=0 alone finalises one step per sweep (80 sweeps); the estimate stops once a^{s+1}|D| <= error_tol.
    assert out.sweeps < steps and out.all_converged
    assert error <= error_tol, (error, out.error_estimate)
    assert out.error_estimate is not None and error <= out.error_estimate <= error_tol
    # The steps the estimate made final were never evaluated at their returned values.
    final_by_residual = int(torch.isfinite(out.residual).sum())
    assert final_by_residual < steps and torch.isinf(out.residual[final_by_residual:]).all()
    assert syncs.count <= 2 * out.sweeps, syncs.by_op
    # The last estimates evaluated (one sweep earlier) are not within error_tol: the proposal is returned.
    again = solve_chain(step, z0, steps, tol=0.0, max_iter=out.sweeps)
    assert float((again.zs - exact).abs().max()) > error_tol


def test_error_tol_waits_for_every_step_to_be_in_flight_and_to_have_moved_twice():
    steps, a = 30, 0.5
    step, z0 = scalar_chain(a)
    calls: list[int] = []

    def counted(k: Tensor, z: Tensor) -> Tensor:
        calls.append(int(k[-1]))
        return step(k, z)

    out = solve_chain(counted, z0, steps, tol=0.0, window=6, error_tol=1e-3)
    # The window slides one step per sweep (tol=0): the last step is first in flight at sweep 25, and
    # the estimate needs two of its moves; before sweep 25 it is not even computed (no host read).
    assert calls.index(steps - 1) == steps - 6
    assert out.sweeps >= steps - 6 + 2
    with SyncCounter() as syncs:  # the bare step: the host reads are the chain's
        again = solve_chain(step, z0, steps, tol=0.0, window=6, error_tol=1e-3)
    assert again.sweeps == out.sweeps
    assert syncs.count <= out.sweeps + (out.sweeps - (steps - 6)), syncs.by_op
    assert float((out.zs - exact_trajectory(a, z0, steps)).abs().max()) <= 1e-3
    off = solve_chain(step, z0, steps, tol=0.0, window=6)
    assert off.error_estimate is None and out.error_estimate is not None


def test_error_tol_never_stops_a_chain_that_does_not_contract():
    # z_{k+1} = 2 z_k + 1: every sweep moves the last steps more than the one before (rate > 1).
    out = solve_chain(lambda k, z: 2.0 * z + 1.0, torch.zeros(1, dtype=torch.float64), 12, error_tol=1e9)
    assert out.sweeps == 12 and out.all_converged
    assert torch.isfinite(out.residual).all()


@pytest.mark.parametrize("form", FORMS)
def test_error_tol_with_chain_secant_on_an_integrator_stops_sooner_near_it(form):
    # ChainSecant's rate is not a contraction's, so the estimate is no bound here (the scalar chain above
    # is where it is one): measured 0.3-1.0 times error_tol on torch 2.4 and 2.13. On the step form the
    # rule first diverges (to 1e12) and falls back: a stop taken right after that fall, the rate's memory
    # ignored, ended 5e5 times error_tol away. Ten times error_tol separates the two by far.
    steps, error_tol = 60, 1e-6
    step, z0 = euler_chain(steps, horizon=1.0)
    exact = solve_chain(step, z0, steps, tol=0.0, form="cumulative").zs
    full = solve_chain(step, z0, steps, solver=ChainSecant(), tol=1e-10, form=form)
    early = solve_chain(step, z0, steps, solver=ChainSecant(), tol=1e-10, form=form, error_tol=error_tol)
    assert early.sweeps < full.sweeps
    assert early.error_estimate is not None and early.error_estimate <= error_tol
    assert float((early.zs - exact).abs().max()) <= 10 * error_tol


def reference_error_estimate(
    step: Callable[[Tensor, Tensor], Tensor], z0: Tensor, steps: int, error_tol: float
):
    """The sweep and estimate at which Picard on F with ``tol=0`` (one step final per sweep, every step in
    flight) stops for ``error_tol``, from the definition on the plain Picard iterates ``Z^{s+1}_{k+1} =
    s(k, Z^s_k)`` (``Z^1`` all ``z0``): after sweep ``s`` the steps ``s .. N-1`` are in flight and step
    ``k`` moves by ``|Z^{s+1}_{k+1} - Z^s_{k+1}|``; ``rho_s = max(c_s / c_{s-1}, 0.5 min(rho_{s-1}, 1))``
    over the same steps, ``rho = 1`` before any is known."""
    z = z0.expand(steps + 1, *z0.shape).clone()
    last: dict[int, float] = {}
    rate = 1.0
    for s in range(1, steps):
        images = torch.cat([z0[None], step(torch.arange(steps), z[:-1])])
        moves = {k: float((images[k + 1] - z[k + 1]).abs().max()) for k in range(s, steps)}
        z = images
        before = max(last.get(k, math.inf) for k in moves)
        last.update(moves)
        change = max(moves.values())
        new_rate = max(change / before, 0.5 * min(rate, 1.0))
        rate = new_rate if math.isfinite(before) else 1.0
        if math.isfinite(before) and new_rate < 1 and new_rate / (1 - new_rate) * change <= error_tol:
            return s, new_rate / (1 - new_rate) * change
    return None


@pytest.mark.parametrize("gains", [[0.9] * 4 + [0.1] * 8, [0.1] * 12], ids=["falling", "flat"])
def test_error_tol_estimate_is_the_rate_of_the_same_steps_with_memory_from_no_contraction(gains):
    # Falling gains: the steps near the front move most, so the rate must compare each sweep's moves with
    # the same steps' moves of the sweep before (not with a step just made final). Flat gains of 0.1: the
    # first rate observed, 0.1, is held at half of "no contraction" (1), not at half of an earlier guess.
    rates = torch.tensor(gains, dtype=torch.float64)

    def step(k: Tensor, z: Tensor) -> Tensor:
        return rates[k][:, None] * z + 1.0

    z0 = torch.linspace(-1.0, 2.0, 3, dtype=torch.float64)
    for error_tol in (1e-1, 1e-3, 1e-6):
        expected = reference_error_estimate(step, z0, len(gains), error_tol)
        assert expected is not None
        out = solve_chain(step, z0, len(gains), tol=0.0, error_tol=error_tol)
        assert (out.sweeps, out.error_estimate) == pytest.approx(expected, rel=1e-12), error_tol


class Stalls(UpdateRule):
    """Picard at the first sweep, then the estimates proposed unchanged: its proposals stop moving while
    its residuals (and its distance to the trajectory) stay where they are."""

    def init(self, z: Tensor, fz: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.long)

    def step(self, state: Tensor, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        return (fz if int(state) == 0 else z), state + 1


def test_error_tol_is_not_fooled_by_a_rule_whose_proposals_stop_moving():
    # The sweep moves each estimate to its image or to the proposal, whichever is further: a proposal
    # that stays put while the residual does not is not convergence.
    steps, a = 20, 0.5
    step, z0 = scalar_chain(a)
    out = solve_chain(step, z0, steps, solver=Stalls(), tol=0.0, error_tol=1e-3)
    assert float((out.zs - exact_trajectory(a, z0, steps)).abs().max()) <= 1e-3
