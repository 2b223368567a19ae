"""DEQLayer: per-call overrides, warm start, user solvers, grad mode, modules, kwargs and input checks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from implicitdiff import IFT, JFB, SJFB, DEQLayer
from implicitdiff.solvers import Anderson, Broyden, Picard

# ---------------------------------------------------------------------------------------------------------
# Per-call overrides and warm start
# ---------------------------------------------------------------------------------------------------------


def test_per_call_max_iter_overrides_the_layer_default(cell, x):
    deq = DEQLayer(cell, solver=Picard(), max_iter=100, tol=1e-10)
    assert deq(x).stats.nfe > 3
    out = deq(x, max_iter=3)
    assert out.stats.nfe == 3 and not out.stats.all_converged
    # The override lasts for one call only.
    assert deq(x).stats.nfe > 3


def test_per_call_tol_overrides_the_layer_default(cell, x):
    deq = DEQLayer(cell, solver=Picard(), max_iter=200, tol=1e-6)
    tight = deq(x)
    loose = deq(x, tol=1e-2)
    assert tight.stats.all_converged and loose.stats.all_converged
    assert float(loose.stats.residual.max()) <= 1e-2 < float(tight.stats.trace[0])
    assert loose.stats.nfe < tight.stats.nfe
    assert float(tight.stats.residual.max()) <= 1e-6


def test_per_call_solver_overrides_the_layer_default(cell, x, make_recording_solver):
    default, override = make_recording_solver(), make_recording_solver()
    deq = DEQLayer(cell, solver=default, max_iter=50, tol=1e-6)
    deq(x, solver=override, max_iter=7, tol=1e-3)
    assert default.calls == [] and override.calls == [{"max_iter": 7, "tol": 1e-3, "stop_mode": "abs"}]
    deq(x)
    assert default.calls == [{"max_iter": 50, "tol": 1e-6, "stop_mode": "abs"}]


@pytest.mark.parametrize("solver", [Picard(), Anderson(), Broyden()], ids=repr)
@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), lipschitz=st.floats(0.3, 0.9))
def test_warm_start_near_the_solution_takes_fewer_evaluations(solver, seed, lipschitz, make_cell):
    f = make_cell(8, lipschitz, seed)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    deq = DEQLayer(f, solver=solver, max_iter=300, tol=1e-5)
    with torch.no_grad():
        cold = deq(x)
        z_near = cold.z + 1e-4 * torch.randn(4, 8, generator=torch.Generator().manual_seed(seed + 1))
        warm = deq(x, z0=z_near)
    assert cold.stats.all_converged and warm.stats.all_converged
    assert warm.stats.nfe < cold.stats.nfe
    torch.testing.assert_close(warm.z, cold.z, atol=2e-5 / (1 - lipschitz), rtol=0)


# ---------------------------------------------------------------------------------------------------------
# User solvers
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Grad mode, eval mode, modules and kwargs
# ---------------------------------------------------------------------------------------------------------


def test_f_as_module_registers_its_parameters(cell):
    deq = DEQLayer(cell)
    assert any(p is cell.linear.weight for p in deq.parameters())
    assert "f.linear.weight" in deq.state_dict()
    assert deq.double().f.linear.weight.dtype == torch.float64


def test_f_as_plain_function_adds_no_parameters(x):
    deq = DEQLayer(lambda z, x: 0.5 * torch.tanh(z) + x)
    assert list(deq.parameters()) == []
    out = deq(x)
    assert out.stats.all_converged
    torch.testing.assert_close(out.z, 0.5 * torch.tanh(out.z) + x, atol=1e-4, rtol=0)


def test_f_kwargs_are_passed_through_to_f(cell, x):
    deq = DEQLayer(cell, max_iter=100, tol=1e-7)
    with torch.no_grad():
        scaled = deq(x, f_kwargs={"scale": 0.5})
        half_x = deq(0.5 * x)
        plain = deq(x)
        with pytest.warns(DeprecationWarning, match=r"f_kwargs=\{\.\.\.\}"):
            loose = deq(x, scale=0.5)  # the spelling before 0.3: still reaches f
    torch.testing.assert_close(scaled.z, half_x.z, atol=1e-5, rtol=0)
    assert torch.equal(loose.z, scaled.z)
    assert float((scaled.z - plain.z).abs().max()) > 1e-2


def test_f_kwargs_are_passed_one_way(cell, x):
    deq = DEQLayer(cell)
    with pytest.raises(TypeError, match="one way"):
        deq(x, f_kwargs={"scale": 0.5}, scale=0.5)
    with pytest.raises(TypeError, match="f_kwargs must be a mapping"):
        deq(x, f_kwargs=[("scale", 0.5)])


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tol": 0.0}, ValueError),
        ({"tol": -1.0}, ValueError),
        ({"max_iter": 0}, ValueError),
        ({"stop_mode": "inf"}, ValueError),
    ],
)
def test_bad_layer_settings_raise_at_construction(cell, kwargs, error):
    with pytest.raises(error):
        DEQLayer(cell, **kwargs)


@pytest.mark.parametrize(("kwargs", "error"), [({"tol": 0.0}, ValueError), ({"max_iter": 0}, ValueError)])
def test_bad_per_call_settings_raise(cell, x, kwargs, error):
    with pytest.raises(error):
        DEQLayer(cell)(x, **kwargs)


@settings(max_examples=10)
@given(
    batch=st.integers(1, 4),
    shape=st.sampled_from([(5,), (2, 3, 3)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_layer_output_keeps_shape_and_dtype_of_the_state(batch, shape, dtype):
    n = math.prod(shape)
    weight = 0.5 * torch.eye(n, dtype=dtype)

    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z.reshape(batch, n) @ weight).reshape(z.shape) + x

    x = torch.randn(batch, *shape, dtype=dtype)
    out = DEQLayer(f, max_iter=100, tol=1e-5)(x)
    assert out.z.shape == x.shape and out.z.dtype == dtype
    assert out.stats.all_converged


# ---------------------------------------------------------------------------------------- round 2: issue #11


def test_numpy_numbers_and_strict_bools():
    np = pytest.importorskip("numpy")
    layer = DEQLayer(lambda z, x_: 0.5 * z + x_, max_iter=np.int64(20), tol=np.float32(1e-5),
                     check_every=np.int16(2))  # fmt: skip
    assert layer.max_iter == 20 and isinstance(layer.max_iter, int)
    with pytest.raises(TypeError, match="raise_on_nonfinite must be a bool"):
        DEQLayer(lambda z, x_: z, raise_on_nonfinite=1)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        DEQLayer(lambda z, x_: z, max_iter=True)


def test_the_layers_state_dict_carries_the_estimators_generator(tanh_f):
    f = tanh_f
    layer = DEQLayer(f, solver=Picard(), grad=SJFB(seed=5), tol=None).train()
    x = torch.randn(2, 3, requires_grad=True)
    layer(x)  # one draw
    saved = layer.state_dict()
    expected = [layer(x).grad_evals for _ in range(6)]
    restored = DEQLayer(f, solver=Picard(), grad=SJFB(seed=99), tol=None).train()
    restored.load_state_dict(saved)
    assert [restored(x).grad_evals for _ in range(6)] == expected
    # A layer whose estimator has no state round-trips an empty extra state, silently.
    plain = DEQLayer(f, grad=JFB())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("strict", [True, False])
def test_weights_trained_with_one_estimator_load_into_a_layer_with_another(make_cell, strict):
    trained = DEQLayer(make_cell(6, seed=1), grad=SJFB(seed=5)).train()
    trained(torch.randn(2, 6, requires_grad=True))  # a draw: the generator has moved
    saved = trained.state_dict()
    fine_tune = DEQLayer(make_cell(6, seed=2), grad=IFT())
    with pytest.warns(UserWarning, match="the weights are loaded, the draw sequence is not"):
        fine_tune.load_state_dict(saved, strict=strict)
    assert torch.equal(fine_tune.f.linear.weight, trained.f.linear.weight)
    # And back: an estimator with a draw sequence keeps its own when the state dict has none.
    back = DEQLayer(make_cell(6, seed=3), grad=SJFB(seed=7))
    state = back.grad.state_dict()
    with pytest.warns(UserWarning, match="keeps its own draw sequence"):
        back.load_state_dict(fine_tune.state_dict(), strict=strict)
    assert torch.equal(back.f.linear.weight, trained.f.linear.weight)
    assert torch.equal(back.grad.state_dict()["generator"], state["generator"])
