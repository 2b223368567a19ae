"""Two CPU processes (gloo): a DEQLayer in DistributedDataParallel trains with each estimator and the
ranks' parameters stay identical."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from implicitdiff import IFT, JFB, SJFB, DEQLayer, PhantomGradient, Picard

WORLD = 2
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
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
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
        results[rank] = report
    finally:
        dist.destroy_process_group()


def _initial(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    deq = DEQLayer(Cell(8))
    return torch.cat([p.detach().reshape(-1) for p in deq.parameters()])


def test_ddp_ranks_stay_identical_with_each_estimator(tmp_path):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(str(tmp_path / "store"), results), nprocs=WORLD, start_method="spawn")
    report = results[0]
    assert set(report) == set(ESTIMATORS)
    for name, row in report.items():
        assert row["spread"] == 0.0, name
        assert row["moved"] > 1e-4, name  # it trained
        assert row["same_draws"], name
