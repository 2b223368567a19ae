"""The counters of implicitdiff.diagnostics count exactly what they say, op by op."""

from __future__ import annotations

import pytest
import torch

from implicitdiff.diagnostics import LaunchCounter, SyncCounter

X = torch.tensor([1.0, -2.0, 3.0, -4.0])
MASK = X > 0
LONG = torch.tensor([0, 2])

#: Each operation, and the syncs it makes on a GPU: reading a value or learning a size from the device.
SYNCS = [
    ("item", lambda: X.sum().item(), {"_local_scalar_dense": 1}),
    ("bool", lambda: bool(X.sum() > 0), {"_local_scalar_dense": 1}),
    ("float", lambda: float(X[0]), {"_local_scalar_dense": 1}),
    ("tolist", lambda: X.tolist(), {"tolist": 1}),
    ("nonzero", lambda: torch.nonzero(MASK), {"nonzero": 1}),
    ("masked_select", lambda: torch.masked_select(X, MASK), {"masked_select": 1}),
    ("boolean index", lambda: X[MASK], {"index": 1}),
    ("boolean index_put", lambda: X.clone().index_put_((MASK,), torch.tensor(0.0)), {"index_put_": 1}),
    ("where", lambda: torch.where(MASK, X, 0.0), {}),
    ("integer index", lambda: X[LONG], {}),
    ("integer index_put", lambda: X.clone().index_put_((LONG,), torch.tensor(0.0)), {}),
    ("reductions", lambda: (X.amax(), X.any(), X.sum()), {}),
]


@pytest.mark.parametrize(("name", "op", "expected"), SYNCS, ids=[s[0] for s in SYNCS])
def test_the_sync_counter_counts_exactly_the_operations_that_wait_for_the_device(name, op, expected):
    with SyncCounter() as syncs:
        op()
    assert dict(syncs.by_op) == expected
    assert syncs.count == sum(expected.values())


def test_the_sync_counter_restores_tolist_when_it_ends():
    original = torch.Tensor.tolist
    with SyncCounter():
        pass
    assert torch.Tensor.tolist is original
    with SyncCounter() as syncs:
        pass
    X.tolist()
    assert syncs.count == 0


def test_the_launch_counter_sees_in_place_and_out_variants_as_launches():
    buf = torch.empty(4)
    with LaunchCounter() as launches:
        torch.add(X, X, out=buf)
        buf.mul_(2.0)
        buf.copy_(X)
        X.to(torch.float64)
        X.to(torch.float32)  # same dtype: no copy
    assert launches.by_op == {"add": 1, "mul_": 1, "copy_": 1, "_to_copy": 1}
