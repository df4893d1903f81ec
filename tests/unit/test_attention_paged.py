"""The torch paged decode kernel (engine.attention_paged) and the explicit backend choice.

Kernel level: random caches with scattered blocks, GQA groups 1-4, several tiles, sliding windows,
tables trimmed to a window, soft-capping: equal to the gather path (``decode_backend`` gather,
the engine before #17) and, where it builds, the native C kernel. Engine level: tiny models and
SmolLM2 decode with ``attention_backend='torch_paged'`` give the gather path's greedy tokens and
log-probs (within 1e-3, observed ~1e-6). Backend resolution: an explicitly named backend that
cannot run is refused naming it, never replaced.
"""

from __future__ import annotations

import pytest
import torch

from engine import attention_native
from engine.attention import AttentionMetadata, decode_rows, paged_attention
from engine.attention_backends import (
    AttentionBackend,
    BackendFacts,
    requested_backend,
    resolve_backend,
)
from engine.attention_paged import paged_decode
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import FailedPreconditionError

LOGPROB_TOL = 1e-3


def _batch(h, kvh, d, bs, lens, firsts, windows, seed=0):
    g = torch.Generator().manual_seed(seed + h * 100 + kvh * 10 + d)
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
    width = max(len(t) for t in tables)
    kpos = torch.arange(width * bs)[None] + torch.tensor(firsts)[:, None]
    ln = torch.tensor(lens)[:, None]
    gather_md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decodes=len(lens),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_mask=(kpos < ln)[:, None, None, :],
        prefills=[],
        block_size=bs,
        decode_window_masks={w: ((kpos < ln) & (kpos >= ln - w))[:, None, None, :] for w in windows},
        trimmed=any(firsts),
    )

    def rows_md(backend: AttentionBackend) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            num_decodes=len(lens),
            decode_block_tables=None,
            decode_mask=None,
            prefills=[],
            block_size=bs,
            trimmed=any(firsts),
            decode_rows=decode_rows(tables, lens, firsts, windows, bs, nb, torch.device("cpu")),
            decode_backend=backend,
        )

    return q, k, v, cache, gather_md, rows_md


@pytest.mark.parametrize(
    ("h", "kvh", "d", "bs"), [(4, 4, 8, 4), (4, 2, 8, 16), (9, 3, 64, 16), (8, 2, 64, 8), (12, 3, 8, 4)]
)
def test_torch_paged_equals_gather_path(h, kvh, d, bs):
    lens = [1, 5, 17, 130, 300, 70 * bs + 1]  # one key, under a tile, several tiles (256 keys)
    q, k, v, cache, gmd, rows_md = _batch(h, kvh, d, bs, lens, [0] * len(lens), [])
    ref = paged_attention(q, k, v, cache.clone(), gmd, d**-0.5)
    out = paged_attention(q, k, v, cache.clone(), rows_md(AttentionBackend.TORCH_PAGED), d**-0.5)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    if attention_native.available(h // kvh, d):
        nat = paged_attention(q, k, v, cache.clone(), rows_md(AttentionBackend.NATIVE), d**-0.5)
        torch.testing.assert_close(out, nat, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_torch_paged_sliding_window_and_softcap(trim, softcap):
    bs, win = 4, 24
    lens = [3, 25, 26, 200, 333]
    firsts = [max(0, n - win) // bs * bs if trim else 0 for n in lens]
    q, k, v, cache, gmd, rows_md = _batch(6, 2, 8, bs, lens, firsts, [win])
    md = rows_md(AttentionBackend.TORCH_PAGED)
    assert md.decode_rows is not None and md.decode_rows.col_lo[win] >= 0
    ref = paged_attention(q, k, v, cache.clone(), gmd, 8**-0.5, window=win, softcap=softcap)
    out = paged_attention(q, k, v, cache.clone(), md, 8**-0.5, window=win, softcap=softcap)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    if not trim:  # the same rows with full attention (the None entry of lo)
        ref = paged_attention(q, k, v, cache.clone(), gmd, 8**-0.5, softcap=softcap)
        out = paged_attention(q, k, v, cache.clone(), md, 8**-0.5, softcap=softcap)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("tile", [4, 8, 12, 1000])
def test_tile_size_does_not_change_the_result(tile):
    """Tiles of one block up to the whole context; col_lo skipping the out-of-window columns."""
    bs = 4
    lens = [2, 9, 40, 77]
    q, _, _, cache, _, rows_md = _batch(4, 2, 8, bs, lens, [0] * 4, [8], seed=1)
    r = rows_md(AttentionBackend.TORCH_PAGED).decode_rows
    args = (q, cache[0], cache[1], r.tables, r.row, r.lo[8], r.hi, r.first, 0.3)
    ref = paged_decode(*args, tile_tokens=10_000)
    out = paged_decode(*args, tile_tokens=tile, col_lo=r.col_lo[8])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_torch_paged_reads_only_its_range():
    """Every slot outside the queries' ranges is NaN; the output stays finite."""
    bs = 4
    lens = [9, 30]
    q, k, v, cache, _, rows_md = _batch(4, 2, 8, bs, lens, [0, 0], [8])
    md = rows_md(AttentionBackend.TORCH_PAGED)
    r = md.decode_rows
    keep = torch.zeros(cache.shape[1] * bs, dtype=torch.bool)
    for i, n in enumerate(lens):
        for p in range(n):
            keep[int(r.tables[i, p // bs]) * bs + p % bs] = True
    flat = cache.view(2, -1, 2, 8)
    flat[:, ~keep] = float("nan")
    out = paged_attention(q, k, v, cache, md, 8**-0.5, window=8)
    assert torch.isfinite(out).all()


def test_torch_paged_half_precision_cache():
    """A bfloat16 cache: scores and softmax in float32, output in the query's dtype."""
    q, k, v, cache, gmd, rows_md = _batch(4, 2, 8, 4, [7, 50], [0, 0], [])
    out = paged_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.bfloat16(), rows_md(AttentionBackend.TORCH_PAGED), 0.3
    )
    ref = paged_attention(q, k, v, cache.bfloat16().float(), gmd, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_paged_decode_refuses_bad_arguments():
    q = torch.randn(2, 4, 8)
    kc = torch.randn(3, 4, 2, 8)
    i = torch.zeros(2, dtype=torch.long)
    tab = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="softcap must be > 0"):
        paged_decode(q, kc, kc, tab, i, i, i + 1, i, 1.0, softcap=0.0)
    with pytest.raises(ValueError, match="shapes do not match"):
        paged_decode(torch.randn(2, 4, 4), kc, kc, tab, i, i, i + 1, i, 1.0)
    with pytest.raises(ValueError, match="row/lo/hi/first"):
        paged_decode(q, kc, kc, tab, i[:1], i, i + 1, i, 1.0)


# ----------------------------------------------------------------------------- backend choice
def _facts(**kw) -> BackendFacts:
    base = dict(
        device_type="cpu",
        dtype="float32",
        block_size=16,
        native_reason=None,
        flashinfer=False,
        flash_attn=False,
    )
    base.update(kw)
    return BackendFacts(**base)


def test_auto_keeps_the_previous_default():
    assert resolve_backend(AttentionBackend.AUTO, _facts()) is AttentionBackend.NATIVE
    assert (
        resolve_backend(AttentionBackend.AUTO, _facts(native_reason="no compiler")) is AttentionBackend.GATHER
    )
    cuda = _facts(device_type="cuda", dtype="float16", flashinfer=True, native_reason="not probed")
    assert resolve_backend(AttentionBackend.AUTO, cuda) is AttentionBackend.GATHER


@pytest.mark.parametrize(
    ("backend", "facts", "why"),
    [
        (AttentionBackend.NATIVE, _facts(native_reason="no C compiler"), "no C compiler"),
        (AttentionBackend.NATIVE, _facts(device_type="cuda"), "float32 tensors on the CPU"),
        (AttentionBackend.FLASHINFER, _facts(flashinfer=True), "needs a CUDA device"),
        (AttentionBackend.FLASHINFER, _facts(device_type="cuda", flashinfer=True), "float16 or bfloat16"),
        (AttentionBackend.FLASHINFER, _facts(device_type="cuda", dtype="float16"), "flashinfer package"),
        (AttentionBackend.FLASH_ATTN, _facts(device_type="cuda", dtype="bfloat16"), "flash_attn package"),
        (
            AttentionBackend.FLASH_ATTN,
            _facts(device_type="cuda", dtype="bfloat16", flash_attn=True),
            "multiple of 256",
        ),
    ],
)
def test_named_backend_that_cannot_run_is_refused(backend, facts, why):
    with pytest.raises(FailedPreconditionError, match=why) as e:
        resolve_backend(backend, facts)
    assert repr(backend.value) in str(e.value)


def test_named_backend_that_can_run_is_kept():
    assert resolve_backend(AttentionBackend.TORCH_PAGED, _facts()) is AttentionBackend.TORCH_PAGED
    assert resolve_backend(AttentionBackend.GATHER, _facts(device_type="cuda")) is AttentionBackend.GATHER
    fa = _facts(device_type="cuda", dtype="float16", flash_attn=True, block_size=256)
    assert resolve_backend(AttentionBackend.FLASH_ATTN, fa) is AttentionBackend.FLASH_ATTN
    fi = _facts(device_type="cuda", dtype="bfloat16", flashinfer=True)
    assert resolve_backend(AttentionBackend.FLASHINFER, fi) is AttentionBackend.FLASHINFER


def test_requested_backend_config_then_env(monkeypatch):
    monkeypatch.delenv("PDSERVE_ATTENTION", raising=False)
    assert requested_backend(None) is AttentionBackend.AUTO
    monkeypatch.setenv("PDSERVE_ATTENTION", "torch")  # the old name of the gather path
    assert requested_backend(None) is AttentionBackend.GATHER
    monkeypatch.setenv("PDSERVE_ATTENTION", "torch-paged")
    assert requested_backend(None) is AttentionBackend.TORCH_PAGED
    assert requested_backend("native") is AttentionBackend.NATIVE  # the config wins
    monkeypatch.setenv("PDSERVE_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="PDSERVE_ATTENTION: unknown attention backend 'cudnn'"):
        requested_backend(None)


def test_engine_config_validates_attention_fields():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        EngineConfig(attention_backend="fast")
    with pytest.raises(ValueError, match="cuda_graph=True needs device='cuda'"):
        EngineConfig(cuda_graph=True, attention_backend="torch_paged")
    with pytest.raises(ValueError, match="needs attention_backend='torch_paged'"):
        EngineConfig(cuda_graph=True, device="cuda", attention_backend="gather")
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        EngineConfig(attention_backend="torch_paged", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="cuda_graph_max_batch_size"):
        EngineConfig(cuda_graph_max_batch_size=0)
    ok = EngineConfig(cuda_graph=True, device="cuda", attention_backend="torch_paged")
    assert ok.cuda_graph and ok.cuda_graph_max_batch_size == 64


def test_engine_refuses_an_unavailable_backend_naming_it(tiny_models):
    with pytest.raises(FailedPreconditionError, match="'flashinfer' cannot run here: it needs a CUDA device"):
        LLMEngine.from_pretrained(
            tiny_models["llama"], EngineConfig(num_kv_blocks=16, attention_backend="flashinfer")
        )
    with pytest.raises(FailedPreconditionError, match="'flash_attn' cannot run here"):
        LLMEngine.from_pretrained(
            tiny_models["llama"], EngineConfig(num_kv_blocks=16, attention_backend="flash_attn")
        )


# ----------------------------------------------------------------------------- engine level
def _compare(a: LLMEngine, b: LLMEngine, prompts, max_tokens=24):
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=1)
    x = a.generate(prompts, sp, use_tqdm=False)
    y = b.generate(prompts, sp, use_tqdm=False)
    for p, q in zip(x, y, strict=True):
        assert p.token_ids == q.token_ids
        lp = torch.tensor([t.logprob for t in p.logprobs])
        lq = torch.tensor([t.logprob for t in q.logprobs])
        torch.testing.assert_close(lp, lq, atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2_swa", "mistral_swa"])
def test_engine_torch_paged_equals_gather(tiny_models, arch):
    cfg = dict(num_kv_blocks=128, block_size=4)
    paged = LLMEngine.from_pretrained(tiny_models[arch], EngineConfig(**cfg, attention_backend="torch_paged"))
    gather = LLMEngine.from_pretrained(tiny_models[arch], EngineConfig(**cfg, attention_backend="gather"))
    assert paged.runner.decode_backend is AttentionBackend.TORCH_PAGED
    assert gather.runner.decode_backend is AttentionBackend.GATHER
    _compare(paged, gather, [list(range(3, 3 + n)) for n in (5, 31, 60)])


def test_engine_torch_paged_speculative_rows(tiny_models):
    """n-gram speculation: with torch_paged a speculative decode's tokens are decode rows."""
    from engine.spec_decode import SpeculativeConfig

    spec = SpeculativeConfig(num_speculative_tokens=3)
    cfg = dict(num_kv_blocks=128, block_size=4)
    paged = LLMEngine.from_pretrained(
        tiny_models["llama"], EngineConfig(**cfg, attention_backend="torch_paged", speculative=spec)
    )
    plain = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(**cfg, attention_backend="gather"))
    rep = [5, 6, 7, 8] * 6
    _compare(paged, plain, [rep, list(range(3, 40))], max_tokens=20)


@pytest.mark.slow
def test_smollm2_torch_paged_equals_default(smollm_path):
    from tests.prompts import PROMPTS

    paged = LLMEngine.from_pretrained(
        smollm_path, EngineConfig(num_kv_blocks=256, attention_backend="torch_paged")
    )
    default = LLMEngine.from_pretrained(
        smollm_path, EngineConfig(num_kv_blocks=256, attention_backend="gather")
    )
    _compare(paged, default, PROMPTS[:4], max_tokens=12)
