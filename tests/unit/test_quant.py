"""Weight-only int8 (engine.models.quant): the kernel and the dequantising path compute the
dequantised linear; refusals name the value and the reason; on SmolLM2 over the golden prompts the
int8 engine stays within the tolerance the README states (greedy agreement and log-prob delta vs
fp32, on the tokens both produce from the same context)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models import quant
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.models.quant import Int8Linear, UnsupportedWeightDTypeError, WeightDType, quantize_int8
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from tests.unit.test_golden_hf import PROMPTS

# stated in the README; measured on SmolLM2-135M-Instruct: 5/8 prompts identical, 183 of 256
# tokens generated before the first divergence, max |delta logprob| 0.238 over those
INT8_MIN_IDENTICAL_PROMPTS = 5  # of the 8 golden prompts, greedy 32 tokens identical to fp32
INT8_MAX_LOGPROB_DELTA = 0.3  # |logprob int8 - fp32| of a token both chose from the same context


def test_quantize_int8_error_within_half_a_step():
    w = torch.randn(37, 50) * torch.linspace(0.01, 3, 37)[:, None]
    w[5] = 0  # an all-zero row
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert (w - q.float() * s[:, None]).abs().le(s[:, None] / 2 + 1e-7).all()
    assert s[5] == 1 and (q[5] == 0).all()


@pytest.mark.parametrize("rows", [1, 3, quant.SKINNY_MAX_ROWS, quant.SKINNY_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_dequantized(rows, bias):
    lin = nn.Linear(96, 70, bias=bias)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, rows, 96)
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, q.dequantized(), q.bias)
        out = q(x)
    assert out.shape == (2, rows, 70)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="float32"):
        q(x.double())


def test_weight_dtype_refusals():
    with pytest.raises(UnsupportedWeightDTypeError, match="one of float32, int8, bfloat16; got 'fp8'"):
        WeightDType.parse("fp8")
    cfg = type("Cfg", (), {"moe": None, "model_type": "llama"})()
    with pytest.raises(UnsupportedWeightDTypeError, match="bfloat16 (is refused|needs a float32 model)"):
        quant.check_weight_dtype("bfloat16", cfg, torch.bfloat16, torch.device("cpu"))  # test_quant_bf16.py
    with pytest.raises(UnsupportedWeightDTypeError, match="float32 model on CPU"):
        quant.check_weight_dtype("int8", cfg, torch.bfloat16, torch.device("cpu"))
    moe = type("Cfg", (), {"moe": object(), "model_type": "mixtral"})()
    with pytest.raises(UnsupportedWeightDTypeError, match="mixture-of-experts models \\(mixtral\\)"):
        quant.check_weight_dtype("int8", moe, torch.float32, torch.device("cpu"))
    assert quant.check_weight_dtype("float32", moe, torch.float32, torch.device("cpu")) is WeightDType.FLOAT32


def test_load_model_int8_replaces_every_projection(tiny_models):
    m = load_model(tiny_models["llama_gelu_bias"], torch.float32, torch.device("cpu"), weight_dtype="int8")
    kinds = {
        type(mod)
        for name, mod in m.named_modules()
        if name.endswith(("qkv", "o_proj", "gate_up", "down_proj"))
    }
    assert kinds == {Int8Linear}
    assert isinstance(m.lm_head, Int8Linear)
    assert not any(type(mod) is nn.Linear for mod in m.modules())


def _engine(path, weight_dtype: str) -> LLMEngine:
    mcfg = ModelConfig.from_path(path)
    model = load_model(path, torch.float32, torch.device("cpu"), weight_dtype=weight_dtype)
    return LLMEngine(
        model,
        mcfg,
        Tokenizer(path),
        EngineConfig(num_kv_blocks=512, model_id="m"),
        torch.float32,
        torch.device("cpu"),
    )


def weight_dtype_accuracy(path, weight_dtype: str) -> tuple[int, float, int, int]:
    """``weight_dtype`` against float32 weights: (prompts whose 32 greedy tokens equal fp32's, max
    |logprob delta| over tokens generated from the same context, tokens compared, tokens generated)
    on the golden prompts (tests/unit/test_quant_bf16.py measures bf16 with it too)."""
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    ref = _engine(path, "float32").generate(PROMPTS, sp, use_tqdm=False)
    got = _engine(path, weight_dtype).generate(PROMPTS, sp, use_tqdm=False)
    same, delta, compared = 0, 0.0, 0
    for a, b in zip(ref, got, strict=True):
        same += a.token_ids == b.token_ids
        for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs, strict=True):
            if ta != tb:  # the contexts differ from here on
                break
            delta = max(delta, abs(la.logprob - lb.logprob))
            compared += 1
    return same, delta, compared, 32 * len(PROMPTS)


@pytest.mark.slow
def test_int8_smollm2_accuracy(smollm_path):
    same, delta, compared, total = weight_dtype_accuracy(smollm_path, "int8")
    print(
        f"int8 vs fp32: {same}/{len(PROMPTS)} prompts identical, {compared}/{total} tokens compared, max delta {delta:.4f}"
    )
    assert same >= INT8_MIN_IDENTICAL_PROMPTS
    assert delta <= INT8_MAX_LOGPROB_DELTA


def test_engine_config_weight_dtype_reaches_the_model_and_is_refused_where_unsupported(tiny_models):
    """EngineConfig.weight_dtype (workers: --weight-dtype) is what from_pretrained loads with."""
    eng = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=32, weight_dtype="int8"))
    assert any(isinstance(m, Int8Linear) for m in eng.runner.model.modules())
    plain = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=32))
    assert not any(isinstance(m, Int8Linear) for m in plain.runner.model.modules())
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        EngineConfig(weight_dtype="int4")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(weight_dtype="int8", tensor_parallel_size=2)


def test_worker_flag_weight_dtype() -> None:
    from pdserve.worker_base import Role
    from pdserve.worker_main import parse

    base = ["--model", "/m", "--worker-id", "d0", "--store", "127.0.0.1:1"]
    assert parse([*base, "--weight-dtype", "int8"], Role.DECODE).engine.weight_dtype == "int8"
    assert parse(base, Role.DECODE).engine.weight_dtype == "float32"
    with pytest.raises(SystemExit):
        parse([*base, "--weight-dtype", "int4"], Role.DECODE)
