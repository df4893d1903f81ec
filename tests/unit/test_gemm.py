"""engine.models.gemm: the oneDNN GEMM of prefill-sized projections equals F.linear up to
rounding, is chosen as documented, and the engine's output with it equals BLAS's and HF's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models import gemm
from engine.models import linear_native as ln
from engine.models.gemm import GemmBackend, UnsupportedGemmError
from engine.models.linear_native import NativeLinear
from engine.sampling_params import SamplingParams
from tests.unit.test_golden_hf import LOGPROB_TOL, _hf_greedy, _hf_logprobs


def _onednn_or_reason() -> bool:
    """True where oneDNN runs; else the reason must say why (the BLAS path is then what runs)."""
    why = gemm.onednn_unavailable_reason()
    assert why is None or len(why) > 10
    return why is None


@pytest.mark.parametrize(
    ("rows", "n", "k"), [(33, 96, 80), (100, 832, 576), (513, 1536, 576), (77, 576, 1536)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear_up_to_rounding(monkeypatch, rows, n, k, bias):
    monkeypatch.setenv(gemm.ENV, "auto")
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    with torch.inference_mode():
        y = gemm.linear(x, w, b)
        blas = F.linear(x, w, b)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    err, blas_err = (y.double() - ref).abs().max().item(), (blas.double() - ref).abs().max().item()
    assert err <= max(4 * blas_err, 1e-5), (err, blas_err)


def test_linear_keeps_leading_dims_strides_and_nan(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "auto")
    w = torch.randn(64, 40)
    x3 = torch.randn(3, 20, 40)
    xt = torch.randn(40, 50).t()  # not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(gemm.linear(x3, w), F.linear(x3, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gemm.linear(xt, w), F.linear(xt, w), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gemm.linear(x3, w[::2]), F.linear(x3, w[::2]), atol=1e-5, rtol=1e-5)
        xn = torch.randn(40, 40)
        xn[7, 3] = float("nan")
        y = gemm.linear(xn, w)
    assert y[7].isnan().all() and not y[:7].isnan().any() and not y[8:].isnan().any()


def test_backend_resolution(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "blas")
    assert gemm.gemm_backend() is GemmBackend.BLAS
    x, w = torch.randn(50, 30), torch.randn(20, 30)
    with torch.inference_mode():
        assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    monkeypatch.setenv(gemm.ENV, "auto")
    want = GemmBackend.ONEDNN if _onednn_or_reason() else GemmBackend.BLAS
    assert gemm.gemm_backend() is want
    monkeypatch.setenv(gemm.ENV, "onednn")
    if want is GemmBackend.ONEDNN:
        assert gemm.gemm_backend() is GemmBackend.ONEDNN
    else:
        with pytest.raises(UnsupportedGemmError, match="onednn is refused"):
            gemm.gemm_backend()
    monkeypatch.setenv(gemm.ENV, "mkl")
    with pytest.raises(
        UnsupportedGemmError, match="PDSERVE_GEMM must be one of auto, onednn, blas; got 'mkl'"
    ):
        gemm.gemm_backend()


def test_autograd_and_other_dtypes_take_f_linear(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "auto")
    w = torch.randn(20, 30, requires_grad=True)
    x = torch.randn(50, 30)
    y = gemm.linear(x, w)  # grad mode: F.linear, differentiable
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()
    assert w.grad is not None
    with torch.inference_mode():
        d = gemm.linear(x.double(), w.detach().double())
    assert d.dtype == torch.float64


class _Wrapper(nn.Module):
    """The LoRALinear contract project() relies on: ``base`` and ``add_update(x, base_out)``."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_update(x, self.base(x))

    def add_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        return out + 1.0


def test_project_routes_large_batches_of_plain_linears(monkeypatch):
    monkeypatch.setenv(gemm.ENV, "auto")
    calls: list[int] = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    torch_lin = nn.Linear(24, 16)
    nat = nn.Linear(24, 16)
    nat.__class__ = NativeLinear
    wrap = _Wrapper(nat)
    hooked = nn.Linear(24, 16)
    hooked.register_forward_hook(lambda m, i, o: o * 0)
    small, big = torch.randn(ln.NATIVE_MAX_ROWS, 24), torch.randn(ln.NATIVE_MAX_ROWS + 1, 24)
    with torch.inference_mode():
        for m in (torch_lin, nat):
            torch.testing.assert_close(gemm.project(m, small), m(small), atol=0, rtol=0)
            assert calls == []
            torch.testing.assert_close(
                gemm.project(m, big), F.linear(big, m.weight, m.bias), atol=1e-5, rtol=1e-5
            )
            assert calls == [big.shape[0]]
            calls.clear()
        y = gemm.project(wrap, big)
        torch.testing.assert_close(y, F.linear(big, nat.weight, nat.bias) + 1.0, atol=1e-5, rtol=1e-5)
        assert calls == [big.shape[0]] and wrap.seen == [big.shape[0]]
        calls.clear()
        assert torch.equal(gemm.project(hooked, big), torch.zeros(big.shape[0], 16))  # its hook ran
        assert calls == []


@pytest.fixture(scope="module")
def tiny_pair(tiny_models):
    """The same tiny model in two engines; the test sets PDSERVE_GEMM before each generate."""
    cfg = EngineConfig(num_kv_blocks=256, max_num_batched_tokens=512, enable_prefix_caching=False)
    return {
        arch: LLMEngine.from_pretrained(tiny_models[arch], cfg)
        for arch in ("llama", "qwen2_swa", "llama_gelu_bias")
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2_swa", "llama_gelu_bias"])
def test_engine_onednn_equals_blas_and_hf(monkeypatch, tiny_models, tiny_pair, arch):
    """Prompts of 5..200 tokens prefilled together (the GEMM), then decoding together:
    greedy tokens identical with oneDNN and with BLAS, and to HF; log-probs within 1e-3."""
    from transformers import AutoModelForCausalLM

    eng = tiny_pair[arch]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 37, 100, 200)]
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    onednn = _onednn_or_reason()  # probes first (the probe calls onednn_linear too)
    calls: list[int] = []
    real = gemm.onednn_linear
    monkeypatch.setattr(gemm, "onednn_linear", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    monkeypatch.setenv(gemm.ENV, "auto")
    a = eng.generate(prompts, sp, use_tqdm=False)
    # the four prompts are prefilled in one step of 342 rows (then decodes of 4 rows: the kernel)
    assert (set(calls) == {342}) == onednn, calls
    calls.clear()
    monkeypatch.setenv(gemm.ENV, "blas")
    b = eng.generate(prompts, sp, use_tqdm=False)
    assert calls == []
    # one prompt of 40 tokens: a prefill of <= fused_native.FUSED_MAX_ROWS rows (the fused forward)
    prompts.append(torch.randint(0, 320, (40,), generator=g).tolist())
    b.append(eng.generate(prompts[-1:], sp, use_tqdm=False)[0])
    monkeypatch.setenv(gemm.ENV, "auto")
    a.append(eng.generate(prompts[-1:], sp, use_tqdm=False)[0])
    assert (set(calls) == {40}) == onednn, calls
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32).eval()
    for ids, x, y in zip(prompts, a, b, strict=True):
        assert x.token_ids == y.token_ids == _hf_greedy(hf, ids, 16)
        lx = torch.tensor([lp.logprob for lp in x.logprobs])
        ly = torch.tensor([lp.logprob for lp in y.logprobs])
        torch.testing.assert_close(lx, ly, atol=LOGPROB_TOL, rtol=0)
        torch.testing.assert_close(lx, _hf_logprobs(hf, ids, x.token_ids), atol=LOGPROB_TOL, rtol=0)
