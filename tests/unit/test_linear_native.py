"""The native fp32 skinny linear (engine.models.linear_native): the kernel computes F.linear up to
fp32 rounding on every tile shape (1..6 activation rows per tile with AVX-512, 1..3 with AVX2, row
counts up to 33, a remainder of weight rows, K not a multiple of the vector width, bias); a row's
result does not depend on the other rows of the batch nor on the thread count; NativeLinear takes the kernel only for small fp32 CPU batches; the
backend is refused, naming why, where it does not apply; an engine on it generates the same greedy
tokens as the torch engine and transformers, log-probs within 1e-3 (tiny models, SmolLM2)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models import linear_native as ln
from engine.models.linear_native import (
    LinearBackend,
    NativeLinear,
    UnsupportedLinearError,
    engine_linear,
    resolve_linear,
    skinny_linear,
)
from engine.models.loader import load_model
from engine.sampling_params import SamplingParams
from tests.unit.test_golden_hf import LOGPROB_TOL, PROMPTS, _hf_greedy, _hf_logprobs

pytestmark = pytest.mark.skipif(
    ln.kernel() is None, reason=f"no C compiler: {ln.kernel_unavailable_reason()}"
)

PLAIN = type("Cfg", (), {"moe": None, "model_type": "llama"})()
CPU = torch.device("cpu")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 24, 32, 33])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (7, 13), (70, 96), (130, 200), (9, 17), (6, 31), (5, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_f_linear(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    out = skinny_linear(x, w, b)
    assert out.shape == (rows, n)
    torch.testing.assert_close(out, F.linear(x, w, b), atol=1e-5 * k**0.5, rtol=1e-5)


@pytest.mark.parametrize(("n", "k"), [(960, 576), (577, 1536), (13, 47)])
def test_kernel_rows_do_not_depend_on_the_batch(n, k):
    """A row's output is bitwise the same whatever other rows share its call (whichever tile of
    up to 6 activation rows it falls in, balanced tiles above 16 rows, or alone, where it takes the
    8-weight-row pass): batch composition never changes a result."""
    g = torch.Generator().manual_seed(n * 31 + k)
    x, w, b = torch.randn(32, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    full = skinny_linear(x, w, b)
    for lo, hi in ((0, 1), (5, 6), (31, 32), (0, 2), (3, 11), (10, 18), (7, 19), (13, 32), (0, 32)):
        assert torch.equal(skinny_linear(x[lo:hi], w, b), full[lo:hi]), (lo, hi)


def test_kernel_keeps_leading_dims_and_nan():
    x = torch.randn(2, 3, 24)
    w = torch.randn(10, 24)
    torch.testing.assert_close(skinny_linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    x[0, 1, 5] = float("nan")
    out = skinny_linear(x, w)
    assert out[0, 1].isnan().all() and not out[0, 0].isnan().any()


def test_kernel_refuses_bad_tensors():
    with pytest.raises(ValueError, match="float32 CPU"):
        skinny_linear(torch.randn(2, 8).double(), torch.randn(4, 8).double())
    with pytest.raises(ValueError, match="mismatch"):
        skinny_linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="mismatch"):
        skinny_linear(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5))


def test_native_linear_takes_the_kernel_only_for_small_fp32_batches(monkeypatch):
    lin = nn.Linear(40, 30)
    lin.__class__ = NativeLinear
    calls = []
    real = ln.skinny_linear
    monkeypatch.setattr(ln, "skinny_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.inference_mode():
        small = torch.randn(2, ln.NATIVE_MAX_ROWS // 2, 40)
        torch.testing.assert_close(lin(small), F.linear(small, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
        assert calls == [small.shape]
        big = torch.randn(ln.NATIVE_MAX_ROWS + 1, 40)
        assert torch.equal(lin(big), F.linear(big, lin.weight, lin.bias))
        d = small.double()
        assert lin.double()(d).dtype == torch.float64
    xg = torch.randn(2, 40, requires_grad=True)
    lin.float()(xg).sum().backward()  # autograd: F.linear (the kernel has no backward)
    assert len(calls) == 1 and xg.grad is not None


@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (49152, 64), (130, 200), (1027, 301)])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 29, 32])
def test_pool_split_is_bitwise_the_single_thread_result(monkeypatch, n, k, rows):
    """Every output element is computed the same way whichever thread takes its chunk."""
    g = torch.Generator().manual_seed(n + k + rows)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    monkeypatch.setattr(ln, "SPLIT_MIN_BYTES", 0)
    try:
        ln.configure_pool(1)
        one = skinny_linear(x, w, b)
        ln.configure_pool(4, spin_us=0.0)  # more helpers than cores, sleeping between calls
        for _ in range(3):
            assert torch.equal(skinny_linear(x, w, b), one)
        ln.configure_pool(2)
        assert torch.equal(skinny_linear(x, w, b), one)
    finally:
        ln.configure_pool(torch.get_num_threads())
    torch.testing.assert_close(one, F.linear(x, w, b), atol=1e-5 * k**0.5, rtol=1e-5)


def test_pool_concurrent_callers_and_forked_child(monkeypatch):
    """Two Python threads calling at once (one takes the pool, the other runs alone) and a forked
    child (the helpers do not survive fork; the child starts its own) both get the right result."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(ln, "SPLIT_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(700, 300, generator=g) for _ in range(4)]
    x = torch.randn(2, 300, generator=g)
    want = [F.linear(x, w) for w in ws]
    skinny_linear(x, ws[0])  # helpers started in this process before the fork

    def run(i: int) -> bool:
        return all(
            torch.allclose(skinny_linear(x, ws[(i + j) % 4]), want[(i + j) % 4], atol=1e-4)
            for j in range(200)
        )

    with ThreadPoolExecutor(2) as ex:
        assert all(ex.map(run, range(4)))
    child = multiprocessing.get_context("fork").Process(target=lambda: os._exit(0 if run(0) else 3))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0


def test_backend_refusals_and_resolution():
    with pytest.raises(UnsupportedLinearError, match="one of auto, torch, native; got 'blas'"):
        LinearBackend.parse("blas")
    with pytest.raises(UnsupportedLinearError, match="float32 model on CPU, got torch.bfloat16"):
        resolve_linear("native", PLAIN, torch.bfloat16, CPU)
    with pytest.raises(UnsupportedLinearError, match="on cuda"):
        resolve_linear("native", PLAIN, torch.float32, torch.device("cuda"))
    moe = type("Cfg", (), {"moe": object(), "model_type": "mixtral"})()
    with pytest.raises(UnsupportedLinearError, match="mixture-of-experts models \\(mixtral\\)"):
        resolve_linear("native", moe, torch.float32, CPU)
    assert resolve_linear("auto", moe, torch.float32, CPU) is LinearBackend.TORCH
    assert resolve_linear("auto", PLAIN, torch.float16, CPU) is LinearBackend.TORCH
    assert resolve_linear("auto", PLAIN, torch.float32, torch.device("cuda")) is LinearBackend.TORCH
    assert resolve_linear("auto", PLAIN, torch.float32, CPU) is LinearBackend.NATIVE
    assert resolve_linear("torch", PLAIN, torch.float32, CPU) is LinearBackend.TORCH
    assert resolve_linear("auto", PLAIN, torch.float32, CPU, "int8") is LinearBackend.TORCH
    with pytest.raises(UnsupportedLinearError, match="weight_dtype float32, got int8"):
        resolve_linear("native", PLAIN, torch.float32, CPU, "int8")


def test_engine_linear_env_offload(monkeypatch):
    monkeypatch.delenv("PDSERVE_LINEAR", raising=False)
    assert engine_linear(None) is LinearBackend.AUTO  # the default since the pool (no OpenMP stall)
    assert engine_linear(None, offload=True) is LinearBackend.TORCH
    monkeypatch.setenv("PDSERVE_LINEAR", "native")
    assert engine_linear(None) is LinearBackend.NATIVE
    assert engine_linear("torch") is LinearBackend.TORCH  # the config wins over the env
    with pytest.raises(UnsupportedLinearError, match="weight offloading"):
        engine_linear("native", offload=True)
    monkeypatch.setenv("PDSERVE_LINEAR", "fast")
    with pytest.raises(UnsupportedLinearError, match="got 'fast'"):
        engine_linear(None)


def test_engine_config_linear():
    assert EngineConfig(linear="native").linear == "native"
    with pytest.raises(ValueError, match="linear must be one of"):
        EngineConfig(linear="blas")
    for bad in (
        {"tensor_parallel_size": 2},
        {"weight_dtype": "int8"},
        {"weight_memory_budget_bytes": 0},
    ):
        with pytest.raises(ValueError, match="linear 'native' needs"):
            EngineConfig(linear="native", **bad)


def test_load_model_native_replaces_every_projection_sharing_weights(tiny_models):
    ref = load_model(tiny_models["llama3_rope"], torch.float32, CPU)
    m = load_model(tiny_models["llama3_rope"], torch.float32, CPU, linear="native")
    kinds = {
        type(mod)
        for name, mod in m.named_modules()
        if name.endswith(("qkv", "o_proj", "gate_up", "down_proj"))
    }
    assert kinds == {NativeLinear} and type(m.lm_head) is NativeLinear
    assert not any(type(mod) is nn.Linear for mod in m.modules())
    assert m.lm_head.weight is m.model.embed_tokens.weight  # tied (llama3_rope ties them)
    assert not any(type(mod) is NativeLinear for mod in ref.modules())
    with pytest.raises(UnsupportedLinearError, match="weight_dtype float32, got int8"):
        load_model(tiny_models["llama"], torch.float32, CPU, weight_dtype="int8", linear="native")


@pytest.fixture(scope="module")
def tiny_engines(tiny_models):
    cfg = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=512)
    out = {}
    for arch in ("llama", "llama3_rope", "qwen2_swa", "llama_gelu_bias"):
        native = LLMEngine.from_pretrained(
            tiny_models[arch], EngineConfig(**{**cfg.__dict__, "linear": "native"})
        )
        assert type(native.runner.model.lm_head) is NativeLinear
        torch_eng = LLMEngine.from_pretrained(
            tiny_models[arch], EngineConfig(**{**cfg.__dict__, "linear": "torch"})
        )
        assert not any(type(m) is NativeLinear for m in torch_eng.runner.model.modules())
        out[arch] = (native, torch_eng)
    return out


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "qwen2_swa", "llama_gelu_bias"])
def test_tiny_engine_native_equals_torch_and_hf(tiny_models, tiny_engines, arch):
    """4 prompts decode together (4 rows: the kernel), prefill of 5 rows (kernel) and 37..200 (torch)."""
    from transformers import AutoModelForCausalLM

    native, torch_eng = tiny_engines[arch]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 37, 100, 200)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    a = native.generate(prompts, sp, use_tqdm=False)
    b = torch_eng.generate(prompts, sp, use_tqdm=False)
    for ids, x, y in zip(prompts, a, b, strict=True):
        assert x.token_ids == y.token_ids == _hf_greedy(hf, ids, 24)
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        torch.testing.assert_close(lx, ly, atol=LOGPROB_TOL, rtol=0)
        torch.testing.assert_close(lx, _hf_logprobs(hf, ids, x.token_ids), atol=LOGPROB_TOL, rtol=0)


def test_tiny_engine_native_large_decode_batch_equals_torch(tiny_models, tiny_engines, monkeypatch):
    """ln.NATIVE_MAX_ROWS prompts (and one fewer) decoding together: a decode step is one kernel
    call per projection with that many rows (several tiles of activation rows plus a remainder)."""
    native, torch_eng = tiny_engines["llama_gelu_bias"]
    rows_seen: set[int] = set()
    real = ln.skinny_linear
    monkeypatch.setattr(
        ln, "skinny_linear", lambda x, *a: rows_seen.add(x.numel() // x.shape[-1]) or real(x, *a)
    )
    g = torch.Generator().manual_seed(1)
    for count in (ln.NATIVE_MAX_ROWS - 1, ln.NATIVE_MAX_ROWS):
        prompts = [torch.randint(0, 320, (3 + 2 * i,), generator=g).tolist() for i in range(count)]
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
        a = native.generate(prompts, sp, use_tqdm=False)
        b = torch_eng.generate(prompts, sp, use_tqdm=False)
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            lx = torch.tensor([lp.logprob for lp in x.logprobs])
            ly = torch.tensor([lp.logprob for lp in y.logprobs])
            torch.testing.assert_close(lx, ly, atol=LOGPROB_TOL, rtol=0)
        assert count in rows_seen


@pytest.mark.slow
def test_smollm2_native_equals_torch_and_hf(smollm_path):
    """The 8 golden prompts x 32 greedy tokens, decoded together (8 rows)."""
    from transformers import AutoModelForCausalLM

    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    native = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512, linear="native"))
    assert type(native.runner.model.lm_head) is NativeLinear
    a = native.generate(PROMPTS, sp, use_tqdm=False)
    torch_eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512, linear="torch"))
    b = torch_eng.generate(PROMPTS, sp, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    worst = 0.0
    for prompt, x, y in zip(PROMPTS, a, b, strict=True):
        assert x.token_ids == y.token_ids
        ids = torch_eng.tokenize(prompt)
        assert x.token_ids == _hf_greedy(hf, ids, 32)
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        ref = _hf_logprobs(hf, ids, x.token_ids)
        worst = max(worst, (lx - ly).abs().max().item(), (lx - ref).abs().max().item())
    print(f"native vs torch/HF: max |delta logprob| {worst:.2e}")
    assert worst <= LOGPROB_TOL
