"""distributed_step: a chain's sweeps split over two CPU processes (gloo) give one process's trajectory.

Each worker runs the same solves with the step wrapped; the parent runs them unwrapped (``spawned.py``
runs the workers).
"""

from __future__ import annotations

import pytest
import torch
from spawned import gloo_group, run_workers
from torch import Tensor

from implicitdiff import ChainSecant, Picard, distributed_step, solve_chain

WORLD = 2
STEPS, DIM, SAMPLES = 23, 5, 3
# Float64 noise of one step evaluated in a batch of another size, carried down the chain (as in
# test_chain.py): the only difference the split may make.
ROUNDING = 1e-12

#: (rule, form, window, max_batch of the wrapper): full and sliding windows, both forms, chunked shares.
CASES = [
    ("picard", "step", None, None),
    ("picard", "cumulative", 4, None),
    ("secant", "step", None, 2),
    ("secant", "cumulative", 7, None),
    ("secant", "cumulative", None, 3),
]


class Chain:
    """``x_{k+1} = tanh(A_k x_k + b_k)`` on ``(SAMPLES, DIM)`` states; counts the rows it evaluates."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(3)
        A = torch.randn(STEPS, DIM, DIM, generator=generator, dtype=torch.float64)
        self.A = 1.05 * A / torch.linalg.matrix_norm(A, ord=2)[:, None, None]
        self.b = torch.randn(STEPS, DIM, generator=generator, dtype=torch.float64)
        self.x0 = torch.randn(SAMPLES, DIM, generator=generator, dtype=torch.float64)
        self.rows = 0

    def step(self, k: Tensor, x: Tensor) -> Tensor:
        self.rows += k.shape[0]
        return torch.tanh(torch.einsum("kij,ksj->ksi", self.A[k], x) + self.b[k][:, None])

    def dict_step(self, k: Tensor, x: dict[str, Tensor]) -> dict[str, Tensor]:
        # A pytree state: the same chain with its state split in two leaves of other shapes.
        whole = self.step(k, torch.cat([x["head"], x["tail"].flatten(2)], dim=2))
        return {"head": whole[..., :2], "tail": whole[..., 2:].reshape(*whole.shape[:2], 1, DIM - 2)}


def solve(chain: Chain, step, case) -> dict:
    name, form, window, _ = case
    rule = ChainSecant(blocks=SAMPLES) if name == "secant" else Picard()
    out = solve_chain(step, chain.x0, STEPS, solver=rule, tol=1e-9, form=form, window=window)
    return {
        "zs": out.zs,
        "sweeps": out.sweeps,
        "evaluations": out.total_evaluations,
        "converged": out.all_converged,
    }


def _solve_all(rank: int) -> dict:
    report = {}
    for index, case in enumerate(CASES):
        chain = Chain()
        report[index] = solve(chain, distributed_step(chain.step, max_batch=case[3]), case)
        report[index]["rows"] = chain.rows
    chain = Chain()
    x0 = {"head": chain.x0[:, :2], "tail": chain.x0[:, 2:].reshape(SAMPLES, 1, DIM - 2)}
    out = solve_chain(distributed_step(chain.dict_step), x0, STEPS, tol=1e-9)
    report["dict"] = {
        "zs": torch.cat([out.zs["head"], out.zs["tail"].flatten(2)], dim=2),
        "sweeps": out.sweeps,
    }
    return report


def _worker(rank: int, store_path: str, results) -> None:
    with gloo_group(store_path, rank, WORLD, results):
        results[rank] = _solve_all(rank)


def test_two_processes_give_one_processs_trajectory_each_evaluating_half_the_steps(tmp_path):
    results = run_workers(_worker, (str(tmp_path / "store"),), WORLD)
    torch.set_num_threads(1)
    for index, case in enumerate(CASES):
        chain = Chain()
        alone = solve(chain, chain.step, case)
        assert alone["converged"], case
        for rank in range(WORLD):
            split = results[rank][index]
            assert (split["sweeps"], split["evaluations"]) == (alone["sweeps"], alone["evaluations"]), case
            # Both ranks gathered the same images: the same trajectory to the bit.
            assert torch.equal(split["zs"], results[0][index]["zs"]), case
            torch.testing.assert_close(split["zs"], alone["zs"], atol=ROUNDING, rtol=0)
            # Each rank evaluated its share of each call: ceil(rows / 2) of them, never all.
            assert (
                alone["evaluations"] / WORLD
                <= split["rows"]
                <= (alone["evaluations"] + alone["sweeps"]) / WORLD
            )
    chain = Chain()
    alone = solve_chain(chain.step, chain.x0, STEPS, tol=1e-9)
    for rank in range(WORLD):
        assert results[rank]["dict"]["sweeps"] == alone.sweeps
        torch.testing.assert_close(results[rank]["dict"]["zs"], alone.zs, atol=ROUNDING, rtol=0)


def test_distributed_step_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed_step(Chain().step)
