"""A native CPU kernel for decode attention that reads the paged KV cache in place.

The torch path of :mod:`engine.attention` gathers every sequence's blocks into a fresh tensor for
every layer and step (a copy of the whole context, written and read again). This kernel walks the
block table instead: for each (query, KV head) pair it reads each key and value once, from its
slot in the cache (prefetched a few keys ahead), in tiles of up to 128 keys with a two-pass softmax
per tile (its exponentials by a polynomial the compiler vectorises, about 1 ulp from ``expf``) and
an online (flash-style) rescale between tiles. The query heads of a KV group share each key read.

The pairs are split over the claim-based thread pool of :mod:`engine.models.linear_native` (one
pool per process: the caller claims items with the helpers that are awake and never waits for one
the OS has not scheduled; issue #17 replaced an OpenMP region, whose barrier cost a time slice per
call on a loaded host). Each pair is computed whole by one thread the same way whichever: results
are bitwise equal across thread counts and :data:`PAR_MIN_WORK`.

Contract of :func:`paged_attention_rows` (fp32 CPU tensors, contiguous):

* ``q`` ``[T, H, hd]``, ``k_cache``/``v_cache`` ``[num_blocks, block_size, KVH, hd]`` (one layer),
  ``tables`` ``[R, W]`` int64 block tables, ``row`` ``[T]`` int64: the table of each query,
* ``lo``/``hi`` ``[T]`` int64: the query attends to key positions ``lo <= p < hi`` (``hi > lo``:
  every query sees at least its own key), ``first`` ``[T]`` int64: the position of its table's first
  slot (a table trimmed to a sliding window starts past 0);
* ``softcap`` (Gemma's ``attn_logit_softcapping``; None or 0: none): each scaled score ``s``
  becomes ``softcap * tanh(s / softcap)`` before the softmax, as transformers' eager attention;
* returns ``[T, H, hd]``. No mask is built: the range *is* the mask (causal, windowed).

The C source is compiled once per (source, compiler flags, CPU) with the system C compiler
(:mod:`engine.native_build`), specialised to the model's GQA group and head dim. :func:`available` is False when
no compiler is found or the build fails (the reason is in :func:`unavailable_reason`); the engine
then uses the torch path, which computes the same attention (tests compare them).
``PDSERVE_ATTENTION=torch`` forces the torch path.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from engine.native_build import NativeBuildError, build_library

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <float.h>

#define TILE 128
#define MAX_CHUNKS 65535
/* keys ahead whose K (or V) row is prefetched: slots of one KV head are D floats every KVH * D,
   a stride the hardware prefetcher follows late */
#define PF 16
#define PREFETCH_ROW(p)                                                              \
    do {                                                                             \
        for (int64_t c_ = 0; c_ < D_; c_ += 16) __builtin_prefetch((p) + c_, 0, 3); \
    } while (0)

/* e^x for x <= 0 (and NaN: NaN), in plain arithmetic the compiler vectorises (libm's expf is a
   call per element): x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' expf polynomial (about 1 ulp),
   times 2^n built in the exponent bits. x below -87.3 gives 0 (expf: a subnormal <= 1.2e-38).
   (Rounding by rintf: the 1.5 * 2^23 shift trick is folded away by -fassociative-math.) */
static inline float exp_nonpos(float x)
{
    const float xc = x < -87.3f ? -87.3f : x;  /* NaN stays NaN */
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } sc;
    sc.i = ((int32_t)(n == n ? n : 0.f) + 127) << 23;  /* 2^n, n in [-126, 0]; NaN: p is NaN */
    return p * sc.f;
}

typedef void (*chunk_fn)(void* ctx, int64_t i);
typedef void (*pool_run_fn)(chunk_fn fn, void* ctx, int64_t n);
/* engine.models.linear_native's f32_pool_run (set by attn_set_pool; NULL: one thread) */
static pool_run_fn g_pool_run = 0;

void attn_set_pool(void* run) { g_pool_run = (pool_run_fn)run; }

typedef struct {
    const float* q; const float* kc; const float* vc;
    const int64_t* tables; int64_t tw; const int64_t* row;
    const int64_t* lo; const int64_t* hi; const int64_t* first;
    int64_t T, H, KVH, bs; float scale, softcap; float* out;
    int64_t per_chunk;  /* (query, KV head) items per chunk */
} attn_job_t;

/* one (query t, KV head kh) item: its G query heads over the keys [lo[t], hi[t]) */
static void item(const attn_job_t* j, int64_t w)
{
    enum { G = G_, D = D_ };  /* compiled per (query heads per KV head, head dim) */
    const int64_t KVH = j->KVH, H = j->H, bs = j->bs;
    const float scale = j->scale, softcap = j->softcap;
    const float* kc = j->kc;
    const float* vc = j->vc;
    const int64_t tok_stride = KVH * D;  /* floats between consecutive slots */
    const int64_t t = w / KVH, kh = w % KVH;
    const int64_t* tab = j->tables + j->row[t] * j->tw;
    const float* qq = j->q + (t * H + kh * G) * D;
    float qs[G][D];
    float acc[G][D];
    float m[G], l[G];
    float s[G][TILE];
    int64_t slot[TILE];
    for (int64_t g = 0; g < G; g++) {
        for (int64_t d = 0; d < D; d++) { qs[g][d] = qq[g * D + d] * scale; acc[g][d] = 0.f; }
        l[g] = 0.f;
        m[g] = 0.f;
    }
    const int64_t p_end = j->hi[t], base = j->first[t];
    int started = 0;
    for (int64_t p0 = j->lo[t]; p0 < p_end; p0 += TILE) {
        const int64_t n = (p_end - p0) < TILE ? (p_end - p0) : TILE;
        /* the tile's cache slots, walking the block table (one division per tile, not per key) */
        int64_t blk = (p0 - base) / bs, off = (p0 - base) % bs;
        for (int64_t i = 0; i < n; i++) {
            slot[i] = (tab[blk] * bs + off) * tok_stride + kh * D;
            if (++off == bs) { off = 0; blk++; }
        }
        for (int64_t i = 0; i < n; i++) {
            const float* k = kc + slot[i];
            if (i + PF < n) PREFETCH_ROW(kc + slot[i + PF]);
            float dot[G_];
            for (int64_t g = 0; g < G; g++) dot[g] = 0.f;
            for (int64_t d = 0; d < D; d++) {
                const float kd = k[d];
                for (int64_t g = 0; g < G; g++) dot[g] += qs[g][d] * kd;
            }
            if (softcap > 0.f)  /* Gemma: cap * tanh(score / cap) */
                for (int64_t g = 0; g < G; g++) s[g][i] = softcap * tanhf(dot[g] / softcap);
            else
                for (int64_t g = 0; g < G; g++) s[g][i] = dot[g];
        }
        for (int64_t g = 0; g < G; g++) {
            float mx = s[g][0];
            for (int64_t i = 1; i < n; i++) mx = s[g][i] > mx ? s[g][i] : mx;
            float m_new = (started && m[g] > mx) ? m[g] : mx;
            float corr = started ? exp_nonpos(m[g] - m_new) : 0.f;
            float sum = 0.f;
            for (int64_t i = 0; i < n; i++) { float e = exp_nonpos(s[g][i] - m_new); s[g][i] = e; sum += e; }
            l[g] = l[g] * corr + sum;
            m[g] = m_new;
            if (started) for (int64_t d = 0; d < D; d++) acc[g][d] *= corr;
        }
        started = 1;
        for (int64_t i = 0; i < n; i++) {
            const float* v = vc + slot[i];
            if (i + PF < n) PREFETCH_ROW(vc + slot[i + PF]);
            for (int64_t g = 0; g < G; g++) {
                const float e = s[g][i];
                for (int64_t d = 0; d < D; d++) acc[g][d] += e * v[d];
            }
        }
    }
    float* o = j->out + (t * H + kh * G) * D;
    for (int64_t g = 0; g < G; g++) {
        const float inv = 1.f / l[g];
        for (int64_t d = 0; d < D; d++) o[g * D + d] = acc[g][d] * inv;
    }
}

static void chunk(void* ctx, int64_t c)
{
    const attn_job_t* j = (const attn_job_t*)ctx;
    const int64_t n = j->T * j->KVH, w0 = c * j->per_chunk;
    const int64_t w1 = w0 + j->per_chunk < n ? w0 + j->per_chunk : n;
    for (int64_t w = w0; w < w1; w++) item(j, w);
}

/* see engine/attention_native.py for the contract; G_ and D_ are set at compile time. Each
   (query, KV head) item is computed whole by one thread, the same way whichever: the result does
   not depend on the thread count or on par_min. */
void paged_attention_rows_f32(
    const float* q, const float* kc, const float* vc,
    const int64_t* tables, int64_t tw, const int64_t* row,
    const int64_t* lo, const int64_t* hi, const int64_t* first,
    int64_t T, int64_t H, int64_t KVH, int64_t head_dim, int64_t bs, float scale, float softcap,
    float* out, int64_t par_min)
{
    (void)head_dim;
    const int64_t n = T * KVH;
    attn_job_t j = {q, kc, vc, tables, tw, row, lo, hi, first, T, H, KVH, bs, scale, softcap, out, 1};
    int64_t work = 0;  /* keys x KV heads: below par_min the calling thread alone */
    for (int64_t t = 0; t < T; t++) work += (hi[t] - lo[t]) * KVH;
    if (work < par_min || g_pool_run == 0 || n < 2) {
        for (int64_t w = 0; w < n; w++) item(&j, w);
        return;
    }
    j.per_chunk = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
    g_pool_run(chunk, &j, (n + j.per_chunk - 1) / j.per_chunk);
}
"""

# keys x KV heads of a call below which it runs on the calling thread alone: under it a call is a
# few tens of microseconds on one thread (batch 1 x context 256 = 768: 14-21 us), about what waking a
# sleeping helper costs. (It was 8192 under OpenMP, whose region cost more than the attention at
# batch 1 and a time slice per layer on a loaded host; on the claim pool a split never waits for a
# descheduled helper, and engine A/Bs at batch 8/32 x 256, load 13-20, could not tell 0, 2048 and
# 8192 apart: 604-650 ms and 1420-1500 ms steps.)
PAR_MIN_WORK = 2048

_libs: dict[tuple[int, int], ctypes.CDLL] = {}
_reason: str | None = None


def _build(group: int, head_dim: int) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the kernel for ``group`` query heads per KV head
    and ``head_dim``."""
    lib = build_library(
        f"paged_attention_g{group}_d{head_dim}",
        _SOURCE,
        [f"G_={group}", f"D_={head_dim}"],
    )
    f = lib.paged_attention_rows_f32
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    f.argtypes = [
        p,
        p,
        p,
        p,
        i64,
        p,
        p,
        p,
        p,
        i64,
        i64,
        i64,
        i64,
        i64,
        ctypes.c_float,
        ctypes.c_float,
        p,
        i64,
    ]
    f.restype = None
    lib.attn_set_pool.argtypes = [ctypes.c_void_p]
    lib.attn_set_pool.restype = None
    from engine.models.linear_native import pool_run_address

    lib.attn_set_pool(pool_run_address())  # None (no linear kernel): one thread
    return lib


def _kernel(group: int, head_dim: int) -> ctypes.CDLL | None:
    global _reason
    lib = _libs.get((group, head_dim))
    if lib is not None or _reason is not None:
        return lib
    if os.environ.get("PDSERVE_ATTENTION", "") == "torch":
        _reason = "PDSERVE_ATTENTION=torch"
        return None
    try:
        lib = _libs[(group, head_dim)] = _build(group, head_dim)
    except (OSError, NativeBuildError) as e:
        _reason = str(e)
        log.info("native paged attention unavailable (%s): using the torch path", e)
    return lib


def rows_function(group: int, head_dim: int):  # noqa: ANN201 (a ctypes function pointer)
    """The raw C function behind :func:`paged_attention_rows` for this shape (arguments as in its
    call there, then ``PAR_MIN_WORK``; every pointer trusted), or None when the kernel is unavailable: for a caller that
    validated its tensors once per step (engine.models.llama's fused forward)."""
    lib = _kernel(group, head_dim)
    return None if lib is None else lib.paged_attention_rows_f32


def available(group: int = 1, head_dim: int = 64) -> bool:
    """Whether the native kernel for this shape is built and loaded (builds it on first call)."""
    return _kernel(group, head_dim) is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` returned False (None when nothing failed)."""
    return _reason


def supports(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors (fp32 on CPU, ``q`` ``[T, H, hd]``, a layer's cache
    ``[2, nb, bs, KVH, hd]``) and is available."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or cache.dtype != torch.float32:
        return False
    return available(q.shape[1] // cache.shape[3], q.shape[2])


def paged_attention_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    row: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    first: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of each query row over its key range in the paged cache (see the module
    docstring; the index tensors are trusted: :func:`check_rows` validates them). ``out``
    (``[T, H, hd]``, contiguous fp32) is written and returned when given; ``softcap``: the
    scores' tanh soft-cap (None: none; must be > 0 when given)."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    t, h, d = q.shape
    nb, bs, kvh, d2 = k_cache.shape
    if d2 != d or h % kvh or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")
    for name, x in (("tables", tables), ("row", row), ("lo", lo), ("hi", hi), ("first", first)):
        if x.dtype != torch.int64 or not x.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int64 tensor")
    if tables.dim() != 2 or any(x.shape != (t,) for x in (row, lo, hi, first)):
        raise ValueError(f"tables must be [R, W] and row/lo/hi/first [{t}]")
    lib = _kernel(h // kvh, d)
    if lib is None:
        raise RuntimeError(f"native paged attention is unavailable: {_reason}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {tuple(q.shape)}")
    lib.paged_attention_rows_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        tables.data_ptr(), tables.shape[1], row.data_ptr(),
        lo.data_ptr(), hi.data_ptr(), first.data_ptr(),
        t, h, kvh, d, bs, float(scale), float(softcap or 0.0), out.data_ptr(), PAR_MIN_WORK,
    )  # fmt: skip
    return out


def check_rows(
    tables: list[list[int]],
    row: list[int],
    lo: list[int],
    hi: list[int],
    first: list[int],
    block_size: int,
    num_blocks: int,
) -> None:
    """Refuse index data the kernel would read out of bounds with (it trusts them): every table
    entry a block of the pool, ``first <= lo < hi`` and ``hi`` within the row's table."""
    for r, a, b, f in zip(row, lo, hi, first, strict=True):
        tab = tables[r]
        if not (f <= a < b <= f + len(tab) * block_size):
            raise ValueError(f"key range [{a}, {b}) outside table {r} (first {f}, {len(tab)} blocks)")
        need = -(-(b - f) // block_size)
        lo_blk = (a - f) // block_size
        for blk in tab[lo_blk:need]:
            if not 0 <= blk < num_blocks:
                raise ValueError(f"block {blk} of table {r} is outside the pool of {num_blocks}")
