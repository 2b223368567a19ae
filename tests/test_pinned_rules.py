"""Behaviours that planted bugs went through unseen, each pinned against a reference from its definition.

* Anderson after a restart: the restarted sample's history holds no old difference, and keeps the last
  residual and mixing point (the next difference is the secant from the point the sample left).
* Broyden's safeguard skips an update exactly when :math:`|\\cos(w, y)| \\le \\varepsilon`, and a restarted
  sample skips one pair (the jump to its best iterate), then takes updates again.
* Structured states: ``solve_chain`` honours ``max_batch`` for a pytree ``x0``; a leaf returned with the
  wrong leading dimension is refused, naming its path.
* ``n_states``: the intermediate states are evenly spaced over the solve's evaluations.
* ``LaunchCounter``: an allocation is not a launch.

The rules are driven by hand through their public ``init``/``step``/``restart`` (what the driver calls),
and compared with dense, textbook versions below, in float64. The two differ only by rounding: sums in
another order and, for Broyden, the product form of the inverse Jacobian instead of a dense matrix. Each
rounded operation errs by at most ``EPS`` relative to its operands (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1); a linear solve multiplies that by the condition
number of its matrix, which the references measure, and the few steps taken add their errors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from implicitdiff import Anderson, Broyden, Picard, fixed_point, solve_chain
from implicitdiff.diagnostics import LaunchCounter

EPS = torch.finfo(torch.float64).eps
DTYPE = torch.float64


def contraction(n: int, batch: int, lip: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-sample matrix of spectral norm ``lip`` and an offset: the map ``tanh(A z + b)``."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=gen, dtype=DTYPE)
    A *= lip / torch.linalg.matrix_norm(A, 2)[:, None, None]
    return A, torch.randn(batch, n, generator=gen, dtype=DTYPE)


def tanh_map(A: torch.Tensor, b: torch.Tensor):
    return lambda z: torch.tanh(torch.einsum("bij,bj->bi", A, z) + b)


def drive(rule, refs, g, z: torch.Tensor, steps: int, restarts: dict, tolerance) -> None:
    """Step ``rule`` by hand as the driver does, each step against the per-sample ``refs``.

    ``restarts[k] = (samples, back)``: after step ``k`` those samples restart and go back to the point
    (and image) of step ``back``, as the driver sends a restarted sample to its best iterate.
    ``tolerance(refs, expected)`` bounds the difference of a step.
    """
    fz = g(z)
    state = rule.init(z, fz)
    seen = [(z, fz)]
    for k in range(steps):
        z_next, state = rule.step(state, z, fz, None)
        expected = torch.stack([ref.step(z[i], fz[i]) for i, ref in enumerate(refs)])
        tol, err = tolerance(refs, expected), float((z_next - expected).abs().max())
        assert err <= tol, (k, err, tol)
        z, fz = z_next, g(z_next)
        seen.append((z, fz))
        if k in restarts:
            samples, back = restarts[k]
            mask = torch.zeros(len(refs), dtype=torch.bool)
            mask[samples] = True
            state = rule.restart(state, mask)
            z, fz = (
                torch.where(mask[:, None], seen[back][0], z),
                torch.where(mask[:, None], seen[back][1], fz),
            )
            for i in samples:
                refs[i].restart()


# ----------------------------------------------------------------------------------------------- Anderson


class AndersonReference:
    r"""Anderson in the difference form of Walker & Ni (2011), one sample, the history as lists.

    With :math:`f = g(z) - z` and the mixing point :math:`\bar g = z + \beta f`, a step appends the
    differences :math:`\Delta f = f - f_{\text{prev}}` and
    :math:`\Delta \bar g = \bar g - \bar g_{\text{prev}}` (the last ``m`` kept), solves
    :math:`(\Delta F^\top \Delta F + (\lambda \max_i \|\Delta F_i\|^2 + \text{tiny}) I)\gamma
    = \Delta F^\top f` and moves to :math:`\bar g - \Delta \bar G \gamma`; the first step is the mixing
    step. A restart forgets the differences, not :math:`f_{\text{prev}}, \bar g_{\text{prev}}`.
    """

    def __init__(self, m: int, lam: float, beta: float) -> None:
        self.m, self.lam, self.beta = m, lam, beta
        self.dF: list[torch.Tensor] = []
        self.dG: list[torch.Tensor] = []
        self.f_prev: torch.Tensor | None = None
        self.g_prev: torch.Tensor | None = None
        self.bound = 0.0  # the scale of the last step's rounding error (see step)

    def step(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        f = fz - z
        g = z + self.beta * f
        if self.f_prev is None:
            self.f_prev, self.g_prev = f, g
            self.bound = float(g.abs().max())
            return g
        self.dF = [*self.dF, f - self.f_prev][-self.m :]
        self.dG = [*self.dG, g - self.g_prev][-self.m :]
        self.f_prev, self.g_prev = f, g
        DF, DG = torch.stack(self.dF, dim=1), torch.stack(self.dG, dim=1)
        gram = DF.T @ DF
        system = gram + (self.lam * gram.diagonal().max() + torch.finfo(DTYPE).tiny) * torch.eye(len(self.dF))
        gamma = torch.linalg.solve(system, DF.T @ f)
        # gamma errs by its system's condition number times the rounding of its data, relative to
        # |gamma|, and reaches the step through dG: |g| eps + cond |dG| |gamma| eps, up to the sums' lengths.
        cond = float(torch.linalg.cond(system))
        self.bound = float(g.abs().max()) + cond * float(torch.linalg.matrix_norm(DG, 2) * gamma.norm())
        return g - DG @ gamma

    def restart(self) -> None:
        self.dF, self.dG = [], []


@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_after_a_restart_keeps_the_last_residual_and_no_old_difference(beta: float) -> None:
    batch, n, m, steps = 3, 5, 3, 12
    A, b = contraction(n, batch, 0.9, seed=3)
    g = tanh_map(A, b)
    rule = Anderson(m=m, lam=1e-8, beta=beta)
    refs = [AndersonReference(m, 1e-8, beta) for _ in range(batch)]
    # At step 5 sample 1 restarts from its iterate of step 2, at step 9 (the ring has wrapped since)
    # samples 0 and 2 from theirs of step 7: the driver sends a restarted sample back to its best iterate.
    restarts = {5: ([1], 2), 9: ([0, 2], 7)}
    z0 = torch.zeros(batch, n, dtype=DTYPE)
    drive(rule, refs, g, z0, steps, restarts, lambda refs, _: 8 * (n + m) * EPS * max(r.bound for r in refs))


# ----------------------------------------------------------------------------------------------- Broyden


class BroydenReference:
    r"""Good Broyden on :math:`F(z) = g(z) - z` with a dense inverse Jacobian, one sample.

    :math:`H = -I` at the start and after a restart; each step first updates
    :math:`H \leftarrow H + (s - H y)\, s^\top H / (s^\top H y)` with the last step :math:`s` and
    :math:`y = F - F_{\text{prev}}`, unless :math:`|\cos(w, y)| \le \varepsilon` for
    :math:`w = -H^\top s` (then the update is skipped) or the pair spans a restart's jump; then it moves
    by :math:`-H F`. The first step is the Picard step.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.H = -torch.eye(n, dtype=DTYPE)
        self.s: torch.Tensor | None = None
        self.F_prev: torch.Tensor | None = None
        self.skip_next = False
        self.updates = 0
        self.smallest_cos = 1.0

    def step(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        F = fz - z
        if self.s is not None and self.F_prev is not None:
            y = F - self.F_prev
            w = -self.H.T @ self.s
            cos = float((w @ y).abs() / (w.norm() * y.norm()))
            if cos > EPS and not self.skip_next:
                self.H = self.H + torch.outer(self.s - self.H @ y, self.s @ self.H) / (self.s @ self.H @ y)
                self.updates += 1
                self.smallest_cos = min(self.smallest_cos, cos)
        self.skip_next = False
        self.s, self.F_prev = -self.H @ F, F
        return z + self.s

    def restart(self) -> None:
        self.H = -torch.eye(self.n, dtype=DTYPE)
        self.skip_next = True


@pytest.mark.parametrize(("scale", "taken"), [(2.0, True), (0.5, False)])
def test_broyden_skips_an_update_exactly_when_the_cosine_of_w_and_y_is_at_most_epsilon(scale, taken) -> None:
    # The second step's pair is w = s = F0 = (1, 0) and y = F1 - F0 = (c 2^60, 2^60), so |cos(w, y)| is
    # c to within 2^-120: every number below is exact in float64, and c = scale * eps sits on either side
    # of the threshold by a factor of 2.
    rule = Broyden(memory=5)
    big = 2.0**60
    y = torch.tensor([[scale * EPS * big, big]], dtype=DTYPE)
    z0, F0 = torch.zeros(1, 2, dtype=DTYPE), torch.tensor([[1.0, 0.0]], dtype=DTYPE)
    state = rule.init(z0, z0 + F0)
    z1, state = rule.step(state, z0, z0 + F0, None)  # the Picard step
    F1 = F0 + y
    z2, state = rule.step(state, z1, z1 + F1, None)
    ref = BroydenReference(2)
    ref.step(z0[0], (z0 + F0)[0])
    expected = ref.step(z1[0], (z1 + F1)[0])
    assert (ref.updates == 1) is taken
    if taken:
        torch.testing.assert_close(z2[0], expected, rtol=4 * EPS, atol=0.0)  # (-1/512, -2^51): exact
    else:
        assert torch.equal(z2, z1 + F1)  # a skipped update leaves H = -I: the Picard step, exactly


def test_a_restarted_broyden_sample_skips_the_jump_then_takes_updates_again() -> None:
    batch, n, steps = 2, 4, 10
    A, b = contraction(n, batch, 0.8, seed=5)
    g = tanh_map(A, b)
    rule = Broyden(memory=20)  # more than the steps: no restart from a full memory
    refs = [BroydenReference(n) for _ in range(batch)]

    def tolerance(refs: list[BroydenReference], expected: torch.Tensor) -> float:
        # Each update divides by w.y = |w||y| cos: its rounding grows like 1/cos, over the updates made.
        worst = max(ref.updates / ref.smallest_cos for ref in refs)
        return 16 * n * EPS * (1 + worst) * (1 + float(expected.abs().max()))

    # After step 3 sample 0 goes back to its point of step 1 and restarts.
    drive(rule, refs, g, torch.zeros(batch, n, dtype=DTYPE), steps, {3: ([0], 1)}, tolerance)
    # Sample 0 skipped the jump's pair, then updated at every later step: not stuck at Picard steps.
    assert refs[0].updates == steps - 2 and refs[1].updates == steps - 1


# --------------------------------------------------------------------------------------- structured states


def test_solve_chain_honours_max_batch_for_a_pytree_state() -> None:
    calls: list[tuple[int, int]] = []

    def step(k: torch.Tensor, x: dict) -> dict:
        calls.append((x["a"].shape[0], x["b"][0].shape[0]))
        return {"a": 0.5 * x["a"] + 1.0, "b": (0.25 * x["b"][0] - x["a"][:, :1],)}

    x0 = {"a": torch.zeros(3, dtype=DTYPE), "b": (torch.ones(2, dtype=DTYPE),)}
    whole = solve_chain(step, x0, 9, tol=1e-12)
    largest = max(rows for rows, _ in calls)
    calls.clear()
    chunked = solve_chain(step, x0, 9, tol=1e-12, max_batch=2)
    assert largest == 9 and calls and all(a == b <= 2 for a, b in calls)
    assert chunked.sweeps == whole.sweeps
    torch.testing.assert_close(chunked.zs["a"], whole.zs["a"], rtol=0, atol=0)
    torch.testing.assert_close(chunked.zs["b"][0], whole.zs["b"][0], rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 8])
def test_a_leaf_with_the_wrong_leading_dimension_is_refused_with_its_path(rows: int) -> None:
    # Each row of the leaf has the state's shape (3,) but there are 1 or 8 rows where 4 steps or samples
    # are in flight: packed without the check, 8 rows would be read as a wider state of 4 (and a later
    # error would name no leaf), 1 row would fail in a reshape.
    def wrong(leaf: torch.Tensor) -> torch.Tensor:
        return leaf[:1] if rows == 1 else leaf.repeat(2, 1)

    x0 = {"a": torch.zeros(2, dtype=DTYPE), "b": torch.zeros(3, dtype=DTYPE)}

    def step(k: torch.Tensor, x: dict) -> dict:
        return {"a": 0.5 * x["a"], "b": wrong(x["b"]) if x["b"].shape[0] == 4 else x["b"]}

    with pytest.raises(ValueError, match=rf"step\(k, z\) returned shape \({rows}, 3\) at z\['b'\]"):
        solve_chain(step, x0, 4)

    def f(z: dict, x: torch.Tensor) -> dict:
        return {"h": torch.tanh(z["h"] + x), "c": wrong(z["c"])}

    z0 = {"h": torch.zeros(4, 3, dtype=DTYPE), "c": torch.zeros(4, 3, dtype=DTYPE)}
    with pytest.raises(ValueError, match=rf"returned shape \({rows}, 3\) at z\['c'\]"):
        fixed_point(f, torch.randn(4, 3, dtype=DTYPE), z0)


# ------------------------------------------------------------------------------------------------ n_states


def spacing_stride(evaluations: int, keep: int) -> int:
    """The definition's thinning: every ``stride``-th evaluation is kept, ``stride`` the smallest power of
    two that keeps at most ``2 keep`` of them."""
    stride = 1
    while math.ceil(evaluations / stride) > 2 * keep:
        stride *= 2
    return stride


@pytest.mark.parametrize("n_states", [2, 3, 4, 6])
def test_intermediate_states_are_evenly_spaced_over_the_evaluations(n_states: int) -> None:
    # f(z, x) = z + x from z0 = 0 with x = 1: Picard's i-th evaluation (from 0) is at z = i, and a state
    # is f at one of them, so its value minus 1 says which evaluation it comes from.
    keep = n_states - 1
    for evaluations in range(1, 41):
        x = torch.ones(1, 1, dtype=DTYPE, requires_grad=True)
        out = fixed_point(
            lambda z, x: z + x, x, solver=Picard(), tol=None, max_iter=evaluations, n_states=n_states
        )
        assert out.states is not None
        picked = [round(float(state.detach()[0, 0])) - 1 for state in out.states[:-1]]
        stride = spacing_stride(evaluations, keep)
        kept = math.ceil(evaluations / stride)
        assert len(picked) == min(keep, kept), (evaluations, picked)
        assert picked[0] == 0 and all(p % stride == 0 for p in picked), (evaluations, picked)
        if len(picked) > 1:
            gaps = [b - a for a, b in itertools.pairwise(picked)]
            # Evenly spaced: from the first evaluation to within one stride of the last, the gaps
            # differing by at most one stride (the kept points are a stride apart).
            assert min(gaps) > 0 and max(gaps) - min(gaps) <= stride, (evaluations, picked)
            assert evaluations - 1 - picked[-1] < stride, (evaluations, picked)
        assert out.states[-1] is out.z


# ------------------------------------------------------------------------------------------ LaunchCounter


def test_allocations_are_not_launches() -> None:
    x = torch.randn(4, 3)
    with LaunchCounter() as launches:
        torch.empty(5)
        torch.empty_strided((3, 4), (1, 3))
        torch.empty_like(x)
        torch.empty_like(x.T)
        x.new_empty((2, 2))
        x.new_empty_strided((2, 2), (1, 2))
        torch.mul(x, 2.0)  # one computation among them
    assert launches.count == 1 and launches.by_op == {"mul": 1}, launches.by_op
