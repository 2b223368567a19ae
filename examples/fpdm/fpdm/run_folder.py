"""A training run's folder: who owns it, the rules for starting, continuing or replacing a run, its files.

A folder that holds a run (``checkpoint.pt``, or a ``log.jsonl`` with something in it) is continued with
``resume``, started again with ``overwrite``, and never touched otherwise. A resume compares the
checkpoint's stored configuration with the request field by field (:func:`compare_configs`): the config
class's ``REFUSED_ON_RESUME`` fields may not change; the others are applied with a notice; its
``RUNTIME_FIELDS`` are not compared. Nothing in the folder changes before the run writes its first log
record or checkpoint (:class:`RunFolder`): a run refused or failed before that leaves the folder as it was.

A folder has one owner at a time (:class:`RunLock`): the process holding an exclusive ``flock`` on its lock
file, ``train.lock`` (``sample.lock`` for ``sample.py``, ``extract.lock`` for ``extract_latents.py``),
which also records the owner for the messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fpdm.cli import UsageError, check_config, flag
from fpdm.distributed import Runtime, run_on_main
from fpdm.files import FileKindError, load_tensors, read_jsonl, save_atomically

__all__ = [
    "CHECKPOINT_NAME",
    "LOCK_NAME",
    "LOG_NAME",
    "RunFolder",
    "RunLock",
    "checked_config",
    "compare_configs",
    "load_checkpoint",
    "stored_config",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
LOCK_NAME = "train.lock"
CHECKPOINT_KIND = "a checkpoint written by train.py"


# ----------------------------------------------------------------------------------------------------
# The checkpoint and its configuration
# ----------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only, no pickled code).

    Raises
    ------
    files.FileKindError
        One line naming the file, when it is missing, damaged or not a checkpoint of ``train.py``.
    """
    return load_tensors(path, CHECKPOINT_KIND, keys=("step", "model", "config"))


def stored_config(ckpt: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """A checkpoint's configuration as keyword arguments of ``config_cls``; a field it predates counts as
    that field's default."""
    defaults = dataclasses.asdict(config_cls())
    saved = ckpt.get("config", {})
    return {name: saved.get(name, default) for name, default in defaults.items()}


def checked_config(ckpt: dict[str, Any], path: str | Path, config_cls: type) -> Any:
    """A checkpoint's configuration as a ``config_cls`` whose every field passes its rules
    (:func:`cli.check_config`), so that this version of the code can build what it names.

    Raises
    ------
    files.FileKindError
        Naming the checkpoint and the field that does not fit (a model preset this version does not know,
        an estimator it does not have, a value out of range).
    """
    config = config_cls(**stored_config(ckpt, config_cls))
    try:
        check_config(config)
    except ValueError as error:
        raise FileKindError(f"{path}: its config is not one this version can build: {error}") from None
    return config


def compare_configs(saved: dict[str, Any], cfg: Any) -> tuple[list[str], list[str]]:
    """The fields in which ``cfg`` differs from a checkpoint's configuration, as ``"--flag OLD -> NEW"``.

    Returns ``(refused, applied)``: changes of the config class's ``REFUSED_ON_RESUME`` fields, and the
    others (its ``RUNTIME_FIELDS``, such as ``--device``, are not compared).
    """
    refused, applied = [], []
    for name, value in dataclasses.asdict(cfg).items():
        if name in cfg.RUNTIME_FIELDS or json.dumps(saved[name]) == json.dumps(value):
            continue
        change = f"{flag(name)} {saved[name]!r} -> {value!r}"
        (refused if name in cfg.REFUSED_ON_RESUME else applied).append(change)
    return refused, applied


# ----------------------------------------------------------------------------------------------------
# The folder as one run uses it: taken, written, given back
# ----------------------------------------------------------------------------------------------------


class RunFolder:
    """The folder ``cfg.out`` of one training run: every file the run writes goes through it.

    :meth:`take` locks the folder (rank 0) and applies the rules of a resume or an overwrite; nothing is
    written then. The first :meth:`append_log` or :meth:`save_checkpoint` prepares the folder (an
    overwritten run's files deleted, a resumed run's log cut at its checkpoint); :meth:`release` lets the
    lock go and removes the folder if this run created it and left it empty. Only rank 0 writes.
    """

    def __init__(self, cfg: Any, runtime: Runtime) -> None:
        self.cfg, self.runtime, self.out = cfg, runtime, Path(cfg.out)
        self.lock: RunLock | None = None
        self.created = False
        self.resumed_step = 0
        self._log: Any = None
        self._prepared = False

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    @property
    def log_path(self) -> Path:
        return self.out / LOG_NAME

    def take(self) -> dict[str, Any] | None:
        """Lock the folder (rank 0; every rank learns a refusal) and apply its rules on every rank; returns
        the checkpoint to resume, if any.

        Raises
        ------
        cli.UsageError
            ``--out`` is a file; the folder is in use; it holds a run and neither ``resume`` nor
            ``overwrite`` was given; a resume changes a refused field or its checkpoint is past
            ``cfg.steps``.
        files.FileKindError
            A checkpoint that is damaged or not one this version can build.
        OSError
            The folder cannot be created or locked.
        """
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} is a file, not a folder")
        self.created = not self.out.is_dir()
        self.lock = run_on_main(self.runtime, self._lock)
        ckpt = self._resumed_checkpoint()
        self.resumed_step = int(ckpt["step"]) if ckpt is not None else 0
        return ckpt

    def _lock(self) -> RunLock:
        lock = RunLock(self.out)
        lock.acquire()
        return lock

    def _resumed_checkpoint(self) -> dict[str, Any] | None:
        cfg, path = self.cfg, self.checkpoint_path
        log_used = self.log_path.exists() and self.log_path.stat().st_size > 0
        found = [p.name for p, used in ((path, path.exists()), (self.log_path, log_used)) if used]
        if found and not (cfg.resume or cfg.overwrite):
            raise UsageError(
                f"{self.out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                "--overwrite to start it again, or another --out"
            )
        if not cfg.resume or not path.exists():
            if cfg.resume:
                self._notice(f"{path} does not exist: starting from step 0")
            return None
        ckpt = load_checkpoint(path)
        refused, applied = compare_configs(dataclasses.asdict(checked_config(ckpt, path, type(cfg))), cfg)
        if refused:
            raise UsageError(
                f"cannot resume {path} with another model, data, estimator or seed: {'; '.join(refused)}"
            )
        if int(ckpt["step"]) > cfg.steps:
            raise UsageError(f"{path} is at step {ckpt['step']}, past --steps {cfg.steps}")
        if applied:
            self._notice(f"resuming {path} with changed settings: {'; '.join(applied)}")
        return ckpt

    def _prepare(self) -> None:
        """Before the first write: a resumed run's log cut at its checkpoint; otherwise no log, no
        checkpoint (those of an overwritten run)."""
        if self._prepared:
            return
        self._prepared = True
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed_step > 0:
            self._truncate_log()
            return
        for path in (self.log_path, self.checkpoint_path):
            path.unlink(missing_ok=True)

    def _truncate_log(self) -> None:
        """Keep the log records up to the resumed step (later ones come from a run that died after its last
        checkpoint); lines that are not JSON are dropped with a notice."""
        records, skipped = read_jsonl(self.log_path)
        if skipped:
            self._notice(f"{self.log_path}: skipped {skipped} damaged line(s) of the log")
        kept = [record for record in records if record.get("step", 0) <= self.resumed_step]
        tmp = self.log_path.with_name(f".{LOG_NAME}.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, self.log_path)

    def append_log(self, record: dict[str, Any]) -> None:
        """One JSON line in ``log.jsonl`` (rank 0), flushed."""
        if not self.runtime.is_main:
            return
        if self._log is None:
            self._prepare()
            self._log = open(self.log_path, "a")  # closed by release()
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        """Write ``checkpoint.pt`` atomically (rank 0): a reader sees the old one or the new one."""
        if self.runtime.is_main:
            self._prepare()
            save_atomically(payload, self.checkpoint_path)

    def release(self) -> None:
        """Close the log, let the lock go, and remove the folder if this run created it and left it empty
        (a refused start), so that it is no obstacle to the corrected command."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.lock is None:
            return
        self.lock.release()
        self.lock = None
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty

    def _notice(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"[train] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------------


class RunLock:
    """Ownership of a folder by one process: an exclusive ``flock`` on the file ``name`` (``train.lock``;
    ``sample.lock`` for ``sample.py``, ``extract.lock`` for ``extract_latents.py``); ``program`` names the
    owner in messages.

    The kernel holds the lock for as long as the owner runs and lets it go when the owner ends, however it
    ends (``kill -9``, a crash, a container restarted with the same pid): a lock file left behind never
    blocks a folder, and no pid is guessed at. The file also records the owner (program, pid, host, start
    time) for the messages. Two records are not taken over on the kernel's word, because their owner may
    still run: one of another host (on a shared file system a lock may be local to each host) and one
    written without a kernel lock (by an older version) whose pid is alive here. Every refusal names the
    lock file and the command that clears it. :meth:`release` deletes the file and lets the lock go.
    """

    def __init__(self, out: Path, name: str = LOCK_NAME, program: str = "train.py") -> None:
        self.path = Path(out) / name
        self.program = program
        self.owner = {
            "program": program,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "lock": "flock",
        }
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the folder, or raise ``UsageError`` naming the run that holds it.

        Raises
        ------
        cli.UsageError
            The folder is in use by a live process, or its lock names a run that cannot be checked from
            here (the message says how to clear it).
        OSError
            The folder cannot be created or written (read-only, a file in the way, disk full), or its file
            system has no locks.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._locked_file()
        try:
            self._take_over(fd)
            record = (json.dumps(self.owner) + "\n").encode()
            os.pwrite(fd, record, 0)
            # Cut what an earlier record left beyond it (cutting to 0 first would make ext4 flush on close).
            os.ftruncate(fd, len(record))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(fd)

    def _locked_file(self) -> int:
        """A descriptor of the lock file with its exclusive lock held."""
        import fcntl

        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise UsageError(self._in_use(owner)) from None
            except OSError as error:
                os.close(fd)
                reason = f"cannot lock it ({error.strerror}); use an --out on a file system with file locks"
                raise OSError(error.errno, reason, str(self.path)) from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # its owner deleted it as it let go: lock the file now at the path
        raise UsageError(f"--out {self.path.parent}: {self.path} keeps changing; try again")

    def _in_use(self, owner: dict[str, Any] | None) -> str:
        """The refusal when a live process holds the lock."""
        where = f"--out {self.path.parent} is in use"
        if owner is None:  # it is writing its record right now
            return (
                f"{where} by another {self.program} (it holds {self.path}): wait for it to end, or find "
                f"it with "
                f"`fuser -v {self.path}` and stop it"
            )
        pid, program = owner.get("pid"), owner.get("program", self.program)
        here = owner.get("host") == self.owner["host"]
        return (
            f"{where} by {program} pid {pid} on {'this host' if here else 'host ' + str(owner.get('host'))} "
            f"(since {_since(owner)}; it holds {self.path}): wait for it to end, or stop it with "
            f"`kill {pid}`{'' if here else ' there'}"
        )

    def _take_over(self, fd: int) -> None:
        """With the kernel's lock held: refuse a record whose owner may still run, take over any other."""
        owner = _read_owner(fd)
        if owner is None:  # a new file, or one left empty or damaged: no owner to wait for
            if os.fstat(fd).st_size:
                self._notice(f"{self.path}: taking over a lock that names no owner (damaged)")
            return
        pid, host = owner.get("pid"), owner.get("host")
        if host != self.owner["host"]:
            raise UsageError(
                f"--out {self.path.parent} is in use by {owner.get('program', self.program)} pid {pid} on "
                f"host {host} (since {_since(owner)}), or was: a lock of another host cannot be checked "
                f"from here; use another --out, or delete {self.path} (`rm {self.path}`) if that run is gone"
            )
        if pid == self.owner["pid"]:  # this process cannot have locked it before: an earlier one did
            self._notice(f"{self.path}: taking over the lock of pid {pid}, this process's own pid, left by "
                         "an earlier process (a restarted container)")  # fmt: skip
            return
        if owner.get("lock") != "flock" and _pid_alive(pid):
            raise UsageError(
                f"--out {self.path.parent} is in use by {self.program} pid {pid} on this host (since "
                f"{_since(owner)}; its {self.path} has no kernel lock, as older versions wrote): wait for it "
                f"to end, or delete {self.path} (`rm {self.path}`) if pid {pid} is not that run"
            )
        self._notice(f"{self.path}: taking over the lock of pid {pid}, which is no longer running")

    def _notice(self, message: str) -> None:
        print(f"[{Path(self.program).stem}] {message}", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Delete the lock file and let the lock go, if this process holds it."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            _HELD.discard(self._fd)
            os.close(self._fd)
            self._fd = None


#: The descriptors of the locks this process holds. A forked child (a ``DataLoader`` worker) closes its
#: copies, so that the lock stays its owner's alone and goes when the owner ends, not when the last child
#: does. (A child's ``close`` drops its reference; the lock is held while any reference is open.)
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a lock's owner deletes it as it lets go)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_owner(fd: int) -> dict[str, Any] | None:
    """The owner a lock file records, or ``None`` when it is empty or not a record."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _since(owner: dict[str, Any]) -> str:
    started = owner.get("started")
    if not isinstance(started, int | float):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
