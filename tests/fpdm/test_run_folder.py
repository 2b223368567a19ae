"""The run folder: one owner by a kernel lock, nothing written before the run is accepted, files that
follow the umask.

A lock is taken over when its owner is provably gone (the kernel's lock is free) or is this very process;
a record whose owner may still run (another host's, or one written without a kernel lock whose pid is
alive) is refused, and every refusal names the lock file and the command that clears it.
"""

import contextlib
import json
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fpdm import run_folder
from fpdm import training as train
from fpdm.diffusion import GaussianDiffusion
from fpdm.files import save_atomically, save_json_atomically, save_npz_atomically
from fpdm.run_folder import RunLock
from fpdm.training import CHECKPOINT_NAME, LOG_NAME, load_checkpoint
from test_command_lines import TINY, exit_status  # the same tiny model and exit-status reader

# The documented exit statuses and the lock's name, written out: the tests pin them.
EXIT_NON_FINITE, EXIT_USAGE = 1, 2
LOCK_NAME = "train.lock"
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "fpdm"


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def write_record(out: Path, **owner) -> Path:
    """A lock file as a run leaves it behind (no process holds its kernel lock)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **owner}
    (out / LOCK_NAME).write_text(json.dumps(record))
    return out / LOCK_NAME


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return int(proc.stdout)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from fpdm.run_folder import RunLock
lock = RunLock(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def holding_lock(out: Path, name: str = LOCK_NAME, program: str = "train.py"):
    """A live process that holds the ``RunLock`` ``out / name`` of ``program``; yields its pid."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE_DIR), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", HOLD_LOCK, str(out), name, program]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"held\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def live_owner(tmp_path):
    """A live process that holds the lock of ``tmp_path / "run"`` (train.py's RunLock)."""
    with holding_lock(tmp_path / "run") as pid:
        yield tmp_path / "run", pid


# ------------------------------------------------------------------------------------------------------
# Taken over when the owner is provably gone, or is this process
# ------------------------------------------------------------------------------------------------------


def test_a_lock_naming_this_process_own_pid_is_taken_over(tmp_path, capsys):
    # A container restarted with the same hostname runs train.py as pid 1 again: the lock it left names
    # the new process's own pid. This process has not locked it (it would hold the kernel lock), so an
    # earlier one did.
    out = tmp_path / "run"
    write_record(out)
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0
    assert f"taking over the lock of pid {os.getpid()}, this process's own pid" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 1


@pytest.mark.parametrize("content", ["", '{"pid": 12', "\x00\x00\x00"], ids=["empty", "truncated", "zeros"])
def test_an_empty_or_damaged_lock_is_taken_over_not_retried_forever(tmp_path, content, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(content)
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0
    assert "try again" not in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists() and load_checkpoint(out / CHECKPOINT_NAME)["step"] == 1


def test_a_stale_lock_whose_pid_now_belongs_to_another_program_is_taken_over(tmp_path, capsys):
    # The run that wrote the lock held its kernel lock; that lock is free, so the run is gone, whatever
    # process has its pid now.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_record(tmp_path / "run", pid=other.pid, lock="flock")
        assert train.main(["--out", str(tmp_path / "run"), *TINY, "--steps", "1"]) == 0
    finally:
        other.kill()
        other.wait()
    assert f"taking over the lock of pid {other.pid}, which is no longer running" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------
# Refused while the owner may run: one line naming the lock file and the command that clears it
# ------------------------------------------------------------------------------------------------------


def test_a_live_owner_is_refused_naming_the_lock_file_and_the_command_that_stops_it(live_owner, capsys):
    out, pid = live_owner
    before = (out / LOCK_NAME).read_bytes()
    status, err = exit_status(train.main, ["--out", str(out), *TINY, "--steps", "1"], capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert f"is in use by train.py pid {pid} on this host" in err
    assert f"it holds {out / LOCK_NAME}" in err and f"`kill {pid}`" in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME] and (out / LOCK_NAME).read_bytes() == before


def test_a_lock_written_without_a_kernel_lock_by_a_live_pid_is_refused_with_the_way_out(tmp_path, capsys):
    # An older version's pid file: its pid may be that run, or a reused pid; the message says how to tell.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = write_record(tmp_path / "run", pid=other.pid)
        status, err = exit_status(train.main, ["--out", str(tmp_path / "run"), *TINY, "--steps", "1"], capsys)
    finally:
        other.kill()
        other.wait()
    assert status == EXIT_USAGE and one_line(err) and f"pid {other.pid} on this host" in err
    assert f"`rm {path}`" in err and f"if pid {other.pid} is not that run" in err


def test_a_lock_of_another_host_is_refused_with_the_command_that_clears_it(tmp_path, capsys):
    path = write_record(tmp_path / "run", pid=1, host="some-other-node", lock="flock")
    status, err = exit_status(train.main, ["--out", str(tmp_path / "run"), *TINY, "--steps", "1"], capsys)
    assert status == EXIT_USAGE and one_line(err)
    assert "pid 1 on host some-other-node" in err and f"`rm {path}`" in err


def test_a_pid_owned_by_another_user_is_alive_not_dead(tmp_path, monkeypatch):
    # os.kill(pid, 0) on another user's process raises PermissionError: the process exists.
    pid, real_kill = dead_pid(), os.kill

    def kill(target, signum):
        if target == pid:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(target, signum)

    write_record(tmp_path, pid=pid)
    monkeypatch.setattr(run_folder.os, "kill", kill)
    with pytest.raises(ValueError, match=f"in use by train.py pid {pid} on this host"):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()  # the same record with the pid dead is taken over
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_a_lock_released_while_a_contender_opens_it_leaves_one_owner(tmp_path, monkeypatch):
    # The owner deletes the file as it lets go; a contender that had opened the old file gets its kernel
    # lock on a file no longer at the path, and must lock the file at the path instead.
    import fcntl

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    real_flock, calls = fcntl.flock, []

    def flock_after_release(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            first.release()  # between the contender's open and its flock
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_release)
    second.acquire()
    monkeypatch.undo()
    assert len(calls) == 2  # the first file was dropped, the second locked
    with pytest.raises(ValueError, match="is in use"):
        RunLock(tmp_path).acquire()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def started_then_asleep(started) -> None:
    started.set()
    time.sleep(120)


def test_a_forked_child_does_not_keep_the_lock_of_an_owner_that_died(tmp_path):
    # DataLoader workers are forked: they must not hold the owner's lock after it is gone.
    lock = RunLock(tmp_path)
    lock.acquire()
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=started_then_asleep, args=(started,))
    child.start()
    try:
        assert started.wait(timeout=60)  # the child runs (what happens at a fork is done)
        os.close(lock._fd)  # the owner dies: the system closes its descriptors, the file stays
        lock._fd = None
        other = RunLock(tmp_path)
        other.acquire()  # refused if the child still held the lock
        other.release()
    finally:
        child.kill()
        child.join()


# ------------------------------------------------------------------------------------------------------
# Nothing is written before the run is accepted
# ------------------------------------------------------------------------------------------------------


def loss_goes_infinite_at(call: int, monkeypatch) -> None:
    real_loss, calls = GaussianDiffusion.training_loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value, state = real_loss(self, *args, **kwargs)
        return (value * float("inf") if len(calls) == call else value), state

    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss)


def test_a_refused_or_failed_start_leaves_nothing_in_the_way_of_the_corrected_command(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    status, err = exit_status(train.main, ["--out", str(out), *TINY, "--batch-size", "5000"], capsys)
    assert status == EXIT_USAGE and "--batch-size 5000 exceeds the dataset" in err and not out.exists()
    # A run that stops before its first log record or checkpoint (a loss that overflows at step 2 of a
    # run that logs every 10 steps) has written nothing either.
    argv = ["--out", str(out), *TINY, "--steps", "3", "--log-every", "10", "--ckpt-every", "10"]
    loss_goes_infinite_at(2, monkeypatch)
    status, err = exit_status(train.main, argv, capsys)
    assert status == EXIT_NON_FINITE and "non-finite training loss" in err and not out.exists()
    monkeypatch.undo()
    assert train.main(argv) == 0  # the corrected command is not told that the folder holds a run
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 3


def test_overwrite_keeps_the_old_run_until_the_new_one_writes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *TINY, "--steps", "2", "--log-every", "1"]) == 0
    before = {name: (out / name).read_bytes() for name in (CHECKPOINT_NAME, LOG_NAME)}
    loss_goes_infinite_at(1, monkeypatch)
    status, _ = exit_status(train.main, ["--out", str(out), *TINY, "--steps", "3", "--overwrite"], capsys)
    assert status == EXIT_NON_FINITE
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_an_empty_log_left_by_an_older_version_is_not_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOG_NAME).write_text("")
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0


# ------------------------------------------------------------------------------------------------------
# Every file follows the umask
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    try:
        yield 0o640  # what a new file's mode is under it
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_checkpoint_and_the_log_follow_the_umask(tmp_path, umask_027):
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *TINY, "--steps", "1"]) == 0
    assert mode(out / CHECKPOINT_NAME) == mode(out / LOG_NAME) == umask_027


def test_every_atomic_writer_follows_the_umask(tmp_path, umask_027):
    written = [
        save_atomically({"x": torch.zeros(2)}, tmp_path / "a.pt"),
        save_npz_atomically(tmp_path / "b.npz", x=np.zeros(2)),
        save_json_atomically({"x": 1}, tmp_path / "c.json"),
    ]
    assert [mode(path) for path in written] == [umask_027] * 3
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_failed_json_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path):
    path = save_json_atomically({"x": 1}, tmp_path / "c.json")
    with pytest.raises(TypeError):  # not JSON: fails while writing the temporary file
        save_json_atomically({"x": object()}, path)
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]
