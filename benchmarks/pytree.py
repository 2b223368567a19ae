"""A pytree state against a hand-flattened single tensor, at a 2-level MDEQ-like size, on the CPU.

Problem: batch 32, a state of two feature maps, ``fine`` (32 channels, 16x16) and ``coarse`` (64
channels, 8x8), and a convolutional ``f`` that mixes the resolutions the way MDEQ does::

    fine'   = tanh(conv3x3(fine) + upsample(conv1x1(coarse)) + x_fine)
    coarse' = tanh(conv3x3(coarse) + conv3x3_stride2(fine) + x_coarse)

The same ``f`` runs two ways, with the same weights:

* ``pytree``: ``z0 = {"fine": ..., "coarse": ...}``; the library packs the state into one ``(B, n)``
  working tensor and gives ``f`` the dict;
* ``flat``: what a user writes by hand without structured states: ``z0`` is one ``(B, n)`` tensor and
  ``f`` slices it into the two maps and concatenates its result.

Both run a fixed budget (``tol=None``, the same evaluations) with Anderson, forward only (no grad) and a
training step (forward + JFB backward), interleaved, the median of the repeats reported, on one
thread. The ratio is
``pytree / flat``; the target is at most 1.05.

Run: ``python benchmarks/pytree.py`` (writes ``benchmarks/results/pytree.json`` and prints a table).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from gradients import processor_name  # benchmarks/gradients.py
from torch import Tensor, nn

from implicitdiff import JFB, Anderson, DEQLayer

BATCH, FINE, COARSE = 32, (32, 16, 16), (64, 8, 8)
MAX_ITER, REPEATS, SEED, THREADS = 20, 15, 0, 1
OUT = Path(__file__).resolve().parent / "results" / "pytree.json"


class TwoScale(nn.Module):
    """The MDEQ-like map on a dict state ``{"fine", "coarse"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.fine = nn.Conv2d(FINE[0], FINE[0], 3, padding=1)
        self.coarse = nn.Conv2d(COARSE[0], COARSE[0], 3, padding=1)
        self.down = nn.Conv2d(FINE[0], COARSE[0], 3, stride=2, padding=1)
        self.up = nn.Conv2d(COARSE[0], FINE[0], 1)
        with torch.no_grad():
            for conv in (self.fine, self.coarse, self.down, self.up):
                conv.weight.mul_(0.3)

    def forward(self, z: dict[str, Tensor], x: dict[str, Tensor]) -> dict[str, Tensor]:
        up = nn.functional.interpolate(self.up(z["coarse"]), scale_factor=2.0, mode="nearest")
        fine = torch.tanh(self.fine(z["fine"]) + up + x["fine"])  # (B, 32, 16, 16)
        coarse = torch.tanh(self.coarse(z["coarse"]) + self.down(z["fine"]) + x["coarse"])  # (B, 64, 8, 8)
        return {"fine": fine, "coarse": coarse}


class HandFlat(nn.Module):
    """The same map on one ``(B, n)`` tensor, sliced and concatenated by hand."""

    def __init__(self, tree: TwoScale) -> None:
        super().__init__()
        self.tree = tree
        self.split = FINE[0] * FINE[1] * FINE[2]

    def forward(self, z: Tensor, x: dict[str, Tensor]) -> Tensor:
        batch = z.shape[0]
        state = {"fine": z[:, : self.split].reshape(batch, *FINE),
                 "coarse": z[:, self.split :].reshape(batch, *COARSE)}  # fmt: skip
        out = self.tree(state, x)
        return torch.cat([out["fine"].reshape(batch, -1), out["coarse"].reshape(batch, -1)], dim=1)


def timed(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    # One thread: on a shared 2-core machine two threads time the other users' load more than our code.
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    tree_f = TwoScale()
    flat_f = HandFlat(tree_f)
    x = {"fine": torch.randn(BATCH, *FINE), "coarse": torch.randn(BATCH, *COARSE)}
    z0_tree = {"fine": torch.zeros(BATCH, *FINE), "coarse": torch.zeros(BATCH, *COARSE)}
    z0_flat = torch.zeros(BATCH, FINE[0] * FINE[1] * FINE[2] + COARSE[0] * COARSE[1] * COARSE[2])
    layers = {
        "pytree": (DEQLayer(tree_f, solver=Anderson(m=5), grad=JFB(), max_iter=MAX_ITER, tol=None), z0_tree),
        "flat": (DEQLayer(flat_f, solver=Anderson(m=5), grad=JFB(), max_iter=MAX_ITER, tol=None), z0_flat),
    }

    def forward(name: str) -> None:
        layer, z0 = layers[name]
        with torch.no_grad():
            layer(x, z0)

    def train_step(name: str) -> None:
        layer, z0 = layers[name]
        out = layer(x, z0)
        loss = sum(leaf.square().mean() for leaf in (out.z.values() if name == "pytree" else [out.z]))
        loss.backward()

    # Same values both ways (the flat state holds the fine map first, as the packing does).
    with torch.no_grad():
        a, b = layers["pytree"][0](x, z0_tree), layers["flat"][0](x, z0_flat)
    assert torch.equal(a.stats.z, b.stats.z), "the two runs must compute the same thing"

    rows = []
    for mode, run in (("forward (no grad)", forward), ("train step (JFB)", train_step)):
        samples: dict[str, list[float]] = {"pytree": [], "flat": []}
        for name in samples:
            run(name)  # warm-up
        for _ in range(REPEATS):  # interleaved, so that load on the machine hits both alike
            for name in samples:
                samples[name] += timed(lambda name=name, run=run: run(name), 1)
        tree_ms = 1e3 * statistics.median(samples["pytree"])
        flat_ms = 1e3 * statistics.median(samples["flat"])
        rows.append({"mode": mode, "pytree_ms": tree_ms, "flat_ms": flat_ms, "ratio": tree_ms / flat_ms})

    meta = {
        "batch": BATCH,
        "leaves": {"fine": list(FINE), "coarse": list(COARSE)},
        "solver": "Anderson(m=5)",
        "evaluations": MAX_ITER,
        "repeats": REPEATS,
        "machine": platform.platform(),
        "processor": processor_name(),
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(
        f"{meta['processor']}, {meta['threads']} threads, torch {meta['torch']}, load {meta['load_1min']:.1f}"
    )
    print(f"{'mode':<20} {'pytree ms':>10} {'flat ms':>10} {'ratio':>7}")
    for row in rows:
        print(f"{row['mode']:<20} {row['pytree_ms']:>10.1f} {row['flat_ms']:>10.1f} {row['ratio']:>7.3f}")


if __name__ == "__main__":
    main()
