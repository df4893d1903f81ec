"""engine.argmax_native.argmax_rows returns torch.argmax(x, -1)'s indices (first maximum, first NaN)."""

from __future__ import annotations

import os

import pytest
import torch

from engine import argmax_native
from engine.argmax_native import argmax_rows

pytestmark = pytest.mark.skipif(
    argmax_native.kernel() is None and not os.environ.get("PDSERVE_CI"),
    reason=f"native argmax: {argmax_native.unavailable_reason()}",
)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 17), (8, 49152), (33, 1000), (3, 100003)])
def test_random_rows_equal_torch(rows, n):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows * n))
    assert argmax_rows(x) == x.argmax(dim=-1).tolist()


def test_ties_nan_inf_and_signed_zero_follow_torch():
    x = torch.tensor(
        [
            [1.0, NAN, 3.0, NAN],
            [NAN, 1.0, 2.0, 5.0],
            [1.0, 3.0, 3.0, 2.0],
            [-0.0, 0.0, -1.0, 0.0],
            [-INF, -INF, -INF, -INF],
            [1.0, 2.0, 7.0, NAN],
            [INF, 1.0, INF, 2.0],
            [-5.0, -4.0, -4.0, -9.0],
        ]
    )
    assert argmax_rows(x) == x.argmax(dim=-1).tolist()
    assert argmax_native.kernel() is not None  # the cases above ran the C kernel


def test_strided_rows_empty_batch_and_fallbacks():
    big = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    view = big[::2, 10:250]  # row stride 600, unit column stride: the kernel reads it in place
    assert argmax_rows(view) == view.argmax(dim=-1).tolist()
    assert argmax_rows(torch.empty(0, 5)) == []
    for other in (big.double(), big.t(), big.half()):  # other dtypes, column stride: torch.argmax
        assert argmax_rows(other) == other.argmax(dim=-1).tolist()
