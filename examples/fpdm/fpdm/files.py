"""Reading and writing the example's files: atomic saves, safe loads, one-line errors for the wrong file.

Every ``torch.save`` of the example goes through :func:`save_atomically` (checkpoints, the classifier cache,
latents) and every ``torch.load`` through :func:`load_tensors` (``weights_only=True``: tensors and plain
containers, never pickled code). A file that is missing, damaged, or of another kind raises
:class:`FileKindError`, whose message is one line naming the file and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["FileKindError", "load_tensors", "read_jsonl", "save_atomically", "staged_folder"]


class FileKindError(ValueError):
    """A file is missing, damaged, or not the kind of file that was expected."""


def save_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save`` ``payload`` so that a reader sees the old file or the new one, never a partial one.

    The data goes to a temporary file in the same folder, is flushed to disk (``fsync``) and replaces
    ``path`` by ``os.replace`` (atomic on POSIX and Windows). A process killed mid-write leaves at most a
    stale temporary file; two processes writing the same path leave one whole file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder inside ``out`` for a command's outputs: when the block ends without an error its
    files replace those of ``out`` (each by ``os.replace``, atomic); on an error (a full disk) it is removed
    and the files already in ``out`` are left as they were."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        yield stage
        for item in sorted(stage.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def load_tensors(path: str | Path, expected: str, keys: Iterable[str] = ()) -> dict[str, Any]:
    """Load a ``torch.save`` dict with ``weights_only=True``; check that it holds ``keys``.

    Parameters
    ----------
    path : str or Path
        The file.
    expected : str
        What the file should be, for the error message (``"a checkpoint written by train.py"``).
    keys : iterable of str
        Keys the dict must have.

    Raises
    ------
    FileKindError
        One line naming the file and what was expected: when it does not exist, is not a ``torch.save``
        file (text, truncated, damaged), holds pickled objects other than tensors and plain containers
        (refused, whoever wrote them), is not a dict, or lacks a key.
    """
    path = Path(path)
    if path.is_dir():
        raise FileKindError(f"{path}: is a folder (expected {expected})")
    if not path.is_file():
        raise FileKindError(f"{path}: no such file (expected {expected})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a file it cannot read; all mean the same here
        # torch's message for refused objects suggests weights_only=False, which would run the file's code:
        # not ours to give.
        refused = isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error)
        what = (
            "holds pickled objects other than tensors and plain containers, which are refused"
            if refused
            else "not a torch.save file, or a damaged one"
        )
        raise FileKindError(f"{path}: {what} (expected {expected})") from None
    if not isinstance(payload, dict):
        raise FileKindError(f"{path}: holds a {type(payload).__name__}, not a dict (expected {expected})")
    missing = sorted(set(keys) - set(payload))
    if missing:
        raise FileKindError(f"{path}: has no {', '.join(map(repr, missing))} (expected {expected})")
    return payload


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSON-lines file, skipping lines that are not JSON objects (a write cut short).

    Returns the records and the number of lines skipped; a missing file has no records.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    records, skipped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped
