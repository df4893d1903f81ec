"""Engine vs the hardware's limits (issue #17): decode step / bandwidth bound, prefill / compute bound,
and llama.cpp on the same model and precision as a peer, all measured in this run on this machine.

1. Decode step (``LLMEngine.step()`` with every sequence decoding: scheduler, metadata, forward,
   logits of the sampled rows, sampler) at batch 1/8/32 x context 256/2048. The KV of each sequence
   is random and distinct (imported through ``LLMEngine.import_kv``, the decode worker's own path),
   so no block is shared and nothing is prefilled. Bounds, from figures measured in this run:

   * bandwidth bound = (weights read once + every sequence's K and V read once) / read bandwidth
     (a streaming ``sum`` over a 256 MiB buffer, median of repetitions);
   * compute bound = (2 x matmul parameters x batch + attention FLOPs) / matmul FLOP/s (an fp32 GEMM
     of the model's own MLP shape, median of repetitions; the faster of BLAS and oneDNN).

   Target (issue #17): step <= 1.5x the bandwidth bound. Where the compute bound is the larger one
   (large batches on a CPU without wide FMA units) the bandwidth target cannot be met by any
   implementation; the table prints both and the ratio to ``max(bandwidth, compute)``.
   Each cell is timed in ``--reps`` repetitions of ``--steps`` steps; the step figure is the median
   over every step, and the spread is the range of the repetitions' medians.
2. Prefill: one prompt of 256 and 1024 tokens through ``LLMEngine.step()`` (one chunk) vs
   FLOPs / matmul FLOP/s. Target <= 1.5x.
3. Peer: llama.cpp on the same model and precision. ``--llama-cpp DIR`` is llama.cpp's source
   folder with ``libllama`` built in ``build/bin``, ``--gguf`` the same model as an fp32 GGUF; by
   default both are the cached ones that ``bench/llama_cpp_peer.py`` makes (llama.cpp built once from
   the llama-cpp-python 0.3.36 sdist, and pdserve's own de-quantised SmolLM2 weights written as F32),
   and when they are missing this bench builds them first (minutes on 2 cores; needs cmake and a
   C/C++ compiler, and PyPI the first time). ``--no-peer`` skips the section and the build; explicit
   ``--llama-cpp`` / ``--gguf`` paths are used as given, never built. A minimal C decode loop over
   libllama (:data:`PEER_SOURCE`, compiled here) runs at the same batches and contexts (f32 KV, the
   same thread count), and pdserve's tokens/s is printed beside it. Target: pdserve above llama.cpp
   at batch >= 8, within 1.3x of its step latency at batch 1. A failed build is reported (naming
   what failed) and the bench exits 1.

Usage: python bench/engine_bound.py [--model PATH] [--batches 1,8,32] [--contexts 256,2048]
       [--steps 12] [--reps 3] [--llama-cpp LLAMA_CPP_SRC --gguf FILE | --no-peer] [--weight-dtype int8]
       [--quick]   (or ./dev bench engine_bound [ARGS])
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import llama_cpp_peer  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402

TARGET = 1.5
PEER_LATENCY_TARGET = 1.3


def _median(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def read_bandwidth(reps: int = 7) -> float:
    """Bytes/s of a streaming read (``sum`` over 256 MiB, out of any cache), median of ``reps``."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    return x.numel() * 4 / _median(x.sum, reps)


def matmul_flops(hidden: int, inter: int, reps: int = 7) -> float:
    """FLOP/s of an fp32 GEMM of the model's MLP shape (512 rows), median of ``reps``: the faster
    of torch's ``F.linear`` (BLAS) and oneDNN's linear (:mod:`engine.models.gemm`, which the engine's
    prefill projections use where it runs; on this host's AMD CPU MKL's sgemm reaches about half
    of oneDNN's rate, so a bound from BLAS alone was not the hardware's limit)."""
    from engine.models import gemm

    a = torch.randn(512, hidden)
    w = torch.randn(inter, hidden)
    fns = [torch.nn.functional.linear]
    if gemm.onednn_unavailable_reason() is None:
        fns.append(gemm.onednn_linear)
    best = 0.0
    with torch.inference_mode():
        for fn in fns:
            fn(a, w, None)
            best = max(best, 2 * 512 * hidden * inter / _median(lambda f=fn: f(a, w, None), reps))
    return best


@dataclass(frozen=True)
class Roofline:
    bandwidth: float  # bytes/s
    flops: float  # FLOP/s


@dataclass(frozen=True)
class ModelCost:
    weight_bytes: int  # every parameter, tied ones once
    matmul_params: int  # parameters each token multiplies (all but the embedding lookup)
    kv_bytes_per_token: int  # K and V of one token, every layer
    layers: int
    heads: int
    head_dim: int

    @staticmethod
    def of(eng: LLMEngine) -> ModelCost:
        from torch import nn

        from engine.models.quant import Int8Linear

        model = eng.runner.model
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        skip = {model.rotary.cos.data_ptr(), model.rotary.sin.data_ptr()}
        if emb.data_ptr() != head.data_ptr():
            skip.add(emb.data_ptr())  # untied (or quantised lm_head): a lookup reads a few rows only
        seen: set[int] = set()
        wbytes = 0
        for p in list(model.parameters()) + list(model.buffers()):
            if p.data_ptr() in seen or p.data_ptr() in skip:
                continue
            seen.add(p.data_ptr())
            wbytes += p.numel() * p.element_size()
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear)))
        cfg = model.config
        s = eng.kv_shape
        kv_tok = s.num_layers * 2 * s.num_kv_heads * s.head_dim * s.dtype.itemsize
        return ModelCost(wbytes, matmul, kv_tok, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim)

    def decode_bytes(self, batch: int, context: int) -> int:
        return self.weight_bytes + batch * context * self.kv_bytes_per_token

    def decode_flops(self, batch: int, context: int) -> float:
        attn = 4 * self.layers * self.heads * self.head_dim * context  # QK^T and PV per query
        return batch * (2 * self.matmul_params + attn)


WEIGHT_DTYPE = "float32"  # set from --weight-dtype


def _engine(
    path: Path, batch: int, context: int, extra_tokens: int, device: str = "cpu", dtype: str = "auto"
) -> LLMEngine:
    blocks = batch * (-(-(context + extra_tokens) // 16) + 1) + 8
    cfg = EngineConfig(
        device=device,
        dtype=dtype,
        num_kv_blocks=blocks,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(2048, context),
        long_prefill_token_threshold=0,
        enable_prefix_caching=False,
        model_id=path.name,
    )
    if WEIGHT_DTYPE == "float32":
        return LLMEngine.from_pretrained(path, cfg)
    from engine.models.config import ModelConfig
    from engine.models.loader import load_model
    from engine.tokenizer import Tokenizer

    cpu = torch.device("cpu")
    model = load_model(path, torch.float32, cpu, weight_dtype=WEIGHT_DTYPE)
    return LLMEngine(model, ModelConfig.from_path(path), Tokenizer(path), cfg, torch.float32, cpu)


def decode_steps(
    path: Path, batch: int, context: int, steps: int, reps: int
) -> tuple[list[float], ModelCost]:
    """Per-repetition lists of step times (seconds) of ``batch`` sequences decoding at ``context``."""
    extra = steps * reps + 8
    eng = _engine(path, batch, context, extra)
    s = eng.kv_shape
    nblk = -(-context // s.block_size)
    g = torch.Generator().manual_seed(batch * 7919 + context)
    blocks = torch.randn(nblk, s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim, generator=g)
    sp = SamplingParams(max_tokens=extra + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(10, 40000, (context,), generator=g).tolist()
        eng.import_kv(f"r{i}", prompt, 100 + i, blocks, sp)
    cost = ModelCost.of(eng)
    for _ in range(3):
        eng.step()
    per_rep: list[list[float]] = []
    for _ in range(reps):
        ts = []
        for _ in range(steps):
            t = time.perf_counter()
            out = eng.step()
            ts.append(time.perf_counter() - t)
            assert len(out) == batch, f"expected {batch} decode outputs, got {len(out)}"
        per_rep.append(ts)
    eng.close()
    return per_rep, cost


def prefill_time(path: Path, n: int, reps: int) -> tuple[float, ModelCost, int]:
    eng = _engine(path, 1, n, 8)
    g = torch.Generator().manual_seed(n)
    ts = []
    cost = ModelCost.of(eng)
    lm = eng.runner.model.lm_head.weight.numel()
    for r in range(reps + 1):
        prompt = torch.randint(10, 40000, (n,), generator=g).tolist()
        eng.add_request(f"p{r}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        t = time.perf_counter()
        eng.step()
        if r:
            ts.append(time.perf_counter() - t)
        while eng.has_unfinished():
            eng.step()
    eng.close()
    return statistics.median(ts), cost, lm


# A minimal decode-timing driver over llama.cpp's own library (libllama), for when the full build of
# its tools (llama-batched-bench) is not available: B sequences of C tokens (prefilled once as
# sequence 0 and copied to the others: distinct KV, same contents), f32 KV cache, one llama_decode
# of B tokens (one per sequence, logits for each) per step. Prints the median step in ms.
PEER_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "llama.h"

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void quiet(enum ggml_log_level level, const char* text, void* user) { (void)level; (void)text; (void)user; }
static int cmp(const void* a, const void* b) { double x = *(const double*)a, y = *(const double*)b; return (x > y) - (x < y); }

int main(int argc, char** argv) {
    if (argc != 6) { fprintf(stderr, "usage: peer MODEL BATCH CONTEXT STEPS THREADS\n"); return 2; }
    const char* path = argv[1];
    int B = atoi(argv[2]), C = atoi(argv[3]), S = atoi(argv[4]), T = atoi(argv[5]);
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model* model = llama_model_load_from_file(path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", path); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(B * (C + S + 16));
    cp.n_batch = 512; cp.n_ubatch = 512; cp.n_seq_max = (uint32_t)B;
    cp.n_threads = T; cp.n_threads_batch = T;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;
    cp.kv_unified = false; cp.no_perf = true;
    struct llama_context* ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create context\n"); return 1; }
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_init(512 > B ? 512 : B, 0, 1);
    srand(1);
    for (int p0 = 0; p0 < C; p0 += 512) {
        batch.n_tokens = 0;
        for (int p = p0; p < C && p < p0 + 512; p++) {
            int i = batch.n_tokens++;
            batch.token[i] = 10 + rand() % (nv - 10); batch.pos[i] = p;
            batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = (p == C - 1);
        }
        if (llama_decode(ctx, batch)) { fprintf(stderr, "prefill failed\n"); return 1; }
    }
    llama_memory_t mem = llama_get_memory(ctx);
    for (int s = 1; s < B; s++) llama_memory_seq_cp(mem, 0, s, -1, -1);
    double* ts = malloc(sizeof(double) * S);
    for (int step = -2; step < S; step++) {
        batch.n_tokens = B;
        for (int s = 0; s < B; s++) {
            batch.token[s] = 10 + rand() % (nv - 10); batch.pos[s] = C + step + 2;
            batch.n_seq_id[s] = 1; batch.seq_id[s][0] = s; batch.logits[s] = 1;
        }
        double t = now();
        if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
        if (step >= 0) ts[step] = now() - t;
    }
    qsort(ts, S, sizeof(double), cmp);
    printf("%.6f\n", ts[S / 2] * 1e3);
    llama_batch_free(batch); llama_free(ctx); llama_model_free(model);
    return 0;
}
"""


def build_peer(src_dir: Path, lib_dir: Path) -> Path:
    """Compile :data:`PEER_SOURCE` against llama.cpp's headers in ``src_dir`` and its built
    ``libllama`` in ``lib_dir`` (cached next to the library)."""
    digest = hashlib.sha256(PEER_SOURCE.encode()).hexdigest()[:12]
    exe = lib_dir / f"pdserve_llama_peer_{digest}"
    if exe.is_file():
        return exe
    src = lib_dir / "pdserve_llama_peer.c"
    src.write_text(PEER_SOURCE)
    cmd = [
        "gcc", "-O2", str(src), "-o", str(exe), f"-I{src_dir / 'include'}", f"-I{src_dir / 'ggml' / 'include'}",
        f"-L{lib_dir}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib_dir}",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"building the llama.cpp peer failed: {r.stderr[-800:]}")
    return exe


def run_peer(exe: Path, gguf: Path, batch: int, context: int, steps: int) -> float:
    """llama.cpp's median decode step (seconds) at ``batch`` x ``context``."""
    cmd = [str(exe), str(gguf), str(batch), str(context), str(steps), str(torch.get_num_threads())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp peer failed ({r.returncode}): {r.stderr[-800:]}")
    return float(r.stdout.strip().splitlines()[-1]) / 1e3


GRAPH = "+graph"  # an --ab-backends suffix: torch_paged decode replayed from CUDA graphs


def attention_ab(
    path: Path,
    batch: int,
    context: int,
    steps: int,
    reps: int,
    backends: tuple[str, ...] = ("native", "gather"),
    device: str = "cpu",
    dtype: str = "auto",
) -> dict[str, float]:
    """Median decode step (seconds) per decode attention backend (engine.attention_backends names;
    ``torch_paged+graph``: CUDA graphs), on the same engine and KV, alternating ``steps``-step runs
    ``reps`` times (a load change hits every backend). A backend that cannot run here is refused."""
    from engine.attention_graphs import GraphMode

    extra = len(backends) * steps * reps + 8
    eng = _engine(path, batch, context, extra, device, dtype)
    runner = eng.runner
    graphs = None
    if any(b.endswith(GRAPH) for b in backends):
        runner.set_decode_backend("torch_paged")
        runner.enable_decode_graphs(GraphMode.CUDA, batch, -(-(context + extra) // 16) + 1)
        graphs, runner.graphs = runner.graphs, None

    def use(b: str) -> None:
        runner.graphs = graphs if b.endswith(GRAPH) else None
        runner.set_decode_backend(b.removesuffix(GRAPH))

    for b in backends:  # refuse an unavailable backend before any timing
        use(b)
    s = eng.kv_shape
    g = torch.Generator().manual_seed(batch * 7919 + context)
    blocks = torch.randn(
        -(-context // s.block_size), s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim, generator=g
    )
    sp = SamplingParams(max_tokens=extra + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.import_kv(
            f"r{i}", torch.randint(10, 40000, (context,), generator=g).tolist(), 100 + i, blocks, sp
        )
    times: dict[str, list[float]] = {b: [] for b in backends}
    for b in backends:  # warm-up (and graph capture) outside the timings
        use(b)
        eng.step()
    for _ in range(reps):
        for b in backends:
            use(b)
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                times[b].append(time.perf_counter() - t)
    eng.close()
    return {b: statistics.median(ts) for b, ts in times.items()}


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    ap.add_argument("--contexts", default="256,2048", help="comma-separated decode context lengths, tokens")
    ap.add_argument("--prefills", default="256,1024", help="comma-separated prefill prompt lengths, tokens")
    ap.add_argument("--steps", type=int, default=12, help="decode steps timed per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per decode cell")
    ap.add_argument(
        "--llama-cpp",
        type=Path,
        default=llama_cpp_peer.default_src(),
        help="llama.cpp source folder with a CMake build in build/ (libllama built; default, built by "
        "bench/llama_cpp_peer.py when missing: %(default)s)",
    )
    ap.add_argument(
        "--gguf",
        type=Path,
        default=llama_cpp_peer.default_gguf(),
        help="the same model as an fp32 GGUF for llama.cpp (default, written when missing: %(default)s)",
    )
    ap.add_argument(
        "--no-peer",
        action="store_true",
        help="skip the llama.cpp peer (section 3) and the build of its cache",
    )
    ap.add_argument(
        "--weight-dtype",
        default="float32",
        choices=["float32", "int8"],
        help="weights of pdserve's model (the bounds count their bytes; default: %(default)s)",
    )
    ap.add_argument(
        "--ab-attention",
        action="store_true",
        help="only compare decode attention backends (--ab-backends), interleaved on one engine",
    )
    ap.add_argument(
        "--ab-backends",
        default="native,gather",
        help="comma-separated backends for --ab-attention (auto|native|gather|torch_paged|flashinfer|"
        "flash_attn, torch_paged+graph: CUDA graphs); the first is the baseline (default: %(default)s)",
    )
    ap.add_argument("--device", default="cpu", help="--ab-attention only: cpu or cuda (default: %(default)s)")
    ap.add_argument(
        "--dtype", default="auto", help="--ab-attention only: the engine's dtype (default: %(default)s)"
    )
    ap.add_argument("--quick", action="store_true", help="small run for a smoke test")
    return cli_help.apply(ap)


def main() -> int:
    global WEIGHT_DTYPE
    a = build_parser().parse_args()
    WEIGHT_DTYPE = a.weight_dtype
    if a.quick:
        a.batches, a.contexts, a.prefills, a.steps, a.reps = "1,4", "64", "64", 3, 2
    path = resolve_model_path(a.model)
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]
    from engine import attention_native

    native = attention_native.available(1, 64)
    print(
        f"model {path.name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"weights {a.weight_dtype}, decode attention "
        f"{'native in-place' if native else 'torch gather (' + str(attention_native.unavailable_reason()) + ')'}"
    )
    if a.ab_attention:
        names = tuple(x.strip() for x in a.ab_backends.split(",") if x.strip())
        print(
            f"decode step ms per attention backend on {a.device} (dtype {a.dtype}), interleaved on one "
            f"engine; x = {names[0]}'s step / the backend's (> 1: faster than {names[0]})"
        )
        print(f"{'ctx':>5} {'batch':>5} " + " ".join(f"{n:>18} {'x':>5}" for n in names))
        for ctx in contexts:
            for b in batches:
                ts = attention_ab(path, b, ctx, a.steps, a.reps, names, a.device, a.dtype)
                base = ts[names[0]]
                cells = " ".join(f"{ts[n] * 1e3:>18.2f} {base / ts[n]:>5.2f}" for n in names)
                print(f"{ctx:>5} {b:>5} {cells}", flush=True)
        return 0
    peer_error = None
    if not a.no_peer:
        # the default cache is built here, before any timing (a build loads the cores)
        defaults = (a.llama_cpp == llama_cpp_peer.default_src(), a.gguf == llama_cpp_peer.default_gguf())
        have = (llama_cpp_peer.library_missing(a.llama_cpp) is None, a.gguf.is_file())
        if all(defaults) and not all(have):
            try:
                llama_cpp_peer.ensure_peer(a.llama_cpp, a.gguf)
            except llama_cpp_peer.PeerBuildError as e:
                peer_error = str(e)
                print(
                    f"engine_bound: the llama.cpp peer could not be built: {e}", file=sys.stderr, flush=True
                )
    probe = _engine(path, 1, 16, 0)
    cfg = probe.runner.model.config
    probe.close()
    del probe

    def roofline() -> Roofline:
        return Roofline(read_bandwidth(), matmul_flops(cfg.hidden_size, cfg.intermediate_size))

    # the host is shared: each cell's bounds come from the bandwidth and FLOP/s measured right
    # before and right after it (their mean), so a load change between cells moves both sides
    print(
        f"\n1) decode step (fp32 KV) vs bounds measured around each cell; target median step/bw <= {TARGET}"
    )
    print(
        f"{'ctx':>5} {'batch':>5} {'GB/s':>5} {'step ms':>8} {'best ms':>8} {'spread':>13} {'bw ms':>7} "
        f"{'cmp ms':>7} {'/bw':>6} {'best/bw':>7} {'/max':>6} {'tok/s':>7}  verdict"
    )
    ok = True
    ours: dict[tuple[int, int], float] = {}
    roofs = []
    for ctx in contexts:
        for b in batches:
            r0 = roofline()
            per_rep, cost = decode_steps(path, b, ctx, a.steps, a.reps)
            r1 = roofline()
            roof = Roofline((r0.bandwidth + r1.bandwidth) / 2, (r0.flops + r1.flops) / 2)
            roofs.append(roof)
            every = [t for ts in per_rep for t in ts]
            step, best = statistics.median(every), min(every)
            meds = [statistics.median(ts) for ts in per_rep]
            bw = cost.decode_bytes(b, ctx) / roof.bandwidth
            cmp_ = cost.decode_flops(b, ctx) / roof.flops
            r_bw, r_max = step / bw, step / max(bw, cmp_)
            ok &= r_bw <= TARGET
            ours[(ctx, b)] = b / step
            print(
                f"{ctx:>5} {b:>5} {roof.bandwidth / 1e9:>5.1f} {step * 1e3:>8.2f} {best * 1e3:>8.2f} "
                f"{min(meds) * 1e3:>6.1f}-{max(meds) * 1e3:<6.1f} {bw * 1e3:>7.2f} {cmp_ * 1e3:>7.2f} "
                f"{r_bw:>6.2f} {best / bw:>7.2f} {r_max:>6.2f} {b / step:>7.1f}  {'PASS' if r_bw <= TARGET else 'FAIL'}",
                flush=True,
            )
    roof = Roofline(statistics.median(r.bandwidth for r in roofs), statistics.median(r.flops for r in roofs))
    print(
        f"(median over cells: read bandwidth {roof.bandwidth / 1e9:.1f} GB/s, GEMM {roof.flops / 1e9:.1f} GFLOP/s)"
    )
    print(f"\n2) prefill (one chunk) vs compute bound; target <= {TARGET}")
    print(f"{'tokens':>6} {'ms':>9} {'bound ms':>9} {'ratio':>6}  verdict")
    for n in (int(x) for x in a.prefills.split(",")):
        r0 = roofline()
        t, cost, lm = prefill_time(path, n, max(a.reps, 3))
        r1 = roofline()
        roof = Roofline((r0.bandwidth + r1.bandwidth) / 2, (r0.flops + r1.flops) / 2)
        body = cost.matmul_params - lm
        flops = 2 * body * n + 2 * lm + 4 * cost.layers * cost.heads * cost.head_dim * n * n / 2
        bound = flops / roof.flops
        ok &= t / bound <= TARGET
        print(
            f"{n:>6} {t * 1e3:>9.1f} {bound * 1e3:>9.1f} {t / bound:>6.2f}  {'PASS' if t / bound <= TARGET else 'FAIL'}"
        )
    print(
        "\n3) peer: llama.cpp (its libllama driven by a minimal decode loop; same model as fp32 GGUF, f32 KV)"
    )
    if a.no_peer:
        print("   not run: --no-peer")
        return 0 if ok else 1
    if peer_error is not None:
        print(f"   not run: building the peer failed: {peer_error}")
        return 1
    lib_dir = llama_cpp_peer.lib_dir(a.llama_cpp)
    missing = llama_cpp_peer.library_missing(a.llama_cpp, require_stamp=False)
    if missing is None and not a.gguf.is_file():
        missing = f"{a.gguf} does not exist"
    if missing is not None:
        print(
            f"   not run: {missing} (explicit paths are not built; the defaults are: bench/llama_cpp_peer.py)"
        )
        return 1
    exe = build_peer(a.llama_cpp, lib_dir)
    print(f"{'ctx':>5} {'batch':>5} {'pdserve tok/s':>14} {'llama.cpp tok/s':>16} {'ratio':>6}  verdict")
    for ctx in contexts:
        for b in batches:
            peer = b / run_peer(exe, a.gguf, b, ctx, max(a.steps * a.reps, 8))
            r = ours[(ctx, b)] / peer
            if b == 1:
                good = 1 / r <= PEER_LATENCY_TARGET
                what = f"latency {1 / r:.2f}x theirs (target <= {PEER_LATENCY_TARGET})"
            else:
                good = r > 1.0
                what = "throughput (target > 1)"
            ok &= good
            print(
                f"{ctx:>5} {b:>5} {ours[(ctx, b)]:>14.1f} {peer:>16.1f} {r:>6.2f}  {'PASS' if good else 'FAIL'} {what}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
