"""Stop strings, incremental detokenizing and logprobs on the real model's tokenizer."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import FinishReason
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def smol(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256))


def test_incremental_detok_reassembles_text(smollm_path):
    tok = Tokenizer(smollm_path)
    text = "Héllo wörld — naïve café ✓ 日本語"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    parts = [d.add([i])[0] for i in ids]
    parts.append(d.add([], final=True)[0])
    assert "".join(parts) == text


def test_stop_string_truncates_and_finishes(smol):
    base = smol.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=24, temperature=0))[0]
    assert " 8," in base.text
    out = smol.generate(["1, 2, 3, 4,"], SamplingParams(max_tokens=24, temperature=0, stop=(" 8,",)))[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == " 8,"
    assert out.text == base.text[: base.text.index(" 8,")]


def test_streamed_deltas_equal_final_text(smol):
    smol.add_request(
        "s", "The capital of France is", SamplingParams(max_tokens=20, temperature=0, stop=("Paris.",))
    )
    deltas, final = [], None
    while smol.has_unfinished():
        for o in smol.step():
            deltas.append(o.text_delta)
            final = o
    assert "".join(deltas) == final.text
    assert "Paris." not in final.text


def test_eos_finishes_with_stop(smol):
    ids = smol.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    out = smol.generate([ids], SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids[-1] == smol.tokenizer.eos_token_id
    assert "<|im_end|>" not in out.text


def test_logprobs_count(smol):
    out = smol.generate(["Hello"], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == 5 and all(len(lp.top) == 3 for lp in out.logprobs)
    assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs)  # greedy picks the top-1
