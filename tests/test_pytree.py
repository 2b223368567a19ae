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
    solve_chain,
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


def _two_leaves(batch: int = 2):
    return (torch.zeros(batch, 3), {"h": torch.zeros(batch, 2), "c": torch.zeros(batch, 2)})


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda z: (z[0], {"h": z[1]["h"]}), r"no leaf z\[1\]\['c'\]"),
        (lambda z: (z[0], {**z[1], "x": z[0]}), r"a leaf z\[1\]\['x'\]"),
        (lambda z: [z[0], z[1]], "containers differ"),
        (lambda z: (z[0], {"h": z[1]["h"][:, :1], "c": z[1]["c"]}), r"shape \(2, 1\) at z\[1\]\['h'\]"),
        (lambda z: (z[0].double(), z[1]), r"torch.float64 on cpu at z\[0\]"),
        (lambda z: (z[0], {"h": z[1]["h"], "c": 1.0}), r"float at z\[1\]\['c'\]"),
    ],
)
def test_what_f_returns_is_checked_leaf_by_leaf_with_its_path(returned, message):
    with pytest.raises(ValueError, match=message):
        fixed_point(lambda z, x: returned(z), torch.zeros(2, 3), _two_leaves())


def test_bad_pytree_arguments_are_refused_clearly():
    f = lambda z, x: z  # noqa: E731
    with pytest.raises(ValueError, match="z0 is required when x is not a single tensor"):
        fixed_point(f, (torch.zeros(2, 3),))
    with pytest.raises(TypeError, match=r"one dtype: z0\[0\] is torch.float32 but z0\[1\] is torch.float64"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"batch size B = 2, got shape \(3, 1\) at z0\['b'\]"):
        fixed_point(f, torch.zeros(2, 3), {"a": torch.zeros(2, 3), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match=r"one batch size B = 2 \(x\[0\]\), got \(4, 1\) at x\[1\]"):
        fixed_point(f, (torch.zeros(2, 3), torch.zeros(4, 1)), (torch.zeros(2, 3),))
    with pytest.raises(TypeError, match=r"floating point, got torch.int64 at z0\[0\]"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3, dtype=torch.long),))
    with pytest.raises(TypeError, match=r"must be a Tensor, got str at z0\[1\]"):
        fixed_point(f, torch.zeros(2, 3), (torch.zeros(2, 3), "h"))
    with pytest.raises(ValueError, match="z0 must hold at least one tensor"):
        fixed_point(f, torch.zeros(2, 3), ())
    with pytest.raises(TypeError, match="x must be a Tensor or a pytree holding tensors"):
        fixed_point(f, (1, 2), (torch.zeros(2, 3),))


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


def test_solve_chain_takes_a_pytree_and_equals_the_flat_chain():
    x0 = {"a": torch.zeros(3), "b": (torch.ones(2, 2),)}
    seen = []

    def step_tree(k, x):
        seen.append(pytree.tree_map(lambda t: tuple(t.shape), x))
        return {"a": 0.5 * x["a"] + 1 + 0.1 * x["b"][0].sum((1, 2))[:, None], "b": (0.5 * x["b"][0],)}

    def step_flat(k, x):
        a, b = x[:, :3], x[:, 3:].reshape(-1, 2, 2)
        return torch.cat([0.5 * a + 1 + 0.1 * b.sum((1, 2))[:, None], (0.5 * b).reshape(-1, 4)], dim=1)

    tree = solve_chain(step_tree, x0, 6, solver=Anderson(m=2))
    flat = solve_chain(step_flat, torch.cat([torch.zeros(3), torch.ones(4)]), 6, solver=Anderson(m=2))
    assert seen[0] == {"a": (6, 3), "b": ((6, 2, 2),)}
    assert tree.xs["a"].shape == (7, 3) and tree.xs["b"][0].shape == (7, 2, 2)
    assert torch.equal(tree.xs["a"], flat.xs[:, :3])
    assert torch.equal(tree.xs["b"][0], flat.xs[:, 3:].reshape(7, 2, 2))
    assert tree.sweeps == flat.sweeps


def test_solve_chain_names_the_leaf_a_step_got_wrong():
    with pytest.raises(ValueError, match=r"step\(k, x\) returned shape \(2, 1\) at x\['b'\]"):
        x0 = {"a": torch.zeros(3), "b": torch.zeros(2)}
        solve_chain(lambda k, x: {"a": x["a"], "b": x["b"][:, :1]}, x0, 2)


# ------------------------------------------------------------------------------ autocast, compile


def test_under_autocast_the_leaves_f_returns_are_cast_back_to_the_state_dtype():
    lin = torch.nn.Linear(4, 4)
    f = lambda z, x: (torch.tanh(0.3 * lin(z[0]) + x), 0.5 * z[1])  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fixed_point(f, torch.randn(2, 4), (torch.zeros(2, 4), torch.ones(2, 3)), tol=1e-2)
    assert out.z[0].dtype == torch.float32 and out.z[1].dtype == torch.float32
    assert out.z[0].requires_grad


@pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 11),
    reason="torch 2.4's dynamo fails inside torch.utils._pytree (InternalTorchDynamoError on a TreeSpec); "
    "structured states under torch.compile need a newer torch (2.11 and 2.13 checked)",
)
def test_a_compiled_layer_with_a_pytree_state_does_not_recompile():
    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(2, 2)

        def forward(self, z, x):
            return {"a": torch.tanh(0.5 * self.a(z["a"]) + x), "b": torch.tanh(0.5 * self.b(z["b"]))}

    graphs = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    deq = DEQLayer(Cell(), solver=Picard(), max_iter=8, tol=None)
    compiled = torch.compile(deq, backend=backend)
    x, z0 = torch.randn(3, 4), {"a": torch.zeros(3, 4), "b": torch.ones(3, 2)}
    counts = []
    for _ in range(4):
        out = compiled(x, z0)
        counts.append(len(graphs))
    assert counts[1] == counts[2] == counts[3]
    torch.testing.assert_close(out.z["a"], deq(x, z0).z["a"])


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
