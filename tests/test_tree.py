"""Structured states: pytrees of tensors through fixed_point, DEQLayer, the estimators, the regularizers
and solve_chain, packed into one (B, n) working tensor at the boundary."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils import _pytree as pytree

from implicitdiff import (
    IFT,
    JFB,
    SJFB,
    Anderson,
    DEQLayer,
    PhantomGradient,
    Picard,
    SolverResult,
    fixed_point,
    regularizers,
)

DTYPES = [torch.float32, torch.float64]


def _pack(tree) -> Tensor:
    leaves = pytree.tree_leaves(tree)
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)


def _unpack_like(flat: Tensor, like):
    leaves, treedef = pytree.tree_flatten(like)
    out, start = [], 0
    for leaf in leaves:
        size = leaf[0].numel()
        out.append(flat[:, start : start + size].reshape(flat.shape[0], *leaf.shape[1:]))
        start += size
    return pytree.tree_unflatten(out, treedef)


# ------------------------------------------------------------------------- random structures (hypothesis)

Pair = namedtuple("Pair", ["left", "right"])


@st.composite
def structures(draw, batch: int, dtype: torch.dtype, depth: int = 0):
    """A random pytree of zero tensors (B, *shape): tuples, lists, dicts and named tuples, nested."""
    if depth >= 2 or draw(st.booleans()):
        shape = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
        return torch.zeros(batch, *shape, dtype=dtype)
    kind = draw(st.sampled_from(["tuple", "list", "dict", "named"]))
    if kind == "named":
        return Pair(draw(structures(batch, dtype, depth + 1)), draw(structures(batch, dtype, depth + 1)))
    children = draw(st.lists(structures(batch, dtype, depth + 1), min_size=1, max_size=3))
    if kind == "dict":
        return {f"k{i}": child for i, child in enumerate(children)}
    return tuple(children) if kind == "tuple" else children


@given(data=st.data(), dtype=st.sampled_from(DTYPES), solver=st.sampled_from(["picard", "anderson"]))
def test_the_packed_solve_equals_the_hand_flattened_solve_exactly(data, dtype, solver):
    batch = data.draw(st.integers(1, 3))
    z0 = data.draw(structures(batch, dtype))
    n = _pack(z0).shape[1]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    weight = (0.6 * torch.randn(n, n, generator=gen) / n**0.5).to(dtype)
    x = torch.randn(batch, n, generator=gen).to(dtype)

    def f_flat(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ weight.T + x)

    def f_tree(z, x):
        return _unpack_like(f_flat(_pack(z), x), z0)

    rule = Picard() if solver == "picard" else Anderson(m=3)
    tree = fixed_point(f_tree, x, z0, solver=rule, max_iter=25, tol=1e-5)
    flat = fixed_point(f_flat, x, _pack(z0), solver=rule, max_iter=25, tol=1e-5)
    # A structure that is one tensor is not packed: its stats keep its shape.
    assert torch.equal(tree.stats.z.reshape(batch, -1), flat.stats.z)
    assert torch.equal(tree.stats.residual, flat.stats.residual)
    assert tree.stats.nfe == flat.stats.nfe
    assert pytree.tree_structure(tree.z) == pytree.tree_structure(z0)
    assert torch.equal(_pack(tree.z), flat.z)


def test_a_single_tensor_state_is_not_packed():
    seen = []

    def spy(g, z0, **options) -> SolverResult:
        seen.append(z0.shape)
        return Picard()(g, z0, **options)

    x = torch.randn(2, 3, 4)
    out = fixed_point(lambda z, x: 0.5 * z + x, x, solver=spy, tol=1e-6, max_iter=60)
    assert seen == [torch.Size([2, 3, 4])]
    assert out.z.shape == (2, 3, 4)


def test_a_pytree_state_reaches_the_solver_as_flat_rows_and_f_as_its_structure():
    seen_by_solver, seen_by_f = [], []

    def spy(g, z0, **options) -> SolverResult:
        seen_by_solver.append(z0.shape)
        return Picard()(g, z0, **options)

    def f(z, x):
        seen_by_f.append({key: value.shape for key, value in z.items()})
        return {"fine": 0.5 * z["fine"] + x, "coarse": 0.5 * z["coarse"] + x[:, :, ::2, ::2]}

    x = torch.randn(2, 3, 4, 4)
    z0 = {"fine": torch.zeros(2, 3, 4, 4), "coarse": torch.zeros(2, 3, 2, 2)}
    out = fixed_point(f, x, z0, solver=spy, tol=1e-6, max_iter=60)
    assert seen_by_solver == [torch.Size([2, 3 * 16 + 3 * 4])]
    assert seen_by_f[0] == {"fine": (2, 3, 4, 4), "coarse": (2, 3, 2, 2)}
    assert out.stats.z.shape == (2, 60)
    torch.testing.assert_close(out.z["fine"], 2 * x, atol=1e-5, rtol=0)


def test_a_layer_takes_pytree_inputs_and_states_and_returns_the_structure():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    deq = DEQLayer(lambda z, x: (torch.tanh(0.5 * lin(z[0]) + x["a"]), 0.5 * z[1] + x["b"]), tol=1e-6)
    x = {"a": torch.randn(3, 4), "b": torch.randn(3, 2)}
    out = deq(x, (torch.zeros(3, 4), torch.zeros(3, 2)))
    assert isinstance(out.z, tuple) and out.z[0].shape == (3, 4) and out.z[1].shape == (3, 2)
    assert out.stats.all_converged


# ------------------------------------------------------------------------------------------ errors


# ------------------------------------------------------------------- gradients against float64 references


class Coupled(torch.nn.Module):
    """Two leaves of different shapes that feed each other: a (B, 3) and {"h": (B, 2, 2)}."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.w_a = torch.nn.Parameter(0.3 * torch.randn(3, 3, generator=gen, dtype=torch.float64))
        self.u_a = torch.nn.Parameter(0.3 * torch.randn(3, 4, generator=gen, dtype=torch.float64))
        self.w_h = torch.nn.Parameter(0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64))
        self.u_h = torch.nn.Parameter(0.3 * torch.randn(4, 3, generator=gen, dtype=torch.float64))

    def forward(self, z, x):
        a, h = z[0], z[1]["h"].reshape(-1, 4)
        new_a = torch.tanh(a @ self.w_a.T + h @ self.u_a.T + x["a"])
        new_h = torch.tanh(h @ self.w_h.T + a @ self.u_h.T + x["h"].reshape(-1, 4))
        return (new_a, {"h": new_h.reshape(-1, 2, 2)})


def _coupled_problem(batch: int = 2):
    gen = torch.Generator().manual_seed(5)
    x = {
        "a": torch.randn(batch, 3, generator=gen, dtype=torch.float64).requires_grad_(),
        "h": torch.randn(batch, 2, 2, generator=gen, dtype=torch.float64).requires_grad_(),
    }
    z0 = (torch.zeros(batch, 3, dtype=torch.float64), {"h": torch.zeros(batch, 2, 2, dtype=torch.float64)})
    cot = (torch.randn(batch, 3, generator=gen, dtype=torch.float64),
           {"h": torch.randn(batch, 2, 2, generator=gen, dtype=torch.float64)})  # fmt: skip
    return x, z0, cot


def _reference(f: Coupled, x, z0, cot, weights) -> list[Tensor]:
    """d(cot . z_out)/d(x, params) for z_out with dz_out/dtheta = A df/dtheta, A from the dense Jacobian."""
    z = _pack(z0)
    with torch.no_grad():
        for _ in range(400):  # Picard to float64 rounding (the map contracts)
            z = _pack(f(_unpack_like(z, z0), x))
    leaves = [x["a"], x["h"], *f.parameters()]
    c = _pack(cot)
    grads = [torch.zeros_like(leaf) for leaf in leaves]
    full = torch.autograd.functional.jacobian(lambda v: _pack(f(_unpack_like(v, z0), x)), z)
    for b in range(z.shape[0]):
        u = c[b] @ weights(full[b, :, b, :])
        image = _pack(f(_unpack_like(z, z0), x))[b]
        for i, g in enumerate(torch.autograd.grad(image, leaves, u)):
            grads[i] += g
    return grads


def _phantom_weights(k: int, tau: float):
    def weights(jac: Tensor) -> Tensor:
        step = tau * jac + (1 - tau) * torch.eye(jac.shape[0], dtype=jac.dtype)
        total, power = torch.zeros_like(jac), torch.eye(jac.shape[0], dtype=jac.dtype)
        for _ in range(k):
            total, power = total + power, power @ step
        return tau * total

    return weights


ESTIMATORS = {
    "ift": (lambda: IFT(solver=Anderson(m=5), max_iter=200, tol=1e-13),
            lambda jac: torch.linalg.inv(torch.eye(jac.shape[0], dtype=jac.dtype) - jac)),
    "jfb": (JFB, lambda jac: torch.eye(jac.shape[0], dtype=jac.dtype)),
    "phantom": (lambda: PhantomGradient(k=4, tau=0.6), _phantom_weights(4, 0.6)),
    "phantom_neumann": (lambda: PhantomGradient(k=4, tau=0.6, mode="neumann"), _phantom_weights(4, 0.6)),
    "sjfb": (lambda: SJFB(no_grad_iters=(200, 200), grad_iters=(3, 3)), _phantom_weights(3, 1.0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_gives_its_exact_gradient_on_a_structured_state(name):
    make, weights = ESTIMATORS[name]
    f = Coupled()
    x, z0, cot = _coupled_problem()
    out = fixed_point(f, x, z0, grad=make(), solver=Picard(), max_iter=200, tol=1e-13, training=True)
    assert out.stats.all_converged
    loss = sum((a * b).sum() for a, b in zip(pytree.tree_leaves(out.z), pytree.tree_leaves(cot)))
    leaves = [x["a"], x["h"], *f.parameters()]
    got = torch.autograd.grad(loss, leaves)
    expected = _reference(f, x, z0, cot, weights)
    # The solves stop at residual 1e-13 and the map contracts (||J|| < 1): errors of a few 1e-13 times
    # (1 - ||J||)^-1 and the lengths of the sums, far above float64's 1e-16 and far below any bug.
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------- regularizers


def test_jacobian_frobenius_of_a_pytree_is_that_of_the_packed_state():
    f = Coupled()
    x, z0, _ = _coupled_problem()
    z = pytree.tree_map(lambda t: (t + 0.1).requires_grad_(), z0)
    image = f(z, x)
    gen = torch.Generator().manual_seed(11)
    estimate = regularizers.jacobian_frobenius(image, z, generator=gen, normalize=False)
    gen.manual_seed(11)
    probe = _pack(pytree.tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), image))
    zf = _pack(z).detach()
    for b in range(zf.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: _pack(f(_unpack_like(v, z0), x))[b], zf)[:, b]
        torch.testing.assert_close(estimate[b], (probe[b] @ jac).pow(2).sum(), rtol=1e-12, atol=0)
    normalized = regularizers.jacobian_frobenius(image, z, generator=gen.manual_seed(11))
    torch.testing.assert_close(normalized, estimate / 7, rtol=1e-12, atol=0)


def test_spectral_radius_of_a_pytree_is_the_largest_eigenvalue_of_the_whole_jacobian():
    diag = torch.tensor([0.9, 0.2, 0.1, -0.5, 0.3], dtype=torch.float64)
    z = (torch.ones(1, 2, dtype=torch.float64, requires_grad=True),
         {"h": torch.ones(1, 3, dtype=torch.float64, requires_grad=True)})  # fmt: skip
    image = (z[0] * diag[:2], {"h": z[1]["h"] * diag[2:]})
    radius = regularizers.spectral_radius(image, z, n_iter=400)
    torch.testing.assert_close(radius, torch.tensor([0.9], dtype=torch.float64), atol=1e-12, rtol=0)


def test_regularizers_refuse_an_image_of_another_structure():
    z = (torch.ones(1, 2, requires_grad=True), torch.ones(1, 3, requires_grad=True))
    with pytest.raises(ValueError, match="image must have the structure of z"):
        regularizers.jacobian_frobenius([2 * z[0], 2 * z[1]], z)
    with pytest.raises(ValueError, match=r"shaped like z \(1, 3\), got \(1, 2\) at z\[1\]"):
        regularizers.spectral_radius((2 * z[0], 2 * z[0]), z)


# ------------------------------------------------------------------------------------------ solve_chain


# ------------------------------------------------------------------------------ autocast, compile


def test_ift_differentiates_tensor_leaves_of_f_kwargs_like_those_of_x():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    scale = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(z, x, cond):
        return torch.tanh(0.4 * lin(z) * cond["scale"] + x + cond["pair"][0])

    ift = IFT(max_iter=200, tol=1e-12)
    out = fixed_point(f, shift, grad=ift, f_kwargs={"cond": {"scale": scale, "pair": (shift, 1)}},
                      tol=1e-12, max_iter=200)  # fmt: skip
    got = torch.autograd.grad(out.z.sum(), [scale, shift])
    as_x = fixed_point(lambda z, x: f(z, x[1], {"scale": x[0], "pair": (x[1], 1)}), (scale, shift),
                       torch.zeros(2, 3, dtype=torch.float64), grad=ift, tol=1e-12, max_iter=200)  # fmt: skip
    expected = torch.autograd.grad(as_x.z.sum(), [scale, shift])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)
