"""The distributed guide's training script, as the page shows it, exits cleanly under ``torchrun``.

The script is read from ``docs/guides/distributed.md`` (the block marked as needing torchrun), so the page
and the test cannot drift apart. A script that destroys the process group while DDP's reducer still holds
it can deadlock at exit: the group's last reference then goes with the reducer, whose destructor runs
with the interpreter lock held and joins gloo's worker thread, which may be waiting for that lock to
free the last all-reduce (whose saved thread-local state holds a Python object).

That deadlock is a race, and whether the reducer holds the last reference depends on import order:
``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default argument of ten functions when it
is imported, so imported after ``init_process_group`` (DDP imports ``torch._dynamo``, which imports it) it
keeps the group alive to the end, and imported before (by ``import torch._dynamo`` at the top of a script,
or any library that does) it does not. The runs therefore import ``torch._dynamo`` first, and check the
script's order directly: ``destroy_process_group`` is wrapped to fail while a DDP model is alive.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from everything import EVERYTHING

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "distributed.md"
MARKER = r"<!-- docs-test: compile-only \(needs torchrun\) -->"
BLOCK = re.compile(MARKER + r"\n```python\n(?P<code>.*?)\n```", re.S)
#: Three interpreters under torchrun, about 14 s of both cores: CI runs it (twice: the order is checked in
#: every run, deterministic; the second gives the race itself one more chance), a local run leaves it to CI
#: (``CI=1 pytest tests/test_ddp_exit.py`` runs it here).
pytestmark = pytest.mark.skipif(
    not EVERYTHING, reason="three interpreters under torchrun: runs where CI is set (CI=1 to run it here)"
)
RUNS = 2
#: Seconds for one run: a few on an idle machine; a run that hangs at exit never ends.
RUN_TIMEOUT_S = 180
#: Runs the guide's script (argv[1]) unchanged, with torch._dynamo imported first and a check of its order.
LAUNCHER = """\
import gc
import runpy
import sys

import torch._dynamo  # noqa: F401  (before init_process_group: nothing keeps the group alive)
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

destroy = dist.destroy_process_group


def checked_destroy(*args, **kwargs):
    alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    if alive:
        raise RuntimeError(f"destroy_process_group() called while {alive} DDP model(s) hold the group")
    return destroy(*args, **kwargs)


dist.destroy_process_group = checked_destroy
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def guide_script() -> str:
    blocks = BLOCK.findall(GUIDE.read_text(encoding="utf-8"))
    assert len(blocks) == 1, f"expected one torchrun block in {GUIDE.name}, found {len(blocks)}"
    return blocks[0] + "\n"


def run_under_torchrun(script: Path) -> tuple[int | None, str, float]:
    """Return code (``None`` on timeout), output and seconds of one two-process run of ``script``."""
    launcher = script.with_name("launch.py")
    launcher.write_text(LAUNCHER, encoding="utf-8")
    start = time.monotonic()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*command, str(launcher), str(script)],
        cwd=script.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the launcher and its workers in one group, stopped together on a hang
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        return proc.returncode, out, time.monotonic() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - start


def test_the_guide_script_exits_cleanly_every_time(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(guide_script(), encoding="utf-8")
    for attempt in range(RUNS):
        code, out, seconds = run_under_torchrun(script)
        assert code is not None, f"run {attempt + 1} hung (killed after {seconds:.0f} s):\n{out[-3000:]}"
        assert code == 0, f"run {attempt + 1} exited {code}:\n{out[-3000:]}"
        # Rank 0 printed its last report: the run trained, then exited.
        assert re.search(r"^5 \S+ \(\d+, \d+\)$", out, re.M), out[-3000:]
