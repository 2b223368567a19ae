"""Compilation: import implicitdiff loads no compiler, solves run outside compiled graphs, steps compile."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from everything import EVERYTHING

from implicitdiff import (
    SJFB,
    Anderson,
    Broyden,
    DEQLayer,
    Picard,
)

#: The rules of the layer tests below, by name.
RULES = {"picard": Picard(), "anderson": Anderson(), "broyden": Broyden(memory=5)}


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


TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def _counting_backend() -> tuple[list, object]:
    graphs: list = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    return graphs, backend


#: A local run takes Picard with both kinds of budget and Broyden (a rule with a history) with a
#: tolerance; CI all six.
RECOMPILE_CASES = [
    (name, tol)
    for name in ("picard", "anderson", "broyden")
    for tol in (None, 1e-5)
    if EVERYTHING or name == "picard" or (name, tol) == ("broyden", 1e-5)
]


@pytest.mark.parametrize(("name", "tol"), RECOMPILE_CASES)
def test_a_compiled_layer_does_not_recompile_per_iteration_count_or_batch_size(name, tol):
    # The solve runs outside the compiled graph (its iteration count depends on the data); what is
    # around it compiles once per shape, and a second batch size makes the shapes dynamic.
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), solver=RULES[name], max_iter=30, tol=tol)
    graphs, backend = _counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(deq, backend=backend)
    counts = []
    for batch in (3, 5, 7, 9, 3, 5, 7, 9):
        x = torch.randn(batch, 4, requires_grad=True)
        out = compiled(x)
        out.z.sum().backward()
        counts.append(len(graphs))
    torch.testing.assert_close(out.z, deq(x).z)
    if TORCH_VERSION >= (2, 11):
        # torch 2.4's dynamo retraces the code after the solve at every call (correct, not cached);
        # 2.11 and 2.13 were checked to cache it.
        assert counts[-1] - counts[0] <= 3, counts
        assert counts[3] == counts[-1], counts


def test_stochastic_jfb_draws_do_not_recompile_a_compiled_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    deq = DEQLayer(lambda z, x: torch.tanh(0.5 * lin(z) + x), solver=Picard(), grad=SJFB(seed=1), tol=None)
    deq.train()
    graphs, backend = _counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(deq, backend=backend)
    x = torch.randn(6, 4, requires_grad=True)
    compiled(x).z.sum().backward()  # warm-up: one draw
    warm = len(graphs)
    draws = set()
    for _ in range(8):
        compiled(x).z.sum().backward()
        draws.add(deq.grad.last_draw)
    assert len(draws) > 2  # the draws differed
    if TORCH_VERSION >= (2, 11):  # see the test above
        assert len(graphs) == warm


def test_importing_implicitdiff_and_solving_eagerly_load_neither_the_compiler_nor_optional_libraries():
    # torch._dynamo costs seconds per process (every DDP rank pays it) and a program that never compiles
    # has no use for it; torchdeq and scipy are the bench extra's. One subprocess checks all three, after
    # the import and after eager solves through each path that steps out of compiled graphs.
    check = (
        "bad = [m for m in ('torch._dynamo', 'torchdeq', 'scipy') if m in sys.modules]; assert not bad, bad; "
    )
    code = (
        "import sys, torch, implicitdiff, implicitdiff.solvers, implicitdiff.regularizers, implicitdiff.nn; "
        + check
        + "from implicitdiff import IFT, SJFB, DEQLayer, fixed_point, solve_chain; "
        "x = torch.ones(2, 3, requires_grad=True); "
        "fixed_point(lambda z, x: 0.5 * z + x, x, grad=IFT()).z.sum().backward(); "
        "DEQLayer(lambda z, x: 0.5 * z + x, grad=SJFB()).train()(x).z.sum().backward(); "
        "solve_chain(lambda k, z: 0.5 * z + 1.0, torch.zeros(3), 5); " + check
    )
    subprocess.run([sys.executable, "-c", code], check=True)
