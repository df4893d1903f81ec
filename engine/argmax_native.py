"""Row-wise argmax of fp32 logits on the calling thread (issue #17: greedy sampling at decode).

``torch.argmax`` over a decode batch's logits (``[B, vocab]``, a few hundred thousand floats) opens
an OpenMP region; when torch's OpenMP workers have gone to sleep between steps (the projections run
on :mod:`engine.models.linear_native`'s own pool) that region waits for their wake-up, which on a
loaded 2-core host cost a scheduler time slice: measured 6-12 ms median for ``[8, 49152]`` against
0.3 ms on one thread (2026-12-06, load 2.9). :func:`argmax_rows` is one pass per row in C.

Contract: the same indices as ``torch.argmax(x, dim=-1)`` for a 2-D float32 CPU tensor: the first
index of the maximum, and where a row holds a NaN the index of its first NaN (torch's NaN-as-max
rule). Anything else (other dtypes, devices, dimensions, no C compiler) takes ``torch.argmax``.
"""

from __future__ import annotations

import ctypes

import torch

from engine.native_build import NativeLibrary

_SOURCE = r"""
#include <stdint.h>

/* out[r] = the first index of row r's maximum, or of its first NaN (torch.argmax's rule). Two
   passes: the row's maximum ignoring NaNs and whether it holds one (a branch-free loop the compiler
   vectorises), then the first index equal to it (or the first NaN). */
void argmax_rows_f32(const float* x, int64_t rows, int64_t n, int64_t stride, int64_t* out)
{
    for (int64_t r = 0; r < rows; r++) {
        const float* v = x + r * stride;
        float m = v[0];
        int nan = 0;
        for (int64_t i = 0; i < n; i++) {
            const float a = v[i];
            m = a > m ? a : m;
            nan |= a != a;
        }
        int64_t i = 0;
        if (nan)
            while (v[i] == v[i]) i++;
        else if (m == m)
            while (v[i] != m) i++;
        out[r] = i;  /* m NaN and no NaN found later: v[0] is the NaN, i = 0 */
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.argmax_rows_f32.argtypes = [p, i64, i64, i64, p]
    lib.argmax_rows_f32.restype = None


_LIB = NativeLibrary("argmax_rows", _SOURCE, _declare, "torch.argmax")


def kernel() -> ctypes.CDLL | None:
    """The built library, or None (then :func:`unavailable_reason` says why)."""
    return _LIB.get()


def unavailable_reason() -> str | None:
    """Why :func:`kernel` returned None (None when nothing failed)."""
    return _LIB.reason


def argmax_rows(x: torch.Tensor) -> list[int]:
    """``torch.argmax(x, dim=-1).tolist()`` for a 2-D tensor; on the calling thread in C for a
    float32 CPU tensor with unit stride along the rows (torch.argmax otherwise)."""
    if (
        x.dim() != 2
        or x.dtype != torch.float32
        or x.device.type != "cpu"
        or x.shape[1] == 0
        or x.stride(1) != 1
        or (lib := kernel()) is None
    ):
        return x.argmax(dim=-1).tolist()
    rows = x.shape[0]
    out = torch.empty(rows, dtype=torch.int64)
    if rows:
        lib.argmax_rows_f32(x.data_ptr(), rows, x.shape[1], x.stride(0), out.data_ptr())
    return out.tolist()
