"""The grid of 252 small chains on which rules of :func:`implicitdiff.solve_chain` are compared.

Each chain is ``z_{k+1} = act(A_k z_k + b_k)`` in 6 dimensions with ``||A_k||_2`` the chain's gain
(:class:`ToyChain`): 12, 30 and 60 steps, gains 0.5 to 1.1, tanh and affine (an expanding affine chain
overflows, so it is left out), both forms, the full window and 8, three seeds; float64, ``tol=1e-8``.
:func:`grid_sweeps` solves one chain with a rule and checks the result against the sequential rollout
(the residuals it reports are the trajectory's own, and every state is within the distance the residuals
allow); ``benchmarks/chain.py`` counts the sweeps of every rule over the grid.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor

from implicitdiff import ChainResult, solve_chain

#: The maps ``solve_chain`` iterates (its ``form=``).
FORMS = ("cumulative", "step")
TOL = 1e-8
#: float64 rounding allowed per step when a reported residual is recomputed or an error bound is summed.
ROUNDING = 1e-12

GRID: list[dict[str, Any]] = [
    {"steps": steps, "gain": gain, "act": act, "form": form, "window": window, "seed": seed}
    for steps, gain, act, form, window, seed in itertools.product(
        (12, 30, 60), (0.5, 0.8, 0.95, 1.1), ("tanh", "affine"), FORMS, (None, 8), (0, 1, 2)
    )
    if not (act == "affine" and gain > 1)
]


class ToyChain:
    """``z_{k+1} = act(A_k z_k + b_k)`` with ``||A_k||_2 = gain_k``: Lipschitz ``gain_k`` per step.

    Counts every call of ``step`` (``calls``), every step it is asked for (``asked``) and the largest
    call (``largest_call``), which the tests read.
    """

    def __init__(self, num_steps: int, dim: int, gains: list[float], seed: int, act: str) -> None:
        generator = torch.Generator().manual_seed(seed)
        A = torch.randn(num_steps, dim, dim, generator=generator, dtype=torch.float64)
        scale = torch.tensor(gains, dtype=torch.float64) / torch.linalg.matrix_norm(A, ord=2)
        self.A = A * scale[:, None, None]
        self.b = torch.randn(num_steps, dim, generator=generator, dtype=torch.float64)
        self.z0 = torch.randn(dim, generator=generator, dtype=torch.float64)
        self.lipschitz = torch.linalg.matrix_norm(self.A, ord=2)  # tanh is 1-Lipschitz
        self.act = torch.tanh if act == "tanh" else (lambda y: y)
        self.calls = 0
        self.asked = torch.zeros(num_steps, dtype=torch.long)
        self.largest_call = 0

    def step(self, k: Tensor, z: Tensor) -> Tensor:
        assert k.dtype == torch.long and k.dim() == 1 and z.shape[0] == k.shape[0]
        self.calls += 1
        self.asked += torch.bincount(k, minlength=self.asked.shape[0])
        self.largest_call = max(self.largest_call, k.shape[0])
        return self.act(torch.einsum("kij,kj->ki", self.A[k], z) + self.b[k])

    def rollout(self) -> Tensor:
        """The sequential trajectory ``z_0 .. z_N``."""
        zs = [self.z0]
        for k in range(self.A.shape[0]):
            zs.append(self.act(self.A[k] @ zs[-1] + self.b[k]))
        return torch.stack(zs)


def error_bound(chain: ToyChain, residual: Tensor) -> Tensor:
    """``e_{k+1} <= L_k e_k + r_k``, ``e_0 = 0``: the distance to the rollout the residuals allow."""
    bound, out = 0.0, []
    for k in range(residual.shape[0]):
        bound = float(chain.lipschitz[k]) * bound + float(residual[k])
        out.append(bound)
    return torch.tensor(out, dtype=torch.float64)


def check_against_rollout(chain: ToyChain, out: ChainResult, tol: float) -> None:
    """Raise ``AssertionError`` unless ``out`` is a converged trajectory of ``chain`` within its bound."""
    steps = chain.A.shape[0]
    problems = []
    if out.zs.shape != (steps + 1, chain.z0.shape[0]) or not torch.equal(out.zs[0], chain.z0):
        problems.append(f"trajectory of shape {tuple(out.zs.shape)} not starting at z0")
    elif not out.all_converged or float(out.residual.max()) > tol:
        problems.append(f"not converged: largest residual {float(out.residual.max()):.1e} > {tol:g}")
    else:
        images = chain.act(torch.einsum("kij,kj->ki", chain.A, out.zs[:-1]) + chain.b)
        actual = torch.linalg.vector_norm(images - out.zs[1:], dim=1)
        if not torch.allclose(out.residual, actual, atol=ROUNDING, rtol=0):
            problems.append("the residuals reported are not those of the returned trajectory")
        error = torch.linalg.vector_norm(out.zs[1:] - chain.rollout()[1:], dim=1)
        slack = ROUNDING * torch.arange(1, steps + 1, dtype=torch.float64)
        if not torch.all(error <= error_bound(chain, out.residual) + slack):
            problems.append(
                f"a state is further from the rollout than its residuals allow: {error.max():.1e}"
            )
    if problems:
        raise AssertionError("; ".join(problems))


def chain_of(case: dict[str, Any]) -> ToyChain:
    """The chain of grid ``case``: 6 dimensions, the case's gain at every step."""
    return ToyChain(case["steps"], 6, [case["gain"]] * case["steps"], case["seed"], case["act"])


def grid_sweeps(case: dict[str, Any], solver: Any) -> ChainResult:
    """Solve the chain of grid ``case`` with ``solver`` (``None``: Picard), checked against its rollout."""
    chain = chain_of(case)
    out = solve_chain(
        chain.step, chain.z0, case["steps"], solver=solver, tol=TOL, form=case["form"], window=case["window"]
    )
    check_against_rollout(chain, out, TOL)
    return out
