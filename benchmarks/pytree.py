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

Run: ``python -m benchmarks.pytree`` (writes ``benchmarks/results/pytree.json`` and prints a table);
``--quick`` runs one repeat on a batch of 4.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from benchmarks import harness
from implicitdiff import JFB, Anderson, DEQLayer

BATCH, FINE, COARSE = 32, (32, 16, 16), (64, 8, 8)
MAX_ITER, REPEATS, SEED, THREADS = 20, 15, 0, 1


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


def main(argv: list[str] | None = None) -> int:
    args = harness.parser(__doc__, "pytree.json").parse_args(argv)
    started = harness.start()
    # One thread: on a shared 2-core machine two threads time the other users' load more than our code.
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    batch = 4 if args.quick else BATCH
    tree_f = TwoScale()
    flat_f = HandFlat(tree_f)
    x = {"fine": torch.randn(batch, *FINE), "coarse": torch.randn(batch, *COARSE)}
    z0_tree = {"fine": torch.zeros(batch, *FINE), "coarse": torch.zeros(batch, *COARSE)}
    z0_flat = torch.zeros(batch, FINE[0] * FINE[1] * FINE[2] + COARSE[0] * COARSE[1] * COARSE[2])
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
    if not torch.equal(a.stats.z, b.stats.z):
        raise RuntimeError("the dict state and the hand-flattened state must compute the same thing")

    repeats = 1 if args.quick else REPEATS
    rows = []
    for mode, run in (("forward (no grad)", forward), ("train step (JFB)", train_step)):
        timing = harness.interleaved({name: lambda name=name, run=run: run(name) for name in layers}, repeats)
        tree_ms, flat_ms = 1e3 * timing["pytree"].wall, 1e3 * timing["flat"].wall
        rows.append({"mode": mode, "pytree_ms": tree_ms, "flat_ms": flat_ms, "ratio": tree_ms / flat_ms})
    settings = {"batch": batch, "leaves": {"fine": list(FINE), "coarse": list(COARSE)}}
    settings.update(solver="Anderson(m=5)", evaluations=MAX_ITER, repeats=repeats)
    record = {"settings": settings, "rows": rows}
    return harness.finish(args, "pytree.json", record, started)


if __name__ == "__main__":
    sys.exit(main())
