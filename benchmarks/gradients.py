"""Gradient estimators: training memory and time against the forward cap, and IFT against torchdeq's.

Problem: ``f(z, x) = tanh(W z + x)``, ``d = 256``, batch 32, float64 (in float32 an absolute
backward tolerance of 1e-6 sits at the rounding floor of this problem, ~1e-6, for every solver),
``W`` a symmetric Gaussian matrix scaled to ``||W||_2 = 0.9`` (symmetric, so its spectral radius is
0.9 too: a non-symmetric Gaussian ``W`` of that norm has spectral radius about 0.45 and is easy),
``x = 0.1 * randn`` (small, so ``tanh`` stays in its linear range and the Jacobian
``diag(1 - z^2) W`` is close to ``W``).

Memory, two honest measures of one forward + backward of ``loss = sum(z^2)``:

* ``saved_mib``: bytes of the tensors autograd saves for the backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``, counting each storage once). This is the training
  memory that grows with unrolled iterations; our solves run without grad and add nothing to it.
* ``peak_mib``: peak bytes of live tensor storages created during forward + backward, tracked by a
  ``TorchDispatchMode`` that sees every op's outputs and a ``weakref.finalize`` on each (the CPU
  allocator keeps no statistics, and ``torch.profiler``'s CPU memory events proved incomplete here).
  It includes the solvers' working memory (Anderson's history) and the backward's temporaries.

A run of the unrolled solve (backpropagating through every Picard step) is included to show that both
measures do see memory that grows with the iterations. S-JFB runs like for like: its no-grad draw is
pinned to the cap and its differentiable steps to 3 (the most its default draws).

IFT against torchdeq compares backward against backward: both libraries' backward solves start from
the same ``z*``, solved in float64 to a residual far below the backward tolerance, so each gradient
error is that of the backward solve alone (see ``compare_with_torchdeq``).

Run: ``python -m benchmarks.gradients`` (writes ``benchmarks/results/gradients.json``); ``--quick`` measures
one repeat of two estimators and one backward solver.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import harness
from implicitdiff import IFT, JFB, SJFB, Anderson, Broyden, DEQLayer, PhantomGradient, Picard

D, BATCH, NORM, X_SCALE, SEED = 256, 32, 0.9, 0.1, 0
CAPS = (5, 50)
B_TOL, B_MAX_ITER = 1e-6, 100
REF_TOL, REF_MAX_ITER = 1e-12, 300
REPEATS = 3


class TanhCell(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight.T + x)


def make_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(SEED)
    A = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = A + A.T  # symmetric, so that the spectral radius equals the norm
    W = NORM * W / torch.linalg.matrix_norm(W, 2)
    x = X_SCALE * torch.randn(BATCH, D, generator=gen, dtype=torch.float64)
    return W.to(dtype), x.to(dtype)


class Unrolled:
    """Baseline, not an estimator of ours: Picard steps with grad all the way (memory grows with them)."""

    def __repr__(self) -> str:
        return "Unrolled()"

    def forward_budget(self, max_iter: int, *, training: bool) -> int:
        self.steps = max_iter
        return 0

    def attach(self, f_x, z_star, *, training: bool):
        z = z_star
        for _ in range(self.steps):
            z = f_x(z)
        return z


def estimators():
    """Each estimator, made for one forward cap (only S-JFB's settings depend on it)."""
    return {
        "IFT(Anderson)": lambda cap: IFT(solver=Anderson(), max_iter=B_MAX_ITER, tol=B_TOL),
        "IFT(Broyden)": lambda cap: IFT(solver=Broyden(), max_iter=B_MAX_ITER, tol=B_TOL),
        "IFT(Picard)": lambda cap: IFT(solver=Picard(), max_iter=B_MAX_ITER, tol=B_TOL),
        "JFB": lambda cap: JFB(),
        "Phantom(k=5,unrolled)": lambda cap: PhantomGradient(k=5, tau=0.5),
        "Phantom(k=5,neumann)": lambda cap: PhantomGradient(k=5, tau=0.5, mode="neumann"),
        # Like for like: S-JFB's no-grad draw pinned to the cap (its default draws 0 to 6 whatever the
        # cap) and its differentiable steps pinned to 3, the most its default (1 to 3) draws.
        "SJFB(no-grad = cap, grad 3)": lambda cap: SJFB(no_grad_iters=(cap, cap), grad_iters=(3, 3)),
        "unrolled (baseline)": lambda cap: Unrolled(),
    }


def saved_bytes(step) -> int:
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step(backward=False)
    loss.backward()
    return sum(storages.values())


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive that were created inside the mode.

    Every op's output tensors are seen at dispatch; a storage counts from its first output tensor until
    the last tensor that was returned on it is garbage-collected (``weakref.finalize``). CPU autograd
    runs the backward on the calling thread, so the backward's tensors are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key == 0:
                    continue
                if key not in self.refs:
                    self.refs[key] = 0
                    self.sizes[key] = storage.nbytes()
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out


def peak_live_bytes(step) -> int:
    gc.collect()
    with LiveTensorBytes() as mode:
        step(backward=True)
    return mode.peak


def measure_estimators(W, x, names: tuple[str, ...] | None = None, repeats: int = REPEATS):
    """Memory and time of each estimator (of ``names``, default all) at each forward cap."""
    rows = []
    for name, make in estimators().items():
        if names is not None and name not in names:
            continue
        for cap in CAPS:
            grad = make(cap)
            deq = DEQLayer(TanhCell(W), solver=Anderson(), grad=grad, max_iter=cap, tol=1e-30).train()

            def step(backward: bool, deq=deq):
                loss = deq(x).z.pow(2).sum()
                if backward:
                    loss.backward()
                return loss

            step(backward=True)  # warm-up
            saved = saved_bytes(step)
            peak = peak_live_bytes(step)
            walls = []
            for _ in range(repeats):
                deq.zero_grad(set_to_none=True)
                start = time.perf_counter()
                step(backward=True)
                walls.append(time.perf_counter() - start)
            row = {
                "estimator": name,
                "forward_cap": cap,
                "saved_mib": saved / 2**20,
                "peak_mib": peak / 2**20,
                "fwd_bwd_ms": 1e3 * statistics.median(walls),
            }
            if isinstance(grad, IFT):
                row["backward_nfe"] = grad.last_backward.nfe
                row["backward_residual"] = float(grad.last_backward.residual.max())
            rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["estimator"] == row["estimator"] and r["forward_cap"] == CAPS[0])
        row["saved_ratio"] = row["saved_mib"] / base["saved_mib"]
        row["peak_ratio"] = row["peak_mib"] / base["peak_mib"]
    return rows


def exact_gradient(W, x, z_star):
    """Dense float64 reference for ``d sum(z^2) / dW``: ``u = (I - J)^{-T} 2 z``, ``J = diag(1 - z^2) W``."""
    W, x, z = W.double(), x.double(), z_star.double()
    eye = torch.eye(D, dtype=torch.float64)
    J = (1 - z**2)[:, :, None] * W
    u = torch.linalg.solve((eye - J).transpose(1, 2), 2 * z)
    return (u * (1 - z**2)).T @ z, float(torch.linalg.eigvals(J[0]).abs().max())


def reference_solution(W, x):
    """``z*`` solved far below the backward tolerance (float64, residual ~1e-13): the point both backward
    solves start from, and at which the dense reference gradient is taken."""
    cell = TanhCell(W)
    with torch.no_grad():
        stats = DEQLayer(cell, solver=Anderson(), max_iter=REF_MAX_ITER, tol=REF_TOL)(x).stats
    assert stats.all_converged, f"reference solve missed {REF_TOL}: {float(stats.residual.max()):.1e}"
    return stats.z.detach(), float(stats.residual.max())


def compare_with_torchdeq(
    W, x, solvers: tuple[str, ...] = ("anderson", "broyden", "fixed_point_iter"), repeats: int = REPEATS
):
    """Backward against backward: each library's IFT backward solve from the same ``z*``.

    Both start from ``z_ref`` (``reference_solution``), so the gradient error in each row comes from its
    backward solve alone, not from how well a forward solve found the fixed point. Ours is
    ``IFT.attach`` (what ``DEQLayer`` does after its forward solve); torchdeq's is the IFT gradient
    function that ``get_deq(ift=True)`` builds (``torchdeq.grad.backward_factory(grad_type="ift")``,
    its ``torch.autograd.Function`` variant), given the same ``z_ref``. torchdeq linearises at
    ``f(z_ref)`` and we at ``z_ref``: at a residual of ~1e-13 the two points are the same to far below
    the tolerance.
    """
    from torchdeq.grad import backward_factory
    from torchdeq.solver import get_solver

    rows = []
    z_ref, ref_residual = reference_solution(W, x)
    exact_dW, rho = exact_gradient(W, x, z_ref)

    def timed_backward(loss):
        start = time.perf_counter()
        loss.backward()
        return 1e3 * (time.perf_counter() - start)

    def rel_err(cell):
        return float((cell.weight.grad - exact_dW).norm() / exact_dW.norm())

    for b_solver in solvers:
        ours_solver = {"anderson": Anderson(), "broyden": Broyden(), "fixed_point_iter": Picard()}[b_solver]
        # ours: the estimator attaches z_ref exactly as the layer does after its forward solve
        times, ift, cell = [], None, None
        for _ in range(repeats):
            cell = TanhCell(W)
            ift = IFT(solver=ours_solver, max_iter=B_MAX_ITER, tol=B_TOL, on_failure="ignore")
            z = ift.attach(lambda z, cell=cell: cell(z, x), z_ref, training=True)
            times.append(timed_backward(z.pow(2).sum()))
        rows.append(
            {
                "library": "implicitdiff",
                "backward_solver": b_solver,
                "backward_ms": statistics.median(times),
                "backward_nfe": ift.last_backward.nfe,
                "backward_residual": float(ift.last_backward.residual.max()),
                "converged": ift.last_backward.all_converged,
                "grad_rel_err": rel_err(cell),
            }
        )
        # torchdeq: its IFT gradient function, from the same z_ref
        times, infos = [], []
        for _ in range(repeats):
            cell = TanhCell(W)
            produce_grad = backward_factory(
                grad_type="ift",
                b_solver=get_solver(b_solver),
                b_solver_kwargs={"max_iter": B_MAX_ITER, "tol": B_TOL, "stop_mode": "abs"},
            )
            (z,) = produce_grad(None, lambda z, cell=cell: cell(z, x), z_ref.clone(), writer=infos.append)
            times.append(timed_backward(z.pow(2).sum()))
        info = infos[-1]
        residual = float(info["abs_lowest"].max())
        rows.append(
            {
                "library": "torchdeq 0.1.0",
                "backward_solver": b_solver,
                "backward_ms": statistics.median(times),
                "backward_nfe": int(info["nstep"].max()),
                "backward_residual": residual,
                "converged": residual <= B_TOL,
                "grad_rel_err": rel_err(cell),
            }
        )
    return rows, rho, ref_residual


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "gradients.json").parse_args(argv)
    started = harness.start()
    torch.set_num_threads(1)  # the machine is shared; one thread keeps timings comparable
    torch.manual_seed(SEED)
    W, x = make_problem()
    repeats = 1 if args.quick else REPEATS
    names = ("IFT(Anderson)", "JFB") if args.quick else None
    memory_rows = measure_estimators(W, x, names, repeats)
    solvers = ("anderson",) if args.quick else ("anderson", "broyden", "fixed_point_iter")
    torchdeq_rows, rho, ref_residual = compare_with_torchdeq(W, x, solvers, repeats)
    problem = {"f": "tanh(W z + x)", "d": D, "batch": BATCH, "dtype": "float64", "W_spectral_norm": NORM}
    problem.update(
        x=f"{X_SCALE} * randn", spectral_radius_of_J_sample0=rho, b_tol=B_TOL, b_max_iter=B_MAX_ITER
    )
    problem.update(z_ref_residual=ref_residual)
    record = {"problem": problem, "estimators": memory_rows, "ift_vs_torchdeq": torchdeq_rows}
    return harness.finish(args, "gradients.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
