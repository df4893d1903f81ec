"""Golden tests: our engine vs HF transformers (the reference oracle), fp32 on CPU.

Tolerance: log-probabilities of the generated tokens agree within 1e-3 (observed ~1e-6);
greedy tokens are identical.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

LOGPROB_TOL = 1e-3

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\n# compute the mean of",
    "Water boils at a temperature of",
]


# HF's greedy run and its log-probabilities, kept per (model folder, prompt) for the session: the
# golden tests of several modules (native linear, fused, gemm) ask for the same references, with
# different lengths. A shorter run is a prefix of a longer one (greedy, no stop), and a token's
# log-probability depends only on the tokens before it, so one run serves every length up to it.
_HF_RUNS: dict[tuple[str, str, str, tuple[int, ...]], tuple[list[int], torch.Tensor]] = {}


def _hf_key(model, ids: list[int]) -> tuple[str, str, str, tuple[int, ...]]:
    """The folder, dtype and whole config (a folder loaded with overrides is another model)."""
    return (str(model.config._name_or_path), str(model.dtype), model.config.to_json_string(), tuple(ids))


def _hf_run(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy ``n`` tokens after ``ids`` and their log-probabilities (cached, module note)."""
    key = _hf_key(model, ids)
    got = _HF_RUNS.get(key)
    if got is None or len(got[0]) < n:
        x = torch.tensor([ids])
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None
        )
        gen = out[0][len(ids) :].tolist()
        got = (gen, _hf_forward_logprobs(model, ids, gen))
        _HF_RUNS[key] = got
    return got[0][:n], got[1][:n]


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    return _hf_run(model, ids, n)[0]


def _hf_forward_logprobs(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lg = model(torch.tensor([ids + gen])).logits[0].float()
    lp = torch.log_softmax(lg, -1)
    return torch.stack([lp[len(ids) - 1 + j, t] for j, t in enumerate(gen)])


def _hf_logprobs(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    """HF's log-probabilities of ``gen`` after ``ids``: from the cached greedy run when ``gen`` is
    a prefix of it, else computed."""
    got = _HF_RUNS.get(_hf_key(model, ids))
    if got is not None and 0 < len(gen) <= len(got[0]) and got[0][: len(gen)] == list(gen):
        return got[1][: len(gen)]
    return _hf_forward_logprobs(model, ids, gen)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf(smollm_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512))
    hf_tok = AutoTokenizer.from_pretrained(smollm_path)
    hf = AutoModelForCausalLM.from_pretrained(smollm_path, dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=1)
    outs = eng.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = eng.tokenize(prompt)
        assert ids == hf_tok(prompt)["input_ids"], "tokenizer differs from HF"
        ref = _hf_greedy(hf, ids, 32)
        assert out.token_ids == ref, f"greedy tokens differ for {prompt!r}"
        ref_lp = _hf_logprobs(hf, ids, ref)
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        assert torch.allclose(ours, ref_lp, atol=LOGPROB_TOL), (ours - ref_lp).abs().max()


def test_chat_template_matches_hf(smollm_path):
    from transformers import AutoTokenizer

    from engine.tokenizer import Tokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    ours = Tokenizer(smollm_path).apply_chat_template(msgs)
    ref = AutoTokenizer.from_pretrained(smollm_path).apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert ours == ref


@pytest.mark.parametrize(
    "arch", ["llama", "llama3_rope", "qwen2", "mistral", "mistral_swa", "qwen2_swa", "llama_gelu_bias"]
)
def test_tiny_random_models_match_hf(tiny_models, arch):
    """Prompts of 5..200 tokens: longer than the sliding window (24) of the *_swa models."""
    from transformers import AutoModelForCausalLM

    path = tiny_models[arch]
    eng = LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=256, max_num_batched_tokens=512))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (5, 37, 100, 200)]
    outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0))
    for ids, out in zip(prompts, outs, strict=True):
        ref = _hf_greedy(hf, ids, 24)
        assert out.token_ids == ref
        ref_lp = _hf_logprobs(hf, ids, ref)
        ours = torch.tensor([lp.logprob for lp in out.logprobs])
        assert torch.allclose(ours, ref_lp, atol=LOGPROB_TOL)
