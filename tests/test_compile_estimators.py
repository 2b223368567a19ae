"""Every gradient estimator under ``torch.compile`` with a real backend (AOTAutograd), on every kind of state.

The compile tests of the driver and of structured states use a counting backend that hands dynamo's graph
back unchanged, so AOTAutograd (which partitions the graph into a forward and a compiled backward) never
runs. Here ``aot_eager`` does: it is what ``inductor`` runs before generating code, without the C compiler.

The gradients of the compiled layer are compared with those of the same layer run eagerly, in float64.
Both run the same solve eagerly (the solve stays outside the compiled graph); what differs is the
estimator's evaluations of ``f`` with grad, which AOTAutograd traces and may decompose into other aten
operations, so the two differ by rounding. Each rounded sum has at most ``DEPTH`` terms (``f``'s 7-wide
and 4-wide products, the sum over the batch into a weight's gradient), each estimator step has a few
such operations (``OPS``: the product, the add, ``tanh`` and its derivative), and ``f`` is a
contraction of constant ``LIP`` in ``z``, so an error made at one step of an iteration (phantom, S-JFB,
IFT's adjoint) is damped by ``LIP`` at each later one and the total is at most ``1 / (1 - LIP)`` times a
step's (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., section 3.1, for the sums).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from everything import EVERYTHING
from torch.utils import _pytree as pytree

from implicitdiff import IFT, JFB, SJFB, DEQLayer, PhantomGradient, Picard

pytestmark = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 11),
    reason="structured states under torch.compile need torch >= 2.11 (see tests/test_pytree.py)",
)

BATCH, WIDTH, X_WIDTH = 3, 7, 4
LIP = 0.5  # the spectral norm of the state's weight, hence f's Lipschitz constant in z (tanh is 1-Lipschitz)
DEPTH = WIDTH + X_WIDTH + BATCH
OPS = 4
EPS = torch.finfo(torch.float64).eps
TOL = OPS * DEPTH * EPS / (1 - LIP)  # about 2.5e-14, relative to the largest gradient entry

ESTIMATORS: dict[str, Callable[[], object]] = {
    "jfb": JFB,
    "phantom": lambda: PhantomGradient(k=4, tau=0.6),
    "sjfb": lambda: SJFB(no_grad_iters=(2, 6), grad_iters=(1, 3), seed=5),
    "ift": lambda: IFT(solver=Picard(), max_iter=25, tol=1e-9, on_failure="raise"),
}


class Cell(torch.nn.Module):
    """``f(z, x) = tanh(W tanh(z) + U x + b)`` on a state of width 7: a tensor, a tuple or a dict (4 + 3).

    ``tanh(z)`` is an intermediate that the backward saves (a buffer AOTAutograd may donate).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.state = torch.nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        self.inject = torch.nn.Linear(X_WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            self.state.weight.mul_(LIP / torch.linalg.matrix_norm(self.state.weight, 2))

    def forward(self, z: object, x: torch.Tensor) -> object:
        if self.kind == "tensor":
            return torch.tanh(self.state(torch.tanh(z)) + self.inject(x))
        h = torch.cat([z[0], z[1]] if self.kind == "tuple" else [z["a"], z["b"]], dim=1)
        out = torch.tanh(self.state(torch.tanh(h)) + self.inject(x))
        a, b = out[:, :4], out[:, 4:]
        return (a, b) if self.kind == "tuple" else {"a": a, "b": b}


def start(kind: str, batch: int = BATCH) -> object:
    a, b = torch.zeros(batch, 4, dtype=torch.float64), torch.full((batch, 3), 0.1, dtype=torch.float64)
    return {"tensor": torch.cat([a, b], dim=1), "tuple": (a, b), "dict": {"a": a, "b": b}}[kind]


def gradients(layer: Callable[..., object], cell: Cell, x: torch.Tensor, z0: object) -> list[torch.Tensor]:
    """The gradients of a fixed weighted sum of the solution's leaves, in ``x`` and ``cell``'s parameters."""
    x = x.detach().requires_grad_(True)
    leaves = pytree.tree_leaves(layer(x, z0).z)
    weights = torch.Generator().manual_seed(1)
    loss = sum((leaf * torch.randn(leaf.shape, generator=weights, dtype=leaf.dtype)).sum() for leaf in leaves)
    params = list(cell.parameters())
    return list(torch.autograd.grad(loss, [x, *params]))


def assert_close_normwise(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for g, e in zip(got, expected, strict=True):
        scale = float(e.abs().max())
        assert scale > 0
        assert float((g - e).abs().max()) <= TOL * scale, (float((g - e).abs().max()), TOL * scale)


KINDS = ("tensor", "tuple", "dict")
#: A local run compiles JFB, the phantom gradient and S-JFB on one kind of state each (the kinds taken in
#: turn) and IFT on the two where its adjoint once failed (tuple and dict); CI compiles all twelve.
CASES = [
    (estimator, kind)
    for i, estimator in enumerate(ESTIMATORS)
    for kind in KINDS
    if EVERYTHING or (kind != "tensor" if estimator == "ift" else kind == KINDS[i % len(KINDS)])
]


@pytest.mark.parametrize(("estimator", "kind"), CASES)
def test_a_layer_compiled_with_aot_autograd_gives_the_eager_gradients(estimator: str, kind: str) -> None:
    # IFT on a tuple or dict state failed at backward ("compiled with non-empty donated buffers"): its
    # adjoint differentiates one traced evaluation of f many times, which a compiled backward refuses
    # once it saves a symbolic size (here the packed width 7 beside x's width 4 made one dynamic).
    torch.manual_seed(0)
    cell = Cell(kind)
    x = torch.randn(BATCH, X_WIDTH, dtype=torch.float64)

    def layer() -> DEQLayer:
        return DEQLayer(cell, solver=Picard(), grad=ESTIMATORS[estimator](), max_iter=12, tol=None).train()

    torch._dynamo.reset()
    compiled = torch.compile(layer(), backend="aot_eager")
    got = gradients(compiled, cell, x, start(kind))
    expected = gradients(layer(), cell, x, start(kind))
    assert_close_normwise(got, expected)


def test_ift_through_a_compiled_f_whose_shapes_become_dynamic_gives_the_eager_gradients() -> None:
    # The pattern the performance guide recommends (compile f, not the loop): a second batch size makes
    # f's compiled graph dynamic, AOTAutograd then compiles its backward at once with donated buffers, and
    # IFT's second vector-Jacobian product through it was refused. The estimator evaluates f eagerly.
    torch.manual_seed(0)
    cell = Cell("tensor")
    compiled_f = torch.compile(cell, backend="aot_eager")
    torch._dynamo.reset()
    for batch in (BATCH, BATCH + 2, BATCH + 4):
        x = torch.randn(batch, X_WIDTH, dtype=torch.float64)
        layers = [
            DEQLayer(f, solver=Picard(), grad=ESTIMATORS["ift"](), max_iter=12, tol=None)
            for f in (compiled_f, cell)
        ]
        got = gradients(layers[0], cell, x, start("tensor", batch))
        expected = gradients(layers[1], cell, x, start("tensor", batch))
        assert_close_normwise(got, expected)
