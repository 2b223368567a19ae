"""f stays one function for the length of a layer call: parametrizations computed once, variational
dropout masks held, a warning for dropout that draws a new mask at every evaluation; intermediate states."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import implicitdiff
from implicitdiff import IFT, JFB, DEQLayer, PhantomGradient, Picard, fixed_point, regularizers
from implicitdiff.nn import VariationalDropout

# ------------------------------------------------------------------------------- parametrizations (#24)


@pytest.fixture
def power_steps(monkeypatch):
    """How many times spectral_norm's power method runs (one refinement of its estimate per run)."""
    calls = [0]
    real = parametrizations._SpectralNorm._power_method

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(parametrizations._SpectralNorm, "_power_method", counting)
    return calls


class SpectralCell(nn.Module):
    def __init__(self, dim: int = 16, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin = parametrizations.spectral_norm(nn.Linear(dim, dim, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(0.9 * self.lin(z) + x)


@pytest.mark.parametrize("grad", [JFB(), IFT(), PhantomGradient(k=3)], ids=repr)
@pytest.mark.parametrize("needs_grad", [False, True])
def test_spectral_norm_refines_once_per_call_in_training(power_steps, grad, needs_grad):
    torch.manual_seed(0)
    deq = DEQLayer(SpectralCell(), grad=grad, max_iter=100, tol=1e-5).train()
    x = torch.randn(4, 16)
    power_steps[0] = 0
    with torch.set_grad_enabled(needs_grad):
        out = deq(x)
        if needs_grad:
            out.z.sum().backward()
    assert out.stats.nfe > 5
    assert power_steps[0] == 1  # was nfe + grad_evals before: every evaluation refined the estimate


def test_the_solve_sees_one_weight_and_converges_in_fewer_evaluations(power_steps):
    torch.manual_seed(0)
    cell = SpectralCell(64)
    moving = copy.deepcopy(cell)
    x = torch.randn(8, 64)
    deq = DEQLayer(cell, solver=Picard(), max_iter=200, tol=1e-5)
    power_steps[0] = 0
    one = deq(x)
    assert power_steps[0] == 1 and one.stats.all_converged
    # The old behaviour, for the record: a plain function hides the module, so its weight moves.
    power_steps[0] = 0
    chased = fixed_point(lambda z, x: moving(z, x), x, solver=Picard(), max_iter=200, tol=1e-5)
    assert power_steps[0] == chased.stats.nfe + 1
    assert one.stats.nfe <= chased.stats.nfe


def test_gradients_reach_the_original_parameters_exactly():
    torch.manual_seed(0)
    cell = SpectralCell(6, dtype=torch.float64).train()
    reference = copy.deepcopy(cell)
    x = torch.randn(3, 6, dtype=torch.float64)
    deq = DEQLayer(cell, solver=Picard(), grad=JFB(), max_iter=500, tol=1e-14)
    out = deq(x)
    assert out.stats.all_converged
    out.z.pow(2).sum().backward()

    # The reference: the weight computed once (one power step from the same state), z* by Picard on
    # that weight, and the JFB gradient of one step at z*.
    weight = reference.lin.parametrizations.weight()
    bias = reference.lin.bias
    z = torch.zeros_like(x)
    with torch.no_grad():
        for _ in range(500):
            z = torch.tanh(0.9 * (z @ weight.T + bias) + x)
    image = torch.tanh(0.9 * (z @ weight.T + bias) + x)
    expected = torch.autograd.grad(image.pow(2).sum(), list(reference.parameters()))
    got = [p.grad for p in cell.parameters()]
    # Same weight, z* to 1e-14: the gradients agree to float64 rounding times the problem's size.
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


def test_ift_double_backward_reuses_the_calls_weights(power_steps):
    torch.manual_seed(0)
    cell = SpectralCell(6, dtype=torch.float64).train()
    deq = DEQLayer(cell, grad=IFT(max_iter=200, tol=1e-12), max_iter=200, tol=1e-12)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    out = deq(x)
    power_steps[0] = 0
    (gx,) = torch.autograd.grad(out.z.pow(2).sum(), x, create_graph=True)
    gx.sum().backward()  # differentiates through the backward solve: evaluates f again
    assert power_steps[0] == 0
    assert cell.lin.parametrizations.weight.original.grad is not None


def test_a_deq_inside_another_deqs_f_shares_the_outer_calls_weight(power_steps):
    torch.manual_seed(0)
    inner_cell = SpectralCell(8)
    inner = DEQLayer(inner_cell, max_iter=30, tol=1e-5)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z, x):
            return 0.5 * self.inner(z + x).z

    outer = DEQLayer(Outer(), max_iter=30, tol=1e-4).train()
    power_steps[0] = 0
    out = outer(torch.randn(2, 8))
    assert out.stats.nfe > 2 and power_steps[0] == 1


def test_weight_norm_is_computed_once_per_call(monkeypatch):
    lin = parametrizations.weight_norm(nn.Linear(8, 8))
    calls = [0]
    real = type(lin.parametrizations.weight[0]).forward

    def counting(self, *args):
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(type(lin.parametrizations.weight[0]), "forward", counting)

    class Cell(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return torch.tanh(0.3 * self.lin(z) + x)

    out = DEQLayer(Cell(), tol=1e-6)(torch.randn(2, 8))
    assert out.stats.nfe > 3 and calls[0] == 1


def test_the_cache_is_closed_after_the_call():
    torch.manual_seed(0)
    deq = DEQLayer(SpectralCell())
    deq(torch.randn(2, 16))
    assert not parametrize._cache_enabled and not parametrize._cache


# ------------------------------------------------------------------------------------------ dropout


class DropCell(nn.Module):
    def __init__(self, dropout: nn.Module) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.block = nn.Sequential(dropout)
        self.masks: list[torch.Tensor] = []

    def forward(self, z, x):
        self.masks.append(self.block(torch.ones_like(z)).detach())  # what the dropout does to ones
        return torch.tanh(0.5 * self.block(self.lin(z)) + x)


@pytest.mark.parametrize("grad", [JFB(), IFT(), PhantomGradient(k=3)], ids=repr)
def test_a_variational_mask_is_held_within_a_call_and_redrawn_across_calls(grad):
    torch.manual_seed(0)
    cell = DropCell(VariationalDropout(0.5))
    deq = DEQLayer(cell, grad=grad, tol=1e-6, max_iter=60).train()
    x = torch.randn(16, 8)
    first = deq(x)
    first.z.sum().backward()
    masks_first = cell.masks
    assert len(masks_first) == first.stats.nfe + first.grad_evals
    assert all(torch.equal(m, masks_first[0]) for m in masks_first)
    assert first.stats.all_converged  # one function: the solve converges
    cell.masks = []
    deq(x)
    assert not torch.equal(cell.masks[0], masks_first[0])
    assert set(masks_first[0].unique().tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("dropout", [nn.Dropout(0.2), nn.Dropout1d(0.2), nn.AlphaDropout(0.2)], ids=repr)
def test_dropout_in_f_warns_once_and_names_the_module_and_the_remedy(dropout):
    deq = DEQLayer(DropCell(dropout), max_iter=5).train()
    x = torch.randn(2, 8)
    named = r"f\.block\.0 \(" + type(dropout).__name__ + r"\).*VariationalDropout"
    with pytest.warns(UserWarning, match=named):
        deq(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x)  # once per f


def test_dropout_in_eval_mode_does_not_warn():
    deq = DEQLayer(DropCell(nn.Dropout(0.2)), max_iter=5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(torch.randn(2, 8))


def test_the_layer_walks_f_once_not_at_every_call(monkeypatch):
    from implicitdiff import _onefunction

    cell = DropCell(VariationalDropout(0.1))
    deq = DEQLayer(cell, max_iter=3)
    walks = [0]
    real = _onefunction._walk

    def counting(f):
        walks[0] += 1
        return real(f)

    monkeypatch.setattr(_onefunction, "_walk", counting)
    implicitdiff.nn.forget(cell)
    for _ in range(3):
        deq(torch.randn(2, 8))
    assert walks[0] == 1
    implicitdiff.nn.forget(cell)  # after changing f's modules
    deq(torch.randn(2, 8))
    assert walks[0] == 2


def test_looking_up_f_costs_little_next_to_a_walk():
    """The per-call look-up is a weak dictionary read; a walk of a 40-module f is many times that."""
    from implicitdiff._onefunction import _walk, parts_of

    f = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.GELU()) for _ in range(13)])
    parts_of(f)
    repeats = 2000
    start = time.perf_counter()
    for _ in range(repeats):
        parts_of(f)
    lookup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        _walk(f)
    walk = time.perf_counter() - start
    assert lookup < walk


# ------------------------------------------------------------------------------- intermediate states


def _correction_run(n_states: int | None, steps: int = 20) -> tuple[float, float]:
    """Train a small DEQ regressor; return its first and last task loss (at out.z)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen)
    target = torch.sin(x @ torch.randn(6, 3, generator=gen))
    torch.manual_seed(0)
    lin, inject, head = nn.Linear(16, 16), nn.Linear(6, 16), nn.Linear(16, 3)
    deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), grad=JFB(), max_iter=8, tol=None)
    params = [*lin.parameters(), *inject.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(steps):
        out = deq(inject(x), n_states=n_states)
        task = nn.functional.mse_loss(head(out.z), target)
        loss = task
        if n_states is not None:
            loss = regularizers.fixed_point_correction_loss(
                out.states, lambda z: nn.functional.mse_loss(head(z), target)
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(task.detach()))
    return losses[0], losses[-1]


def test_the_fixed_point_correction_loss_over_the_states_trains_a_model():
    first, last = _correction_run(n_states=3)
    # The baseline is the untrained model's loss (the first step's); 20 Adam steps (lr 0.05) on this
    # smooth regression take it down about three-fold with or without correction (plain JFB: similar).
    assert last < 0.5 * first
    plain_first, plain_last = _correction_run(n_states=None)
    assert first == plain_first
    assert last < 2 * plain_last
