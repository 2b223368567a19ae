"""Solve and differentiate a small deep equilibrium layer, and print what each solver spent.

Run: python examples/quickstart.py
"""

import torch
from torch import nn

from implicitdiff import JFB, Anderson, Broyden, DEQLayer, Picard


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + x)`` with the spectral norm of ``W`` held at 0.9."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.utils.parametrizations.spectral_norm(nn.Linear(dim, dim, bias=False))
        self.scale = 0.9

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale * self.linear(z) + x)


def main() -> None:
    torch.manual_seed(0)
    cell = TanhCell(64)
    x = 0.3 * torch.randn(32, 64)
    target = torch.randn(32, 64)
    print(f"{'solver':<12} {'nfe':>4} {'max residual':>13} {'converged':>10} {'loss':>8}")
    for solver in (Picard(), Anderson(m=5), Broyden(memory=20)):
        deq = DEQLayer(cell, solver=solver, grad=JFB(), max_iter=200, tol=1e-6)
        out = deq(x)
        loss = (out.z - target).pow(2).mean()
        cell.zero_grad()
        loss.backward()
        stats = out.stats
        print(
            f"{type(solver).__name__:<12} {stats.nfe:>4} {float(stats.residual.max()):>13.2e} "
            f"{int(stats.converged.sum()):>5}/{stats.converged.numel():<4} {loss.item():>8.4f}"
        )
    grad_norm = cell.linear.parametrizations.weight.original.grad.norm().item()
    print(f"JFB gradient norm of W: {grad_norm:.4f}")


if __name__ == "__main__":
    main()
