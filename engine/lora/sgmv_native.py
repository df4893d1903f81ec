"""Native (C) multi-LoRA update: Punica's SGMV shrink + expand in one call per projection.

:func:`sgmv_add` adds, to each adapter token's row of a projection's output, that token's
adapter update ``(x[t] @ A[s]^T) @ B[s]`` (``A``/``B``: the slot buffers of
:class:`engine.lora.layers.LoRALinear`), for every segment of the step's batch in one call: the
adapter's rows are visited segment by segment (so one adapter's ``A``/``B`` stay in cache across
its tokens), the shrink ``u = A[s] x[t]`` goes to a small scratch row and the expand adds
``u @ B[s]`` only inside each target's block (a fused q/k/v or gate/up module's ``B`` is block
diagonal: target ``j``'s rank rows ``j*R..j*R+R`` write only its output columns), so the zero
blocks cost nothing.

Every row is computed by the same code whatever the batch around it, so a token's update is
bitwise the same alone or in any mixed batch. Rows are not blocked across tokens: a blocked
variant (four tokens per pass over an adapter's A and B) was 1.2-1.5x slower with 30 layers of
8 adapters' weights streaming from memory as in a real step (the first token of a segment
brings A and B into L2, the rest hit L2), though faster when the weights fit in cache. One thread: the update is
a few percent of the step's FLOPs (rank 16 on SmolLM2: about 5%).

Refused (ValueError naming the argument) where the data is not what the kernel reads: non-fp32,
non-CPU, non-contiguous buffers, or index data out of range. Built once per CPU by
:mod:`engine.native_build`; :func:`available` is False where there is no C compiler (callers
then use torch: :class:`engine.lora.layers.LoRALinear` does).
"""

from __future__ import annotations

import ctypes

import torch

from engine.native_build import NativeLibrary

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* VW floats per vector: the widest the CPU has natively (a wider generic vector on an AVX2-only
   CPU is lowered into shuffles and spills: 4-5x slower than torch on Zen 1) */
#if defined(__AVX512F__)
#define VW 16
#else
#define VW 8
#endif
typedef float v16 __attribute__((vector_size(VW * 4)));
static inline v16 ld(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, v16 v) { memcpy(p, &v, sizeof v); }
static inline float hsum(v16 v)
{
    float s = 0.f;
    for (int l = 0; l < VW; l++) s += v[l];
    return s;
}

/* u[w] = A[w] . x for w < W (A rows of n floats), four rows at a time: x is read once per four */
static void shrink(const float* a, const float* x, int64_t n, int64_t W, float* u)
{
    const int64_t nv = n - n % VW;
    int64_t w = 0;
    for (; w + 4 <= W; w += 4) {
        const float *a0 = a + w * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t k = 0; k < nv; k += VW) {
            const v16 xv = ld(x + k);
            s0 += ld(a0 + k) * xv; s1 += ld(a1 + k) * xv; s2 += ld(a2 + k) * xv; s3 += ld(a3 + k) * xv;
        }
        float r0 = hsum(s0), r1 = hsum(s1), r2 = hsum(s2), r3 = hsum(s3);
        for (int64_t k = nv; k < n; k++) { r0 += a0[k] * x[k]; r1 += a1[k] * x[k]; r2 += a2[k] * x[k]; r3 += a3[k] * x[k]; }
        u[w] = r0; u[w + 1] = r1; u[w + 2] = r2; u[w + 3] = r3;
    }
    for (; w < W; w++) {
        const float* a0 = a + w * n;
        v16 s0 = {0};
        for (int64_t k = 0; k < nv; k += VW) s0 += ld(a0 + k) * ld(x + k);
        float r0 = hsum(s0);
        for (int64_t k = nv; k < n; k++) r0 += a0[k] * x[k];
        u[w] = r0;
    }
}

/* o[c] += sum_w u[w] * b[w * ldb + c] for c < n, w < wn: o stays in registers over every w */
static void expand(const float* u, const float* b, int64_t ldb, int64_t wn, int64_t n, float* o)
{
    int64_t c = 0;
    for (; c + 4 * VW <= n; c += 4 * VW) {
        v16 o0 = ld(o + c), o1 = ld(o + c + VW), o2 = ld(o + c + 2 * VW), o3 = ld(o + c + 3 * VW);
        for (int64_t w = 0; w < wn; w++) {
            const float* bw = b + w * ldb + c;
            const float uw = u[w];
            o0 += uw * ld(bw); o1 += uw * ld(bw + VW); o2 += uw * ld(bw + 2 * VW); o3 += uw * ld(bw + 3 * VW);
        }
        st(o + c, o0); st(o + c + VW, o1); st(o + c + 2 * VW, o2); st(o + c + 3 * VW, o3);
    }
    for (; c + VW <= n; c += VW) {
        v16 o0 = ld(o + c);
        for (int64_t w = 0; w < wn; w++) o0 += u[w] * ld(b + w * ldb + c);
        st(o + c, o0);
    }
    for (; c < n; c++) {
        float o0 = o[c];
        for (int64_t w = 0; w < wn; w++) o0 += u[w] * b[w * ldb + c];
        o[c] = o0;
    }
}

/* x: rows of `in` floats, row t at x + t*ldx; out: row t at out + t*ldo (added to).
   a: [S, W, in]; b: [S, W, outf]. rows: the adapter tokens' batch rows in segment order;
   seg: [nseg, 3] (slot, lo, hi): rows[lo:hi] use slot. tg: [ntg, 4] (w_lo, w_n, col_lo, col_n):
   rank rows w_lo..w_lo+w_n of B write only columns col_lo..col_lo+col_n. Each row is computed
   by the same code whatever the batch (bitwise batch-invariant). */
void lora_sgmv_f32(const float* x, int64_t ldx, float* out, int64_t ldo,
                   const float* a, const float* b, int64_t in, int64_t W, int64_t outf,
                   const int64_t* rows, const int64_t* seg, int64_t nseg,
                   const int64_t* tg, int64_t ntg)
{
    float u[W > 0 ? W : 1];
    for (int64_t g = 0; g < nseg; g++) {
        const float* as = a + seg[3 * g] * W * in;
        const float* bs = b + seg[3 * g] * W * outf;
        for (int64_t i = seg[3 * g + 1]; i < seg[3 * g + 2]; i++) {
            const int64_t t = rows[i];
            shrink(as, x + t * ldx, in, W, u);
            float* ot = out + t * ldo;
            for (int64_t j = 0; j < ntg; j++) {
                const int64_t w0 = tg[4 * j], c0 = tg[4 * j + 2];
                expand(u + w0, bs + w0 * outf + c0, outf, tg[4 * j + 1], tg[4 * j + 3], ot + c0);
            }
        }
    }
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lora_sgmv_f32.argtypes = [p, i64, p, i64, p, p, i64, i64, i64, p, p, i64, p, i64]
    lib.lora_sgmv_f32.restype = None


_LIB = NativeLibrary("lora_sgmv", _SOURCE, _declare, "torch's matmuls per segment")


def kernel() -> ctypes.CDLL | None:
    """The built library, or None (then :func:`unavailable_reason` says why)."""
    return _LIB.get()


def available() -> bool:
    return kernel() is not None


def unavailable_reason() -> str | None:
    """Why :func:`kernel` returned None (None while it is available or not yet tried)."""
    return _LIB.reason


def targets_table(num_targets: int, rank: int, cols: list[tuple[int, int]]) -> torch.Tensor:
    """The kernel's target table for a module of ``num_targets`` targets of rank ``rank``
    (target ``j``: rank rows ``j*rank..``) writing output columns ``cols[j]`` = (offset, count)."""
    if len(cols) != num_targets:
        raise ValueError(f"targets_table: {len(cols)} column ranges for {num_targets} targets")
    return torch.tensor([[j * rank, rank, c0, cn] for j, (c0, cn) in enumerate(cols)], dtype=torch.int64)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu":
        raise ValueError(f"sgmv_add: {name} must be {dtype} on the CPU, got {t.dtype} on {t.device.type}")


def sgmv_add(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rows: torch.Tensor,
    segments: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """``out[rows[i]] += (x[rows[i]] @ A[s]^T) @ B[s]`` for every segment ``(s, lo, hi)`` of
    ``segments`` [n, 3] and ``lo <= i < hi``, ``B`` restricted to the blocks of ``targets`` (see
    :func:`targets_table`). ``x`` [T, in] and ``out`` [T, out] fp32 with unit column stride;
    ``lora_a`` [S, W, in], ``lora_b`` [S, W, out] contiguous fp32; ``rows``, ``segments``,
    ``targets`` contiguous int64. Returns ``out`` (modified in place). Index data is checked
    here: a bad slot, row or target block raises, never reads out of bounds."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"native LoRA kernel unavailable: {_LIB.reason}")
    for name, t in (("out", out), ("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        _check(name, t, torch.float32)
    for name, t in (("rows", rows), ("segments", segments), ("targets", targets)):
        _check(name, t, torch.int64)
        if not t.is_contiguous():
            raise ValueError(f"sgmv_add: {name} must be contiguous")
    if x.dim() != 2 or out.dim() != 2 or x.shape[0] != out.shape[0] or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"sgmv_add: x {tuple(x.shape)} and out {tuple(out.shape)} must be 2-D row-major")
    s, w, fin = lora_a.shape
    if not (lora_a.is_contiguous() and lora_b.is_contiguous()) or lora_b.shape[:2] != (s, w):
        raise ValueError(f"sgmv_add: lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} mismatch")
    fout = lora_b.shape[2]
    if x.shape[1] != fin or out.shape[1] != fout:
        raise ValueError(
            f"sgmv_add: x {tuple(x.shape)} / out {tuple(out.shape)} do not fit A/B {fin}->{fout}"
        )
    if segments.dim() != 2 or segments.shape[1] != 3 or targets.dim() != 2 or targets.shape[1] != 4:
        raise ValueError("sgmv_add: segments must be [n, 3] and targets [n, 4]")
    check_index(rows, segments, x.shape[0], s)
    check_targets(targets, w, fout)
    return call(lib, out, x, lora_a, lora_b, rows, segments, targets)


def check_index(rows: torch.Tensor, segments: torch.Tensor, num_rows: int, num_slots: int) -> None:
    """Raise ValueError unless every segment is a slot in range over a range of ``rows`` and
    every row is a batch row (done once per step by the batch context, not per module)."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        raise ValueError(f"sgmv rows out of [0, {num_rows})")
    for s, lo, hi in segments.tolist():
        if not (0 <= s < num_slots and 0 <= lo <= hi <= rows.numel()):
            raise ValueError(
                f"sgmv segment ({s}, {lo}, {hi}) out of range ({num_slots} slots, {rows.numel()} rows)"
            )


def check_targets(targets: torch.Tensor, width: int, out_features: int) -> None:
    """Raise ValueError unless every target block lies inside ``[width, out_features]``."""
    for w0, wn, c0, cn in targets.tolist():
        if min(w0, wn, c0, cn) < 0 or w0 + wn > width or c0 + cn > out_features:
            raise ValueError(f"sgmv target ({w0}, {wn}, {c0}, {cn}) outside [{width}, {out_features}]")


def call(
    lib: ctypes.CDLL,
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rows: torch.Tensor,
    segments: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """The unchecked call (the caller has checked shapes, dtypes and index ranges)."""
    s, w, fin = lora_a.shape
    lib.lora_sgmv_f32(
        x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0),
        lora_a.data_ptr(), lora_b.data_ptr(), fin, w, lora_b.shape[2],
        rows.data_ptr(), segments.data_ptr(), segments.shape[0],
        targets.data_ptr(), targets.shape[0],
    )  # fmt: skip
    return out
