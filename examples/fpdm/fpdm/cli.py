"""Command lines generated from dataclasses, with checked values: one source of truth per option.

A config is a dataclass whose fields are declared with :func:`option`: default, help text, and what values
are allowed (``low``/``high`` bounds, ``choices``). :func:`add_options` turns the fields into flags
(``hidden_size`` -> ``--hidden-size``; ``bool`` -> ``--x/--no-x``; ``tuple[int, int]`` -> two values);
:func:`check_config` checks a config built from Python with the same rules. A bad value on the command line
ends in argparse's own one-line error and exit status 2:

    train.py: error: argument --batch-size: must be an int >= 1, got 0

:class:`UsageError` is for what can only be checked later (a run folder in use, a checkpoint of another
configuration, a file of the wrong kind); :func:`run_command` turns it into the same kind of exit.

:class:`StopSignals` is how a long command stops on Ctrl-C or SIGTERM: the first signal asks it to stop
after the work under way, a second one stops it at once; either way the exit status is 128 + the signal's
number and the message names the signal.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import signal
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from fpdm.files import FileKindError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NON_FINITE",
    "EXIT_USAGE",
    "EXIT_WRITE",
    "Interrupted",
    "OneLineParser",
    "SecondSignal",
    "StopSignals",
    "UsageError",
    "add_options",
    "bounded_float",
    "bounded_int",
    "check_config",
    "check_value",
    "config_from_args",
    "describe_os_error",
    "flag",
    "option",
    "run_command",
]


#: Exit statuses of every command line (the README's command-line rules): 0 done; 1 a non-finite training
#: loss or Fréchet distance; 2 a usage error (a bad value, a file of the wrong kind, a run folder in use);
#: 3 a file that could not be written or read (disk full, a read-only folder, a file where a folder is
#: expected); 128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when stopped by a signal.
EXIT_NON_FINITE, EXIT_USAGE, EXIT_WRITE = 1, 2, 3
EXIT_INTERRUPTED = 128


class UsageError(ValueError):
    """A request the command line cannot carry out as asked; the message is one line for the user."""


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: message``) without the usage
    block, and exit status 2; ``--help`` still shows everything."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class Interrupted(Exception):
    """A command stopped by a signal (Ctrl-C, SIGTERM) after saving what it had; exit status 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class SecondSignal(KeyboardInterrupt):
    """A second Ctrl-C or SIGTERM: the command stops at once, wherever it is (a ``KeyboardInterrupt``, so
    that no ``except Exception`` holds it up); ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM, turned into a request to stop after the work under way.

    While installed (``with``; main thread only, elsewhere it does nothing) the first signal only sets
    :attr:`requested`: the command then saves what it has and stops (:class:`Interrupted`). A second
    signal of either kind raises :class:`SecondSignal` at once, even in the middle of a write (the example's
    writes are atomic: the previous file stays whole). Under ``torchrun`` the ranks agree on a stop by
    summing :meth:`flags` and passing the sums to :meth:`agree` (:attr:`agreed`).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = 0
        self.agreed = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise SecondSignal(signum)
        self.requested = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def flags(self) -> list[float]:
        """This rank's request, as the two entries the ranks sum: (SIGINT, SIGTERM)."""
        return [float(self.requested == signum) for signum in self.SIGNALS]

    def agree(self, summed: list[float]) -> None:
        """Every rank's requests summed: stop if any rank was asked to (SIGINT wins)."""
        self.agreed = next((int(s) for s, n in zip(self.SIGNALS, summed, strict=True) if n > 0), 0)


def option(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its command-line help and allowed values (``cli=False``: no flag)."""
    metadata = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open}
    metadata["choices"] = choices
    metadata.update(metavar=metavar, cli=cli)
    if isinstance(default, list | dict | set):
        raise TypeError("use a tuple default, not a mutable one")
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """``hidden_size`` -> ``--hidden-size``."""
    return "--" + name.replace("_", "-")


def _allowed(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    text = "an int" if kind is int else "a finite number"
    if low is not None:
        text += f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        text += f"{' and' if low is not None else ''} {'<' if high_open else '<='} {high:g}"
    return text


def check_value(
    value: Any,
    kind: type,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Any:
    """``value`` as ``kind`` (``int`` or ``float``) within the bounds; ``ValueError`` with what is allowed.

    Floats must be finite (``nan`` and ``inf`` are refused); numpy numbers are accepted, bools are not
    numbers here.
    """
    allowed = _allowed(kind, low, high, low_open, high_open)
    # numpy numbers count as numbers; bools (numpy's too) do not.
    wrong_type = not isinstance(value, numbers.Integral if kind is int else numbers.Real)
    if isinstance(value, bool) or type(value).__name__ == "bool_" or wrong_type:
        raise ValueError(f"must be {allowed}, got {value!r}")
    value = kind(value)
    bad = kind is float and not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        raise ValueError(f"must be {allowed}, got {value!r}")
    return value


def _parser_type(
    kind: type, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type=``: parse the text as ``kind`` and check the bounds."""

    def parse(text: str) -> Any:
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {_allowed(kind, low, high, low_open, high_open)}, got {text!r}"
            ) from None
        try:
            return check_value(value, kind, low=low, high=high, low_open=low_open, high_open=high_open)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def bounded_int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for an int within ``[low, high]``."""
    return _parser_type(int, low, high)


def bounded_float(
    low: float | None = None, high: float | None = None, low_open: bool = False
) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite float within the bounds (``low_open``: strictly above ``low``)."""
    return _parser_type(float, low, high, low_open)


def _field_kind(annotation: Any) -> tuple[type, bool, int | None]:
    """``(base type, optional, nargs)`` of ``int``, ``int | None``, ``tuple[int, int]``, ``bool | None``..."""
    args = typing.get_args(annotation)
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        optional = type(None) in args
        (annotation,) = [a for a in args if a is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return args[0], optional, len(args)
    return annotation, optional, None


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool, int | None]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_field_kind(hints[f.name])) for f in dataclasses.fields(cls)]


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass ``cls`` declared with :func:`option`."""
    for field, kind, _, nargs in _fields(cls):
        meta = field.metadata
        if not meta.get("cli", False):
            continue
        name, default = flag(field.name), field.default
        help_text = meta["help"] + (" (default: %(default)s)" if default is not None else "")
        if kind is bool:
            parser.add_argument(
                name, action=argparse.BooleanOptionalAction, default=default, help=meta["help"]
            )
            continue
        kwargs: dict[str, Any] = {"default": default, "help": help_text, "metavar": meta.get("metavar")}
        if kind in (int, float):
            kwargs["type"] = _parser_type(
                kind, meta["low"], meta["high"], meta["low_open"], meta["high_open"]
            )
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
            kwargs.pop("metavar")
        if nargs is not None:
            kwargs["nargs"] = nargs
            kwargs["default"] = list(default)
        parser.add_argument(name, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """The dataclass ``cls`` from parsed ``args`` (lists become tuples), with ``extra`` fields set."""
    values = {}
    for field, _, _, nargs in _fields(cls):
        if hasattr(args, field.name):
            value = getattr(args, field.name)
            values[field.name] = tuple(value) if nargs is not None and value is not None else value
    return cls(**{**values, **extra})


def _checked(name: str, item: Any, kind: type, meta: Any) -> Any:
    """One value of a field, checked and converted to a plain Python value."""
    if kind is bool:
        if not isinstance(item, bool) and type(item).__name__ != "bool_":
            raise ValueError(f"{name} must be a bool, got {item!r}")
        return bool(item)
    if kind in (int, float):
        bounds = {k: meta[k] for k in ("low", "high", "low_open", "high_open")}
        try:
            return check_value(item, kind, **bounds)
        except ValueError as error:
            raise ValueError(f"{name} {error}") from None
    if kind is str:
        item = os.fspath(item) if isinstance(item, os.PathLike) else item
        if not isinstance(item, str):
            raise ValueError(f"{name} must be a string, got {item!r}")
    if meta.get("choices") is not None and item not in meta["choices"]:
        raise ValueError(f"{name} must be one of {list(meta['choices'])}, got {item!r}")
    return item


def check_config(config: Any) -> None:
    """Check every field of a dataclass built with :func:`option` against its rules, and store each as a
    plain Python value (numpy numbers become ``int``/``float``, paths ``str``, lists tuples), so that the
    config saves and loads with ``torch.load(weights_only=True)``.

    Raises
    ------
    ValueError
        Naming the field, the value and what is allowed.
    """
    for field, kind, optional, nargs in _fields(type(config)):
        meta, value = field.metadata, getattr(config, field.name)
        if "help" not in meta or (optional and value is None):
            continue
        if nargs is None:
            setattr(config, field.name, _checked(field.name, value, kind, meta))
            continue
        if not isinstance(value, tuple | list) or len(value) != nargs:
            raise ValueError(f"{field.name} must be {nargs} values, got {value!r}")
        setattr(config, field.name, tuple(_checked(field.name, item, kind, meta) for item in value))


def describe_os_error(error: OSError) -> str:
    """One line for a failed file operation: what the system said and the path."""
    where = f": {error.filename}" if error.filename is not None else ""
    return f"{error.strerror or error}{where}"


def run_command(parser: argparse.ArgumentParser, command: Callable[[], int]) -> int:
    """Run ``command`` and turn its expected failures into one line on stderr and an exit status.

    A :class:`UsageError` or a :class:`files.FileKindError` (a file of the wrong kind) ends like argparse's
    errors (exit status 2); an ``OSError`` (disk full, a read-only folder, a file where a folder is
    expected) with status 3; :class:`Interrupted`, Ctrl-C and :class:`SecondSignal` with 128 + the
    signal's number, the message naming the signal.
    """
    try:
        return command()
    except (UsageError, FileKindError) as error:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {error}\n")
    except OSError as error:
        parser.exit(EXIT_WRITE, f"{parser.prog}: error: {describe_os_error(error)}\n")
    except Interrupted as error:
        parser.exit(EXIT_INTERRUPTED + error.signum, f"{parser.prog}: {error}\n")
    except KeyboardInterrupt as error:  # Ctrl-C outside StopSignals, or a SecondSignal
        signum = getattr(error, "signum", signal.SIGINT)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        parser.exit(EXIT_INTERRUPTED + signum, f"{parser.prog}: interrupted ({name})\n")
