"""The rule protocol of solve_chain: what a rule declares and how each kind reaches the chain's loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from implicitdiff import Anderson, Broyden, ChainRuleWarning, ChainSecant, Picard, solve_chain
from implicitdiff.solvers import UpdateRule


def _ok(k: Tensor, z: Tensor) -> Tensor:
    return 0.5 * z


class StepTagRule(UpdateRule):
    """Picard whose per-sample state is the index of the step the sample is: checks the rows follow the steps.

    The chain's last coordinate is ``k + 1`` after step ``k`` whatever its input, so ``fz[:, -1]`` tags
    each row with its step; a state row that drifted to another step would disagree with it.
    """

    def __init__(self) -> None:
        self.checked = 0
        self.restarted = 0

    def init(self, z: Tensor, fz: Tensor) -> Tensor:
        return fz[:, -1].clone()

    def step(self, state: Tensor, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        known = state >= 0
        assert torch.equal(state[known], fz[known, -1])
        self.checked += int(known.sum())
        return torch.lerp(z, fz, 0.8), fz[:, -1].clone()

    def restart(self, state: Tensor, mask: Tensor) -> Tensor:
        self.restarted += int(mask.sum())
        return torch.where(mask, -1.0, state)


@pytest.mark.parametrize("window", [None, 1, 3, 7])
def test_a_users_rule_keeps_its_history_aligned_with_the_steps_as_the_window_slides(window):
    steps, dim = 15, 3
    A = 0.5 * torch.eye(dim - 1, dtype=torch.float64)

    def step(k: Tensor, x: Tensor) -> Tensor:
        body = torch.tanh(x[:, :-1] @ A.T + 0.1 * k[:, None])
        return torch.cat([body, (k + 1).to(x.dtype)[:, None]], dim=1)

    rule = StepTagRule()
    z0 = torch.zeros(dim, dtype=torch.float64)
    out = solve_chain(step, z0, steps, solver=rule, tol=1e-10, window=window)
    assert out.all_converged
    assert torch.equal(out.zs[:, -1], torch.arange(steps + 1, dtype=torch.float64))
    assert rule.checked > 0
    if window in (3, 7):
        assert rule.restarted > 0  # steps entered the window while others stayed in flight


def test_a_rule_without_restart_is_reinitialised_when_steps_enter():
    class Counting:
        inits = 0

        def init(self, z: Tensor, fz: Tensor) -> None:
            Counting.inits += 1

        def step(self, state: None, z: Tensor, fz: Tensor, residual: Tensor | None) -> tuple[Tensor, None]:
            return fz, state

    out = solve_chain(lambda k, x: 0.5 * x + 1.0, torch.zeros(2), 30, solver=Counting(), window=4)
    assert out.all_converged
    assert Counting.inits >= 2


def test_rules_with_trial_steps_are_refused():
    class Trial(UpdateRule):
        def step(self, state, z, fz, residual):
            return fz, state

        def accept(self, state, residual, trial_residual):
            return trial_residual <= residual, state

    with pytest.raises(TypeError, match="accept"):
        solve_chain(_ok, torch.ones(2), 3, solver=Trial())


def test_per_sample_rules_warn_that_a_chain_is_not_a_batch_and_the_chain_rules_do_not():
    for rule in (Anderson(), Broyden()):
        with pytest.warns(ChainRuleWarning, match="ChainSecant"):
            solve_chain(_ok, torch.ones(2), 3, solver=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainRuleWarning)
        for rule in (None, Picard(), ChainSecant()):
            solve_chain(_ok, torch.ones(2), 3, solver=rule)


def test_rules_declare_what_they_are():
    assert ChainSecant.reads_chain and ChainSecant.can_restart
    assert Anderson.per_sample_history and Broyden.per_sample_history
    assert not Picard.per_sample_history and not UpdateRule.per_sample_history


class PicardOnSteps:
    """A rule of a user's own written for chains (``reads_chain``): Picard on the step map, by hand."""

    reads_chain = True
    can_restart = False

    def __init__(self) -> None:
        self.sweeps_seen: list[int] = []

    def start(self, sweep):
        return None

    def propose(self, state, sweep):
        self.sweeps_seen.append(sweep.final)
        assert sweep.inputs.shape == sweep.images.shape == sweep.estimates.shape
        return sweep.images, state

    def restart(self, state, mask):
        return state


def test_a_rule_that_reads_the_chain_is_driven_through_the_same_protocol():
    A = 0.6 * torch.eye(3, dtype=torch.float64)

    def step(k: Tensor, z: Tensor) -> Tensor:
        return torch.tanh(z @ A.T + 0.1 * k[:, None].to(z.dtype))

    z0 = torch.ones(3, dtype=torch.float64)
    mine = PicardOnSteps()
    ours = solve_chain(step, z0, 25, tol=1e-11, window=6)
    theirs = solve_chain(step, z0, 25, solver=mine, tol=1e-11, window=6)
    assert theirs.sweeps == ours.sweeps and torch.equal(theirs.zs, ours.zs)
    assert len(mine.sweeps_seen) == ours.sweeps - 1 and min(mine.sweeps_seen) >= 1


class AffineNewton:
    """A user's rule with a model of each step, :math:`s(k, z) = a_k z + b_k(z)`: it reads which steps are in
    flight (``sweep.steps``) to carry each change down the window through its step's own ``a_k``."""

    reads_chain = True
    can_restart = False

    def __init__(self, a: Tensor) -> None:
        self.a = a
        self.steps_seen: list[list[int]] = []

    def start(self, sweep):
        return None

    def propose(self, state, sweep):
        assert sweep.steps is not None
        self.steps_seen.append(sweep.steps.tolist())
        out, d = sweep.images.clone(), sweep.change
        for j in range(sweep.final, out.shape[0]):
            out[j] = sweep.images[j] + self.a[sweep.steps[j]] * d
            d = out[j] - sweep.estimates[j]
        return out, state

    def restart(self, state, mask):
        return state


@pytest.mark.parametrize("window", [None, 4])
def test_a_sweep_names_the_steps_in_flight_as_step_was_called_with_them(window):
    # z_{k+1} = a_k z_k + 1 with |a_k| > 1 for some steps: no contraction, and a rule that uses the wrong
    # step's a_k after the window slides leaves a residual it must sweep away. The exact per-step model is
    # Newton's method: every proposal of a step whose predecessor's change is known is its sequential value.
    num_steps = 12
    a = 0.5 + 0.2 * torch.arange(num_steps, dtype=torch.float64)
    called: list[list[int]] = []

    def step(k: Tensor, z: Tensor) -> Tensor:
        called.append(k.tolist())
        return a[k][:, None] * z + 1.0

    z0 = torch.zeros(1, dtype=torch.float64)
    rule = AffineNewton(a)
    out = solve_chain(step, z0, num_steps, solver=rule, tol=1e-12, window=window, form="step")
    # Each proposal follows the sweep that evaluated the same steps (the last sweep proposes nothing).
    assert rule.steps_seen == called[: len(rule.steps_seen)] and len(called) == out.sweeps
    rollout = [z0]
    for k in range(num_steps):
        rollout.append(step(torch.tensor([k]), rollout[-1][None])[0])
    torch.testing.assert_close(out.zs, torch.stack(rollout), rtol=1e-13, atol=0)
    # Newton on an affine chain: one sweep to evaluate a window's fresh steps, one to confirm them.
    fresh_windows = -(-num_steps // (window or num_steps))
    assert out.all_converged and out.sweeps <= 2 * fresh_windows
