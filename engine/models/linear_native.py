"""A native fp32 "skinny" linear for small CPU batches (issue #17): ``y = x @ w.T (+ b)``.

At decode the batch has a few rows and a projection is a matrix-vector product: its cost is
reading the weight once. :func:`skinny_linear` reads each group of 4 fp32 weight rows from memory
once and, while it sits in L1, runs every activation row of the batch against it in register tiles
of 4 weight rows x up to 6 activation rows (AVX-512: 24 accumulators of 16 lanes; AVX2: 4 x 3 of 8
lanes; else whatever ``-march=native`` vectorises the portable loop to), so 32 rows cost the weight
traffic of one and the arithmetic runs from cache. With AVX-512 the first tile of a group also
prefetches the next group's weight rows (one line per row per k step), so the memory read of the
next group overlaps the arithmetic on this one instead of stalling the tile that touches it first;
the 4 weight vectors stay in registers across the tile's activation rows; the 4 sums of a row are
reduced together (one shuffle tree, then one 4-float store); a single row runs against 8 weight
rows per pass (8 streams from memory). Up to 16 rows the tiles are 6 rows and
a remainder, above that as equal as can be (measured fastest that way; bench/linear_skinny.py).
Each output element is one vector accumulator over K reduced in a fixed order, so its value depends
neither on the thread count nor on the other rows of the batch. The work is split by output rows
over a
small thread pool of its own (torch's thread count): the caller and helpers claim chunks of
weight rows from one atomic counter, helpers sleep on a futex when idle, and the caller waits
only for chunks a helper has claimed, so a helper the OS has not scheduled costs nothing. An
OpenMP region (the first version) waits at its barrier for every thread: on an oversubscribed
host the spinning worker loses its wake-up priority and each call could wait a time slice
(measured 0.04-0.16x torch at 1 row under load; bench/linear_skinny.py ``--busy``). Batches of
more than :data:`NATIVE_MAX_ROWS` rows call ``F.linear`` (BLAS GEMM).

:class:`LinearBackend` names the choice (``EngineConfig(linear=...)``, env ``PDSERVE_LINEAR``):

* ``torch``: every projection is ``nn.Linear`` (``F.linear``);
* ``native``: the decoder's projections (fused ``qkv``, ``o_proj``, fused ``gate_up``,
  ``down_proj``) and the ``lm_head`` become :class:`NativeLinear` (the same parameters, no copy):
  up to :data:`NATIVE_MAX_ROWS` rows the kernel, more rows, a non-fp32 or non-CPU input, or no C
  compiler: ``F.linear``;
* ``auto``: ``native`` where :func:`resolve_linear` allows it (float32 model on CPU, not
  mixture-of-experts, the kernel builds), else ``torch``.

An engine takes ``EngineConfig.linear``, or when that is None env ``PDSERVE_LINEAR``, else
``auto`` (:func:`engine_linear`); ``load_model`` defaults to ``torch``.

``native`` asked for explicitly on a model it does not apply to (CUDA, non-fp32, int8 weights,
MoE) is refused with :class:`UnsupportedLinearError` naming why; ``auto`` takes ``torch`` there. The caller (engine.llm_engine) keeps ``torch``
for tensor parallelism and weight offloading; with LoRA the adapters' ``LoRALinear`` wraps the
``NativeLinear`` base (the low-rank update stays in torch). fp32 sums in another order than BLAS: results
differ from ``F.linear`` by rounding only (tests/unit/test_linear_native.py).
"""

from __future__ import annotations

import ctypes
import enum
import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.native_build import NativeLibrary

# rows up to which the kernel takes a projection (more: F.linear). Measured 2026-12-06 02:4x UTC on
# SmolLM2-135M's shapes, a loaded host (load 3-13): single-thread CPU time (thread_time, which
# descheduled time does not count) of the whole model's projections, native / torch (1 thread):
# 2.30x / 1.77x / 1.95x / 1.63x / 1.72x / 1.86x / 1.89x faster at 1 / 4 / 8 / 12 / 16 / 24 / 32 rows
# (108 GFLOP/s at 32 rows against torch's 58), and still 1.8-1.9x at 48 / 64 / 128 rows;
# bench/linear_skinny.py (2 threads, wall clock) had native ahead on the whole model at every row
# count 1..32 in two runs. 32 is the largest decode batch measured end to end (bench/engine_bound.py);
# prefill chunks above it keep BLAS. (The previous 3-row AVX2 tile lost to F.linear past 8 rows on a
# quiet host: 0.89x / 0.79x at 12 / 16 rows.)
NATIVE_MAX_ROWS = 32
# weights smaller than this are read by the calling thread alone (splitting costs a wake-up)
SPLIT_MIN_BYTES = 256 * 1024
# how long an idle helper thread spins for the next call before it sleeps on a futex
HELPER_SPIN_US = 50.0


class UnsupportedLinearError(ValueError):
    """A ``linear`` backend this engine does not implement for this model/device (message says why)."""


class LinearBackend(enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    NATIVE = "native"

    @staticmethod
    def parse(name: str | LinearBackend) -> LinearBackend:
        """The member named ``name``; UnsupportedLinearError naming the choices otherwise."""
        if isinstance(name, LinearBackend):
            return name
        try:
            return LinearBackend(name)
        except ValueError:
            choices = ", ".join(m.value for m in LinearBackend)
            raise UnsupportedLinearError(f"linear must be one of {choices}; got {name!r}") from None


_SOURCE = r"""
#define _GNU_SOURCE
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__AVX512F__)
#include <immintrin.h>
/* AVX-512: tiles of up to MB_MAX activation rows x 4 weight rows, 16 lanes; 24 accumulators + 4
   weight vectors + 1 activation vector fit the 32 zmm registers. */
#ifndef MB_MAX
#define MB_MAX 6
#endif
/* the first tile of a group of 4 weight rows prefetches the group PF_DIST groups ahead (0: none) */
#ifndef PF_DIST
#define PF_DIST 1
#endif
/* one row streams the weights alone: the hardware prefetcher does it (software prefetch measured 5% slower) */
#ifndef PF_MIN_ROWS
#define PF_MIN_ROWS 2
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
#define HAVE_PF 1
#ifndef ROW8
#define ROW8 1
#endif
/* keep the weight vectors in registers (else gcc folds them into the FMAs as loads per row) */
#ifndef WREG
#define WREG 1
#endif

/* the lane sums of a0..a3 in lanes 0..3, each by the tree of _mm512_reduce_add_ps (lane l + l+8,
   then + 4, + 2, + 1): an element's value does not depend on which accumulators share the call */
static inline __attribute__((always_inline)) __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3)
{
    const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
    const __m512 p = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
    const __m512 q = _mm512_add_ps(p, _mm512_permute_ps(p, 0xB1));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), q));
}

/* out[m, n0 + j] for m < MB (x rows from x), j < NB (w rows from w); MB <= MB_MAX, NB <= 4 constant.
   Every output element is one 16-lane accumulator over k (the K tail a masked load of zeros beyond
   K), reduced the same way: its value does not depend on MB, NB or which thread computed it.
   pf (or NULL): NB rows of K weights to prefetch meanwhile, one cache line per row per k step. */
static inline __attribute__((always_inline)) void tile(
    const float* restrict x, int64_t K, const float* restrict w, const int MB, const int NB,
    const float* restrict bias, int64_t n0, float* restrict out, int64_t N, const float* pf)
{
    __m512 acc[MB_MAX][4];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (pf)
            for (int j = 0; j < NB; j++) _mm_prefetch((const char*)(pf + j * K + k), PF_HINT);
        __m512 wv[4];
        for (int j = 0; j < NB; j++) {
            wv[j] = _mm512_loadu_ps(w + j * K + k);
#if WREG
            if (MB > 1) __asm__("" : "+v"(wv[j]));
#endif
        }
        for (int i = 0; i < MB; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * K + k);
            /* keep xv in a register: folded into each FMA as a memory operand it would be loaded
               NB times (28 loads per 24 FMAs, load-bound) instead of once (10 per 24) */
            __asm__("" : "+v"(xv));
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wv[4];
        for (int j = 0; j < NB; j++) wv[j] = _mm512_maskz_loadu_ps(mk, w + j * K + k);
        for (int i = 0; i < MB; i++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x + i * K + k);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    const __mmask8 mn = (__mmask8)((1u << NB) - 1u);
    const __m128 b = bias ? _mm_maskz_loadu_ps(mn, bias + n0) : _mm_setzero_ps();
    for (int i = 0; i < MB; i++) {
        const __m128 r = _mm_add_ps(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), b);
        if (NB == 4)
            _mm_storeu_ps(out + i * N + n0, r);
        else
            _mm_mask_storeu_ps(out + i * N + n0, mn, r);
    }
}
/* MR (1 or 2) activation rows against ROW_NR weight rows (ROW_NR streams from memory, no software
   prefetch): each output element exactly as tile() computes it (same accumulation and reduction
   order), so a row gets the same bits whichever kernel its batch size picks. Taken for one row
   (measured 1.1x faster than 4-row groups there; 16 rows no better); at two rows it measured the
   same as the prefetching tile (0.96-0.98x), so two rows and more keep the tile. */
#define HAVE_ROW8 1
#ifndef ROW_NR
#define ROW_NR 8
#endif
static inline __attribute__((always_inline)) void row8(
    const float* restrict x, int64_t K, const float* restrict w, const int MR, const float* restrict bias,
    int64_t n0, float* restrict out, int64_t N)
{
    __m512 acc[2][ROW_NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < ROW_NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[2];
        for (int i = 0; i < MR; i++) xv[i] = _mm512_loadu_ps(x + i * K + k);
        for (int j = 0; j < ROW_NR; j++) {
            const __m512 wv = _mm512_loadu_ps(w + j * K + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    if (k < K) {
        const __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);
        __m512 xv[2];
        for (int i = 0; i < MR; i++) xv[i] = _mm512_maskz_loadu_ps(mk, x + i * K + k);
        for (int j = 0; j < ROW_NR; j++) {
            const __m512 wv = _mm512_maskz_loadu_ps(mk, w + j * K + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < ROW_NR; j += 4) {
            __m128 r = reduce4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
            if (bias) r = _mm_add_ps(r, _mm_loadu_ps(bias + n0 + j));
            _mm_storeu_ps(out + i * N + n0 + j, r);
        }
}
#define CPU_RELAX() _mm_pause()
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2: 16 ymm registers hold 3 x 4 accumulators + 4 weight vectors */
#undef MB_MAX
#define MB_MAX 3

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[m, n0 + j] for m < MB (x rows from x), j < NB (w rows from w); MB <= 3, NB <= 4 constant */
static inline __attribute__((always_inline)) void tile(
    const float* restrict x, int64_t K, const float* restrict w, const int MB, const int NB,
    const float* restrict bias, int64_t n0, float* restrict out, int64_t N, const float* pf)
{
    (void)pf;
    __m256 acc[3][4];
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[3];
        for (int i = 0; i < MB; i++) xv[i] = _mm256_loadu_ps(x + i * K + k);
        for (int j = 0; j < NB; j++) {
            const __m256 wv = _mm256_loadu_ps(w + j * K + k);
            for (int i = 0; i < MB; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = hsum8(acc[i][j]);
            for (int64_t kk = k; kk < K; kk++) s += x[i * K + kk] * w[j * K + kk];
            out[i * N + n0 + j] = s + (bias ? bias[n0 + j] : 0.f);
        }
}
#define CPU_RELAX() _mm_pause()
#else
#undef MB_MAX
#define MB_MAX 3
static inline __attribute__((always_inline)) void tile(
    const float* restrict x, int64_t K, const float* restrict w, const int MB, const int NB,
    const float* restrict bias, int64_t n0, float* restrict out, int64_t N, const float* pf)
{
    (void)pf;
    for (int i = 0; i < MB; i++)
        for (int j = 0; j < NB; j++) {
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += x[i * K + k] * w[j * K + k];
            out[i * N + n0 + j] = s + (bias ? bias[n0 + j] : 0.f);
        }
}
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#if MB_MAX > 6 || MB_MAX < 1
#error "MB_MAX must be 1..6"
#endif

#ifndef BAL_ABOVE
#define BAL_ABOVE 16
#endif

/* every activation row against the NB weight rows at wn (read from memory once, then from cache):
   above BAL_ABOVE rows ceil(M / MB_MAX) tiles of as equal a size as can be, else tiles of MB_MAX
   rows and one of the remainder; the first one prefetches pf (or NULL) */
#define ROWS(NB)                                                                             \
    for (int64_t m0 = 0, t = 0; m0 < M; t++) {                                               \
        const float* xm = x + m0 * K;                                                        \
        float* om = out + m0 * N;                                                            \
        const float* tp = t == 0 ? pf : NULL;                                                \
        const int64_t mb = M > BAL_ABOVE ? M / nt + (t < M % nt) : (M - m0 >= MB_MAX ? MB_MAX : M - m0); \
        switch (mb) {                                                                        \
        CASES(NB)                                                                            \
        default: tile(xm, K, wn, 1, NB, bias, n0, om, N, tp); break;                         \
        }                                                                                    \
        m0 += mb;                                                                            \
    }
#define CASE(MB, NB) case MB: tile(xm, K, wn, (MB <= MB_MAX ? MB : 1), NB, bias, n0, om, N, tp); break;
#define CASES(NB) CASE(6, NB) CASE(5, NB) CASE(4, NB) CASE(3, NB) CASE(2, NB)

/* output columns [r0, r1) (weight rows) of out = x @ w.T (+ bias); r0 a multiple of 4 or r1 == N.
   Each output element is computed the same way whatever the range, so any split is bitwise equal. */
static void rows_range(const float* x, int64_t M, int64_t K, const float* w, const float* bias, int64_t N,
                       float* out, int64_t r0, int64_t r1)
{
    const int64_t nt = (M + MB_MAX - 1) / MB_MAX;
    (void)nt;
    const float* wend = w + N * K;
    int64_t n0 = r0;
#if defined(HAVE_ROW8) && ROW8
    if (M == 1)
        for (; n0 + ROW_NR <= r1; n0 += ROW_NR) row8(x, K, w + n0 * K, 1, bias, n0, out, N);
#endif
    for (; n0 + 4 <= r1; n0 += 4) {
        const float* wn = w + n0 * K;
#if defined(HAVE_PF) && PF_DIST > 0
        const float* pf = M >= PF_MIN_ROWS && wn + 4 * PF_DIST * K + 4 * K <= wend ? wn + 4 * PF_DIST * K : NULL;
#else
        const float* pf = NULL;
        (void)wend;
#endif
        ROWS(4)
    }
    for (; n0 < r1; n0++) {
        const float* wn = w + n0 * K;
        const float* pf = NULL;
        ROWS(1)
    }
}

/* ---- a small thread pool that never waits for a helper that is not running ----
   The caller publishes a job (generation gen, n chunks of weight rows) in one atomic word
   (gen << 32 | next << 16 | n); the caller and every awake helper claim chunks from it with a CAS
   and count finished chunks in g_done; the caller then waits only for chunks a helper claimed and
   is still computing. A helper that is descheduled or asleep simply claims nothing: on an
   oversubscribed host the call costs at most the single-thread time (plus, rarely, a helper
   preempted inside one small chunk), instead of a scheduler time slice per call as with a
   spinning OpenMP barrier. Helpers spin for g_spin_ns after their last job, then sleep on a futex
   (a sleeping thread keeps its wake-up priority under CFS/EEVDF; a spinning one loses it). */
#define MAX_HELPERS 15
/* bytes of weight per claimed chunk (64 KiB measured no different) */
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 32768
#endif
#define MAX_CHUNKS 65535

/* one job: chunk i of n runs fn(ctx, i); chunks may run on any thread, in any order */
typedef void (*chunk_fn)(void* ctx, int64_t i);
typedef struct {
    chunk_fn fn;
    void* ctx;
} job_t;

typedef struct {
    const float* x;
    const float* w;
    const float* bias;
    float* out;
    int64_t M, K, N, rows;
} linear_job_t;

static void linear_chunk(void* ctx, int64_t i)
{
    const linear_job_t* j = (const linear_job_t*)ctx;
    const int64_t r0 = i * j->rows, r1 = r0 + j->rows < j->N ? r0 + j->rows : j->N;
    rows_range(j->x, j->M, j->K, j->w, j->bias, j->N, j->out, r0, r1);
}

static job_t g_job;
static _Atomic uint64_t g_state;
static _Atomic int64_t g_done;
static _Atomic uint32_t g_gen; /* futex word: the latest job's generation */
static _Atomic int g_sleepers;
static int g_want = 1;    /* threads asked for (caller included) */
static int g_started = 0; /* helpers running in this process */
static long g_spin_ns = 50000;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_start_lock = PTHREAD_MUTEX_INITIALIZER;

static int claim(uint32_t gen, int64_t* idx)
{
    uint64_t s = atomic_load_explicit(&g_state, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(s >> 32) != gen) return 0;
        const uint64_t next = (s >> 16) & 0xffff, n = s & 0xffff;
        if (next >= n) return 0;
        if (atomic_compare_exchange_weak_explicit(&g_state, &s, s + (1u << 16), memory_order_acq_rel,
                                                  memory_order_acquire)) {
            *idx = (int64_t)next;
            return 1;
        }
    }
}

static int run_chunks(uint32_t gen)
{
    int64_t i;
    int did = 0;
    while (claim(gen, &i)) {
        /* g_job read only after a successful claim: job gen is live until its chunks are done */
        g_job.fn(g_job.ctx, i);
        atomic_fetch_add_explicit(&g_done, 1, memory_order_release);
        did++;
    }
    return did;
}

static long elapsed_ns(const struct timespec* t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000000L + (t.tv_nsec - t0->tv_nsec);
}

static void* helper_main(void* arg)
{
    (void)arg;
    uint32_t seen = atomic_load(&g_gen);
    for (;;) {
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        uint32_t g;
        unsigned spins = 0;
        while ((g = atomic_load_explicit(&g_gen, memory_order_acquire)) == seen) {
            if ((++spins & 255) == 0 && elapsed_ns(&t0) > g_spin_ns) break;
            CPU_RELAX();
        }
        if (g == seen) {
            atomic_fetch_add(&g_sleepers, 1);
            syscall(SYS_futex, &g_gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&g_sleepers, 1);
            continue;
        }
        seen = g;
        run_chunks(g);
    }
    return NULL;
}

static void after_fork_child(void)
{
    /* threads do not survive fork: start new helpers lazily in the child */
    g_started = 0;
    atomic_store(&g_sleepers, 0);
    pthread_mutex_init(&g_lock, NULL);
    pthread_mutex_init(&g_start_lock, NULL);
}

/* threads (caller included, 1..MAX_HELPERS + 1) and helpers' spin before sleeping (ns) */
void f32_pool_config(int threads, long spin_ns)
{
    g_want = threads < 1 ? 1 : threads > MAX_HELPERS + 1 ? MAX_HELPERS + 1 : threads;
    g_spin_ns = spin_ns < 0 ? 0 : spin_ns;
}

static int helpers(void)
{
    if (g_started >= g_want - 1) return g_want - 1;
    pthread_mutex_lock(&g_start_lock);
    static int atfork = 0;
    if (!atfork) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork = 1;
    }
    while (g_started < g_want - 1) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&a, 256 * 1024);
        const int rc = pthread_create(&t, &a, helper_main, NULL);
        pthread_attr_destroy(&a);
        if (rc != 0) break;
        g_started++;
    }
    pthread_mutex_unlock(&g_start_lock);
    return g_started;
}

/* run fn(ctx, i) for every i < n on the calling thread and any awake helpers; returns when all
   are done. n <= MAX_CHUNKS. Runs them all on the calling thread when the pool has no helpers or
   another caller holds it. Exported for the other native kernels (engine.attention_native), so
   the process keeps one pool. */
void f32_pool_run(chunk_fn fn, void* ctx, int64_t n)
{
    if (n < 2 || n > MAX_CHUNKS || g_want < 2 || helpers() < 1 || pthread_mutex_trylock(&g_lock) != 0) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    g_job = (job_t){fn, ctx};
    atomic_store_explicit(&g_done, 0, memory_order_relaxed);
    const uint32_t gen = atomic_load(&g_gen) + 1;
    atomic_store_explicit(&g_state, ((uint64_t)gen << 32) | (uint64_t)n, memory_order_release);
    atomic_store(&g_gen, gen);
    if (atomic_load(&g_sleepers) > 0) syscall(SYS_futex, &g_gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    run_chunks(gen);
    unsigned spins = 0;
    while (atomic_load_explicit(&g_done, memory_order_acquire) < n) {
        if ((++spins & 1023) == 0) sched_yield(); /* a helper preempted inside a chunk */
        CPU_RELAX();
    }
    pthread_mutex_unlock(&g_lock);
}

/* out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); x [M, K], w [N, K], out [M, N], all f32.
   min_split_bytes: weights smaller than this run on the calling thread only. */
void f32_linear(const float* x, int64_t M, int64_t K, const float* w, const float* bias, int64_t N,
                float* out, int64_t min_split_bytes)
{
    /* chunks of about 32 KiB of weight, a multiple of 4 rows, at most MAX_CHUNKS of them */
    int64_t rows = ((CHUNK_BYTES / (K * 4 > 0 ? K * 4 : 1)) + 3) / 4 * 4;
    if (rows < 4) rows = 4;
    const int64_t min_rows = ((N + MAX_CHUNKS - 1) / MAX_CHUNKS + 3) / 4 * 4;
    if (rows < min_rows) rows = min_rows;
    const int64_t nch = (N + rows - 1) / rows;
    if (nch < 2 || N * K * 4 < min_split_bytes) {
        rows_range(x, M, K, w, bias, N, out, 0, N);
        return;
    }
    linear_job_t j = {x, w, bias, out, M, K, N, rows};
    f32_pool_run(linear_chunk, &j, nch);
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.f32_linear.argtypes = [p, i64, i64, p, p, i64, p, i64]
    lib.f32_linear.restype = None
    lib.f32_pool_config.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.f32_pool_config.restype = None
    lib.f32_pool_config(torch.get_num_threads(), int(HELPER_SPIN_US * 1000))


_LIB = NativeLibrary("f32_linear", _SOURCE, _declare, "F.linear for every batch")


def kernel() -> ctypes.CDLL | None:
    """The built kernel library, or None (then :func:`kernel_unavailable_reason` says why)."""
    return _LIB.get()


def configure_pool(threads: int, spin_us: float = HELPER_SPIN_US) -> None:
    """Use ``threads`` threads per call (the caller and ``threads - 1`` helpers, started on the
    next call that splits) whose helpers spin ``spin_us`` after a job before sleeping. The
    default, set when the kernel loads: torch's thread count and :data:`HELPER_SPIN_US`."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"fp32 linear kernel unavailable: {_LIB.reason}")
    lib.f32_pool_config(int(threads), int(spin_us * 1000))


def pool_run_address() -> int | None:
    """The address of the kernel library's ``f32_pool_run(fn, ctx, n)`` (C: run ``fn(ctx, i)`` for
    ``i < n``, ``n <= 65535``, on the calling thread and the pool's awake helpers; returns when all
    are done), for the other native kernels to share this one pool; None when the library is
    unavailable."""
    lib = kernel()
    return None if lib is None else ctypes.cast(lib.f32_pool_run, ctypes.c_void_p).value


def kernel_unavailable_reason() -> str | None:
    """Why :func:`kernel` returned None (None while it is available or not yet tried)."""
    return _LIB.reason


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by the native kernel, any number of rows: ``x [..., K]``,
    ``weight [N, K]``, ``bias [N]``, all fp32 on CPU (ValueError otherwise, or RuntimeError
    when the kernel cannot be built)."""
    lib = kernel()
    if lib is None:
        raise RuntimeError(f"fp32 linear kernel unavailable: {_LIB.reason}")
    tensors = [x, weight] + ([] if bias is None else [bias])
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        raise ValueError("skinny_linear takes float32 CPU tensors")
    n, k = weight.shape
    if x.shape[-1] != k or (bias is not None and tuple(bias.shape) != (n,)):
        raise ValueError(f"skinny_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias mismatch")
    x2 = x.reshape(-1, k).contiguous()
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m:
        lib.f32_linear(
            x2.data_ptr(),
            m,
            k,
            w.data_ptr(),
            None if b is None else b.data_ptr(),
            n,
            out.data_ptr(),
            SPLIT_MIN_BYTES,
        )
    return out.view(*x.shape[:-1], n)


class NativeLinear(nn.Linear):
    """``nn.Linear`` (same parameters and state) whose forward takes :func:`skinny_linear` for
    fp32 CPU inputs of at most :data:`NATIVE_MAX_ROWS` rows with an fp32 CPU weight, and
    ``F.linear`` for everything else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.dtype == torch.float32
            and w.dtype == torch.float32
            and x.device.type == "cpu"
            and w.device.type == "cpu"
            and x.numel() <= NATIVE_MAX_ROWS * self.in_features
            and not torch.is_grad_enabled()
            and _LIB.loaded
        ):
            return skinny_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


DEFAULT_BACKEND = LinearBackend.AUTO


def engine_linear(linear: str | None, offload: bool = False) -> LinearBackend:
    """The backend an engine asks :func:`engine.models.loader.load_model` for: ``linear``
    (``EngineConfig.linear``), or if None env ``PDSERVE_LINEAR``, else :data:`DEFAULT_BACKEND`
    (``auto``). With weight offloading: ``torch`` (``native`` asked for: UnsupportedLinearError).
    LoRA adapters take any backend: :class:`engine.lora.layers.LoRALinear` wraps the (native)
    base projection and adds the low-rank update in torch."""
    env = os.environ.get("PDSERVE_LINEAR", DEFAULT_BACKEND.value)
    lb = LinearBackend.parse(linear if linear is not None else env)
    if offload:
        if linear is not None and lb is LinearBackend.NATIVE:
            raise UnsupportedLinearError(
                "linear 'native' is refused with weight offloading; use linear='torch'"
            )
        return LinearBackend.TORCH
    return lb


def resolve_linear(
    linear: str | LinearBackend,
    cfg: object,
    dtype: torch.dtype,
    device: torch.device,
    weight_dtype: str = "float32",
) -> LinearBackend:
    """``TORCH`` or ``NATIVE`` for a model of config ``cfg`` in ``dtype`` on ``device`` whose
    projections are stored as ``weight_dtype`` (:mod:`engine.models.quant`). ``AUTO``: ``NATIVE``
    where it applies (float32 weights on CPU, not MoE) and the kernel builds, else ``TORCH``.
    ``NATIVE`` where it does not apply: UnsupportedLinearError naming why."""
    lb = LinearBackend.parse(linear)
    if lb is LinearBackend.TORCH:
        return lb
    why = None
    if device.type != "cpu" or dtype != torch.float32:
        why = f"it needs a float32 model on CPU, got {dtype} on {device.type}"
    elif weight_dtype != "float32":
        why = f"it needs weight_dtype float32, got {weight_dtype} (that path has its own kernel)"
    elif getattr(cfg, "moe", None) is not None:
        why = f"mixture-of-experts models ({getattr(cfg, 'model_type', '?')}) keep torch's linear"
    if why is None and kernel() is None:
        why = f"the kernel cannot be built ({_LIB.reason})"
    if why is None:
        return LinearBackend.NATIVE
    if lb is LinearBackend.NATIVE:
        raise UnsupportedLinearError(f"linear 'native' is refused: {why}; use linear='torch'")
    return LinearBackend.TORCH


def apply_native_linear(model: nn.Module) -> nn.Module:
    """Turn the decoder's ``nn.Linear`` projections and the ``lm_head`` of a loaded model into
    :class:`NativeLinear` in place (the same parameter tensors; tied weights stay tied)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for child in parent.children():
                if type(child) is nn.Linear:
                    child.__class__ = NativeLinear
    if type(model.lm_head) is nn.Linear:
        model.lm_head.__class__ = NativeLinear
    return model
