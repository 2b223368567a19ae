"""Reading and writing the example's files: atomic saves, safe loads, one-line errors for the wrong file.

Every ``torch.save`` of the example goes through :func:`save_atomically` (checkpoints, the classifier cache,
latents) and every ``torch.load`` through :func:`load_tensors` (``weights_only=True``: tensors and plain
containers, never pickled code). A file that is missing, damaged, or of another kind raises
:class:`FileKindError`, whose message is one line naming the file and what was expected.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import errno
import json
import os
import pickle
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = [
    "FileKindError",
    "NpzMember",
    "load_tensors",
    "npz_member_rows",
    "read_jsonl",
    "remove_stale_stages",
    "save_atomically",
    "save_json_atomically",
    "save_npz_atomically",
    "staged_folder",
    "write_npz_streamed",
]


class FileKindError(ValueError):
    """A file is missing, damaged, or not the kind of file that was expected."""


def save_atomically(payload: Any, path: str | Path) -> Path:
    """``torch.save`` ``payload`` so that a reader sees the old file or the new one, never a partial one.

    The data goes to a temporary file in the same folder, is flushed to disk (``fsync``) and replaces
    ``path`` by ``os.replace`` (atomic on POSIX and Windows). A process killed mid-write leaves at most a
    stale temporary file; two processes writing the same path leave one whole file.
    """
    return _replace_atomically(Path(path), lambda handle: torch.save(payload, handle), "wb")


def _replace_atomically(path: Path, write: Callable[[IO[Any]], object], mode: str) -> Path:
    """``write(handle)`` into a temporary file beside ``path``, flushed to disk, then moved over ``path``;
    the temporary file is removed if anything fails (a kill leaves at most a stale ``.tmp``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` (``.NAME.RANDOM.tmp``), open for writing, whose mode follows the umask
    as every other file's does (``tempfile.mkstemp`` makes it 0600, which the final rename would keep)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def save_json_atomically(payload: Any, path: str | Path) -> Path:
    """``payload`` as indented JSON at ``path``, written as :func:`save_atomically` writes: to a temporary
    file of its own beside ``path`` (its mode following the umask), flushed to disk, then moved in."""
    return _replace_atomically(
        Path(path), lambda handle: handle.write(json.dumps(payload, indent=2) + "\n"), "w"
    )


def save_npz_atomically(path: str | Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` to ``path`` through a temporary file in the same folder, flushed and moved in by
    ``os.replace``: a reader sees the whole file or none (an interrupted run leaves at most a temporary)."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclasses.dataclass
class NpzMember:
    """One array of an ``.npz`` written piece by piece: its shape, dtype, and a callable that yields its rows
    in order as arrays ``(k, *shape[1:])`` (the pieces' rows must add up to ``shape[0]``)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: Callable[[], Iterable[np.ndarray]]


def write_npz_streamed(path: str | Path, members: dict[str, NpzMember]) -> Path:
    """Write an ``.npz`` that ``np.load`` reads, one member after another, each from its pieces.

    Memory is one piece at a time, whatever the arrays' sizes: each member is a ``.npy`` (its header from
    ``numpy.lib.format``, C order) streamed into an uncompressed ZIP64 entry, the layout ``np.savez`` writes.

    Raises
    ------
    ValueError
        When the pieces of a member do not have its dtype and row shape, or do not add up to its rows.
    """
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, member in members.items():
            dtype, shape = np.dtype(member.dtype), tuple(int(n) for n in member.shape)
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, header)
                rows = 0
                for piece in member.pieces():
                    piece = np.asarray(piece)
                    if piece.dtype != dtype or piece.shape[1:] != shape[1:]:
                        raise ValueError(
                            f"{name}: a piece {piece.dtype} {piece.shape} does not fit {dtype} {shape}"
                        )
                    entry.write(np.ascontiguousarray(piece).tobytes())
                    rows += piece.shape[0]
                if rows != shape[0]:
                    raise ValueError(f"{name}: the pieces hold {rows} rows, expected {shape[0]}")
    return path


def npz_member_rows(path: str | Path, name: str, batch: int) -> tuple[tuple[int, ...], np.dtype, Iterator]:
    """The shape and dtype of the array ``name`` of an ``.npz``, and an iterator over its rows in pieces of
    ``batch``, read from the file as it goes (memory: one piece), for C-ordered arrays of plain dtypes.

    Raises
    ------
    FileKindError
        When the file has no such member, or it is not a plain C-ordered ``.npy``.
    """
    archive = zipfile.ZipFile(path)
    try:
        entry = archive.open(f"{name}.npy")
        version = np.lib.format.read_magic(entry)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(entry)
    except (KeyError, ValueError, zipfile.BadZipFile) as error:
        archive.close()
        raise FileKindError(f"{path}: cannot read the array {name!r} ({error})") from None
    if fortran or dtype.hasobject or not shape:
        archive.close()
        raise FileKindError(f"{path}: the array {name!r} is not a C-ordered array of numbers")
    row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))

    def rows() -> Iterator[np.ndarray]:
        with archive, entry:
            for start in range(0, shape[0], batch):
                count = min(batch, shape[0] - start)
                data = entry.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise FileKindError(f"{path}: the array {name!r} is cut short")
                yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])

    return tuple(shape), dtype, rows()


#: The name prefix of :func:`staged_folder`'s temporary folders.
STAGE_PREFIX = ".partial-"


def remove_stale_stages(out: str | Path) -> list[Path]:
    """Delete the temporary folders that a :func:`staged_folder` of a killed process (``kill -9``, the
    out-of-memory killer) left in ``out``; returns them. Only for a folder's owner (its lock held): another
    process's stage at work would be deleted too."""
    stale = sorted(Path(out).glob(f"{STAGE_PREFIX}*"))
    for stage in stale:
        shutil.rmtree(stage, ignore_errors=True)
    return stale


@contextlib.contextmanager
def staged_folder(out: str | Path, replaces: Iterable[str] = ()) -> Iterator[Path]:
    """A temporary folder inside ``out`` for a command's outputs: when the block ends without an error its
    files replace those of ``out`` (each by ``os.replace``, atomic), and the files of ``out`` named in
    ``replaces`` that the stage does not hold are deleted (an older run's output that the new one does not
    write); on an error (a full disk) it is removed and the files already in ``out`` are left as they were."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=STAGE_PREFIX))
    try:
        yield stage
        written = {item.name for item in stage.iterdir()}
        for item in sorted(stage.iterdir()):
            os.replace(item, out / item.name)
        for name in sorted(set(replaces) - written):
            (out / name).unlink(missing_ok=True)
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
    not_saved = _not_a_torch_save_file(path)
    if not_saved:
        raise FileKindError(f"{path}: {not_saved}, not a torch.save file (expected {expected})")
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


def _not_a_torch_save_file(path: Path) -> str | None:
    """What a file is when its first bytes show that ``torch.save`` did not write it (``None`` otherwise).

    ``torch.save`` writes a ZIP archive (``PK``) or, in its legacy format, a pickle of protocol 2 or more
    (``0x80``); any other start is another kind of file, which the unpickler would otherwise describe as
    "pickled objects" it refuses.
    """
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith((b"PK", b"\x80")):
        return None
    if not head:
        return "is empty"
    try:  # a multi-byte character cut at the end of the head is still text
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "is binary data of another kind"
    if any(not char.isprintable() and char not in "\t\r\n" for char in text):
        return "is binary data of another kind"
    return "is a text file"


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
