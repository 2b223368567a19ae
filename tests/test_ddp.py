"""Two CPU processes (gloo): a DEQLayer in DistributedDataParallel trains with each estimator and the
ranks' parameters stay identical.

Every process group is destroyed before its process exits (a live gloo group at interpreter exit can
abort with "terminate called without an active exception" under load), every wait has a deadline,
and a worker's failure comes back as its traceback.
"""

from __future__ import annotations

import datetime
import traceback
import warnings

import torch
import torch.distributed as dist
from spawned import run_workers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from implicitdiff import IFT, JFB, SJFB, DEQLayer, PhantomGradient, Picard

WORLD = 2
#: Seconds for the whole test's workers (about 10 s on 2 idle cores) and for a collective to wait.
DEADLINE_S = 300
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
ESTIMATORS = {
    "ift": lambda: IFT(max_iter=40, tol=1e-8),
    "jfb": JFB,
    "phantom": lambda: PhantomGradient(k=3, tau=0.5),
    "phantom-neumann": lambda: PhantomGradient(k=3, tau=0.5, mode="neumann"),
    "sjfb": lambda: SJFB(no_grad_iters=(0, 6), grad_iters=(1, 3), seed=7),
}


class Cell(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.inj = nn.Linear(d, d)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + self.inj(x))


def _worker(rank: int, store_path: str, results) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = _train_with_each_estimator(rank)
            report["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
            results[rank] = report
        finally:
            dist.destroy_process_group()
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise


def _train_with_each_estimator(rank: int) -> dict:
    report = {}
    for name, make in ESTIMATORS.items():
        torch.manual_seed(0)  # the same initial weights on both ranks
        grad = make()
        deq = DEQLayer(Cell(8), solver=Picard(), grad=grad, max_iter=30, tol=1e-6)
        ddp = DistributedDataParallel(deq)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
        draws = []
        for _ in range(3):
            x = torch.randn(4, 8, generator=gen)
            loss = (ddp(x).z - 0.3).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            draws.append(getattr(grad, "last_draw", None))
        flat = torch.cat([p.detach().reshape(-1) for p in deq.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        drawn = [None] * WORLD
        dist.all_gather_object(drawn, draws)
        report[name] = {
            "spread": float((gathered[0] - gathered[1]).abs().max()),
            "moved": float((flat - _initial(name)).abs().max()),
            "same_draws": drawn[0] == drawn[1],
        }
    return report


def _initial(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    deq = DEQLayer(Cell(8))
    return torch.cat([p.detach().reshape(-1) for p in deq.parameters()])


def _run_workers(store_path: str) -> dict:
    """Start the workers, wait at most ``DEADLINE_S``, and return their reports (or fail with theirs)."""
    return run_workers(_worker, (store_path,), WORLD, DEADLINE_S)


def test_ddp_ranks_stay_identical_with_each_estimator(tmp_path):
    results = _run_workers(str(tmp_path / "store"))
    assert sorted(results) == list(range(WORLD)), results
    for rank, report in results.items():
        assert "error" not in report, f"rank {rank}:\n{report.get('error')}"
        assert report.pop("warnings") == [], f"rank {rank} warned"  # e.g. a failed IFT backward solve
        assert set(report) == set(ESTIMATORS)
    assert results[0] == results[1]  # both ranks see the same gathered numbers
    for name, row in results[0].items():
        assert row["spread"] == 0.0, name
        assert row["moved"] > 1e-4, name  # it trained
        assert row["same_draws"], name
