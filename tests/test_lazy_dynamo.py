"""``import implicitdiff`` does not import ``torch._dynamo`` (seconds of import, state kept to exit)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_library_and_solving_leave_torch_dynamo_unloaded() -> None:
    code = (
        "import sys, torch\n"
        "from implicitdiff import IFT, SJFB, DEQLayer, fixed_point\n"
        "x = torch.randn(2, 3, requires_grad=True)\n"
        "for grad in (IFT(), SJFB()):\n"
        "    DEQLayer(lambda z, x: torch.tanh(0.5 * z + x), grad=grad).train()(x).z.sum().backward()\n"
        "fixed_point(lambda z, x: 0.5 * z + x, x.detach())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
