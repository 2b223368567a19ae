"""A training run's folder: its checkpoint, its log, and the rules for starting, continuing or replacing it.

A folder that holds a run (``checkpoint.pt`` or ``log.jsonl``) is continued with ``resume``, started again
with ``overwrite``, and never touched otherwise. A resume compares the checkpoint's stored configuration with
the request field by field (:func:`compare_configs`): the config class's ``REFUSED_ON_RESUME`` fields may
not change; the others are applied with a notice; its ``RUNTIME_FIELDS`` are not compared.

A folder has one owner at a time: the run that holds its lock file, ``train.lock``, which names the process
(pid and host). A second run into the same folder is refused with one line; a lock left by a run that died
(a pid no longer alive on this host) is taken over with a notice. A lock of another host cannot be checked
from here: the message names it, to be deleted by hand once that run is known to be gone.
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

from fpdm.cli import UsageError, flag
from fpdm.distributed import Runtime
from fpdm.files import load_tensors, read_jsonl, save_atomically

__all__ = [
    "CHECKPOINT_NAME",
    "LOCK_NAME",
    "LOG_NAME",
    "RunLock",
    "clear_run_folder",
    "compare_configs",
    "load_checkpoint",
    "open_run_folder",
    "save_checkpoint",
    "stored_config",
]

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
LOCK_NAME = "train.lock"
CHECKPOINT_KIND = "a checkpoint written by train.py"


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write ``payload`` atomically (:func:`files.save_atomically`): a reader never sees a partial file."""
    save_atomically(payload, path)


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


def _notice(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(f"[train] {message}", file=sys.stderr, flush=True)


def _truncate_log(path: Path, last_step: int, runtime: Runtime) -> None:
    """Keep the log records up to ``last_step`` (later ones come from a run that died after its last
    checkpoint); lines that are not JSON are dropped with a notice."""
    records, skipped = read_jsonl(path)
    if skipped:
        _notice(runtime, f"{path}: skipped {skipped} damaged line(s) of the log")
    kept = [record for record in records if record.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(tmp, path)


def open_run_folder(cfg: Any, runtime: Runtime) -> dict[str, Any] | None:
    """Apply the run-folder rules (see the module docstring); returns the checkpoint to resume, if any.

    Raises
    ------
    cli.UsageError
        A folder that holds a run without ``resume`` or ``overwrite``; a resume that changes a refused
        field; a checkpoint past ``cfg.steps``.
    files.FileKindError
        A damaged checkpoint.
    """
    out = Path(cfg.out)
    ckpt_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    found = [p.name for p in (ckpt_path, log_path) if p.exists()]
    if found and not (cfg.resume or cfg.overwrite):
        raise UsageError(
            f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it, --overwrite to "
            "start it again, or another --out"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if not cfg.resume or not ckpt_path.exists():
        if cfg.resume:
            _notice(runtime, f"{ckpt_path} does not exist: starting from step 0")
        return None
    ckpt = load_checkpoint(ckpt_path)
    refused, applied = compare_configs(stored_config(ckpt, type(cfg)), cfg)
    if refused:
        raise UsageError(
            f"cannot resume {ckpt_path} with another model, data, estimator or seed: {'; '.join(refused)}"
        )
    if int(ckpt["step"]) > cfg.steps:
        raise UsageError(f"{ckpt_path} is at step {ckpt['step']}, past --steps {cfg.steps}")
    if applied:
        _notice(runtime, f"resuming {ckpt_path} with changed settings: {'; '.join(applied)}")
    return ckpt


def clear_run_folder(cfg: Any, runtime: Runtime, resumed_step: int) -> None:
    """Make the folder ready: a resumed run's log cut at its checkpoint; otherwise no log nor checkpoint."""
    out = Path(cfg.out)
    if not runtime.is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    if resumed_step > 0:
        _truncate_log(out / LOG_NAME, resumed_step, runtime)
        return
    for name in (LOG_NAME, CHECKPOINT_NAME):
        (out / name).unlink(missing_ok=True)


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


def _read_lock(path: Path) -> dict[str, Any] | None:
    """A lock file's owner, or ``None`` when it is gone or unreadable."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """Ownership of a run folder: the file ``name`` (``train.lock``; ``sample.lock`` for ``sample.py``)
    holding the owner's pid, host and start time; ``program`` names the owner in messages.

    :meth:`acquire` creates it atomically (written to a temporary file, then hard-linked to its name, which
    fails if the name exists), so a reader never sees a half-written lock and two runs never both win.
    :meth:`release` deletes it if it is still this process's.
    """

    def __init__(self, out: Path, name: str = LOCK_NAME, program: str = "train.py") -> None:
        self.path = Path(out) / name
        self.program = program
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self.held = False

    def acquire(self) -> None:
        """Take the folder, or raise ``UsageError`` naming the run that holds it.

        Raises
        ------
        cli.UsageError
            The folder is in use by a live run (on this host) or by a run on another host.
        OSError
            The folder cannot be created or written (read-only, a file in the way, disk full).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.owner) + "\n")
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._check_stale()
            raise UsageError(f"--out {self.path.parent}: could not take {self.path}; try again")
        finally:
            tmp.unlink(missing_ok=True)

    def _check_stale(self) -> None:
        """Remove the lock of a dead run of this host; raise ``UsageError`` for any other owner."""
        owner = _read_lock(self.path)
        if owner is None:  # deleted in between, or being replaced: try again
            return
        pid, host = owner.get("pid"), owner.get("host")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("started", 0))))
        if host != self.owner["host"]:
            raise UsageError(
                f"--out {self.path.parent} is in use by {self.program} pid {pid} on host {host} (since "
                f"{since}); use another --out, or delete {self.path} if that run is gone"
            )
        if isinstance(pid, int) and _pid_alive(pid):
            raise UsageError(
                f"--out {self.path.parent} is in use by {self.program} pid {pid} on this host (since "
                f"{since}); wait for it to end or use another --out"
            )
        print(f"[{Path(self.program).stem}] {self.path}: taking over the lock of pid {pid}, which is no "
              "longer running", file=sys.stderr, flush=True)  # fmt: skip
        # Another run may take it over at the same moment: only the one whose link succeeds wins.
        with contextlib.suppress(FileNotFoundError):
            if _read_lock(self.path) == owner:
                self.path.unlink()

    def release(self) -> None:
        """Delete the lock if this process holds it."""
        if self.held and _read_lock(self.path) == self.owner:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.held = False
