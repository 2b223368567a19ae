"""A multiscale deep equilibrium classifier (MDEQ, Bai et al. 2020) on scikit-learn's bundled digits.

The state is two feature maps at two resolutions, ``{"fine": (B, 16, 8, 8), "coarse": (B, 32, 4, 4)}``,
solved together as one fixed point: each resolution is updated from itself (a weight-normalised 3x3
convolution, GroupNorm) and from the other (a strided convolution down, a 1x1 convolution and
upsampling up), with channel-wise variational dropout whose mask holds for the whole solve. The
classifier reads the coarse map of the fixed point, which the fine map feeds. Gradients by JFB or
phantom gradients (``--grad``), optionally with the Jacobian penalty of Bai et al. 2021 (``--jac-reg``).

Run: ``python examples/mdeq/train.py`` (both estimators, a few epochs, about a minute on 2 CPU cores);
``--grad jfb``, ``--epochs 3``, ``--jac-reg 0.5``, ``--json results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils import _pytree as pytree

from implicitdiff import JFB, Anderson, DEQLayer, PhantomGradient, regularizers
from implicitdiff.nn import VariationalDropout2d

FINE, COARSE = 16, 32  # channels at 8x8 and at 4x4
ESTIMATORS = {"jfb": JFB, "phantom": lambda: PhantomGradient(k=5, tau=0.5)}


def conv(c_in: int, c_out: int, kernel: int, stride: int = 1, gain: float = 1.0) -> nn.Module:
    """A weight-normalised convolution (W = g v / ||v||), its gains scaled to ``gain`` at the start."""
    layer = weight_norm(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(gain)
    return layer


class MultiscaleCell(nn.Module):
    """``f(z, x)`` on the two-resolution state: each map from itself, the other one and its injection."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.fine, self.coarse = conv(FINE, FINE, 3, gain=0.3), conv(COARSE, COARSE, 3, gain=0.3)
        self.down, self.up = conv(FINE, COARSE, 3, stride=2, gain=0.3), conv(COARSE, FINE, 1, gain=0.3)
        self.norm_fine, self.norm_coarse = nn.GroupNorm(4, FINE), nn.GroupNorm(4, COARSE)
        self.drop_fine, self.drop_coarse = VariationalDropout2d(dropout), VariationalDropout2d(dropout)

    def forward(self, z: dict[str, Tensor], x: dict[str, Tensor]) -> dict[str, Tensor]:
        up = nn.functional.interpolate(self.up(z["coarse"]), scale_factor=2.0)  # (B, 16, 8, 8)
        fine = self.norm_fine(self.drop_fine(self.fine(z["fine"])) + up + x["fine"])  # (B, 16, 8, 8)
        coarse = self.drop_coarse(self.coarse(z["coarse"])) + self.down(z["fine"]) + x["coarse"]
        return {"fine": torch.tanh(fine), "coarse": torch.tanh(self.norm_coarse(coarse))}  # (B, 32, 4, 4)


class MDEQ(nn.Module):
    """Stem (the injections), one implicit layer over both resolutions, a linear head on the coarse map."""

    def __init__(self, grad: str, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem_fine = nn.Conv2d(1, FINE, 3, padding=1)
        self.stem_coarse = nn.Conv2d(FINE, COARSE, 3, stride=2, padding=1)
        self.deq = DEQLayer(
            MultiscaleCell(dropout),
            solver=Anderson(m=5),
            grad=ESTIMATORS[grad](),
            max_iter=30,
            tol=1e-2,
            stop_mode="rel",  # ||f(z) - z|| / ||f(z)||: the state has 1,536 entries per image
        )
        self.head = nn.Linear(COARSE * 4 * 4, 10)

    def inject(self, images: Tensor) -> dict[str, Tensor]:
        fine = self.stem_fine(images)  # (B, 16, 8, 8)
        return {"fine": fine, "coarse": self.stem_coarse(torch.relu(fine))}  # (B, 32, 4, 4)

    def forward(self, images: Tensor):
        x = self.inject(images)
        z0 = {key: torch.zeros_like(value) for key, value in x.items()}
        out = self.deq(x, z0)
        return self.head(out.z["coarse"].flatten(1)), out, x  # logits (B, 10)


def jacobian_penalty(model: MDEQ, z: dict[str, Tensor], x: dict[str, Tensor]) -> Tensor:
    """Hutchinson's estimate of ||J_f||_F^2 / d at the fixed point (one extra evaluation of f)."""
    z_leaf = pytree.tree_map(lambda t: t.detach().requires_grad_(), z)
    image = model.deq.f(z_leaf, x)
    return regularizers.jacobian_frobenius(image, z_leaf).mean()


def load(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target)
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=0.2, random_state=seed, stratify=digits.target)
    return images[train], labels[train], images[test], labels[test]


def evaluate(model: MDEQ, images: Tensor, labels: Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits, out, _ = model(images)
    return {
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
        "nfe": out.stats.nfe,
        "converged": float(out.stats.converged.float().mean()),
        "max_residual": float(out.stats.residual.max()),
    }


def train(grad: str, epochs: int, jac_reg: float, seed: int, batch: int = 64) -> dict[str, object]:
    """Train one model; return its test metrics, seconds per epoch and the training solves' statistics."""
    train_x, train_y, test_x, test_y = load(seed)
    torch.manual_seed(seed)
    model = MDEQ(grad)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    epoch_seconds, train_nfe = [], []
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(train_y))
        for first in range(0, len(order), batch):
            rows = order[first : first + batch]
            logits, out, x = model(train_x[rows])
            loss = nn.functional.cross_entropy(logits, train_y[rows])
            if jac_reg > 0:
                loss = loss + jac_reg * jacobian_penalty(model, out.z, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            train_nfe.append(out.stats.nfe)
        epoch_seconds.append(time.perf_counter() - start)
        steps = len(range(0, len(order), batch))
        print(f"[{grad}] epoch {epoch + 1}: loss {float(loss.detach()):.3f}, {epoch_seconds[-1]:.1f} s, "
              f"forward nfe {statistics.mean(train_nfe[-steps:]):.1f}")  # fmt: skip
    metrics = evaluate(model, test_x, test_y)
    return {"grad": grad, **metrics, "seconds_per_epoch": statistics.mean(epoch_seconds),
            "train_nfe": statistics.mean(train_nfe), "epochs": epochs, "jac_reg": jac_reg}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grad", nargs="+", choices=sorted(ESTIMATORS), default=["jfb", "phantom"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--jac-reg", type=float, default=0.0, help="weight of the Jacobian penalty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="the maps are small: 1 beats 2 on a busy CPU")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [train(grad, args.epochs, args.jac_reg, args.seed) for grad in args.grad]
    print(f"\n{'grad':<8} {'test acc':>8} {'s/epoch':>8} {'train nfe':>9} {'test nfe':>8} "
          f"{'converged':>9} {'max res':>8}")  # fmt: skip
    for r in results:
        print(f"{r['grad']:<8} {r['accuracy']:>8.3f} {r['seconds_per_epoch']:>8.1f} {r['train_nfe']:>9.1f} "
              f"{r['nfe']:>8} {r['converged']:>9.2f} {r['max_residual']:>8.1e}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
