"""A decode engine refuses to adopt a prefilled request that could not finish there even alone
(prompt plus max_tokens beyond its KV pool), as add_request refuses it. Seen on `pdserve serve
--kv-blocks 16` (256 tokens): a 121-token prompt with max_tokens 150 was adopted, decoded 136
tokens, ran out of blocks, preempted itself, and its recompute was refused 14 s later with a
misleading 'prompt of 257 tokens needs more KV blocks'."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


def _engine(path, blocks: int) -> LLMEngine:
    return LLMEngine.from_pretrained(
        path, EngineConfig(num_kv_blocks=blocks, block_size=16, enable_prefix_caching=False)
    )


def test_import_of_a_request_that_outgrows_the_pool_is_refused_at_once(llama) -> None:
    pre, dec = _engine(llama, 64), _engine(llama, 4)  # the decode pool: 4 x 16 = 64 tokens
    prompt = list(range(5, 45))  # 40 tokens: 3 blocks, fits
    fits = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)  # 60 tokens: 4 blocks
    too_long = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)  # 70 tokens: 5 blocks
    for rid, params in (("ok", fits), ("long", too_long)):
        pre.add_request(rid, prompt, params, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    long = pre.export_kv("long")
    with pytest.raises(InvalidRequestError, match="prompt of 40 tokens plus max_tokens 30 needs 5 KV blocks"):
        dec.import_kv("long", long.token_ids, long.first_token, long.blocks, too_long)
    assert dec.kv.num_free_blocks == 4 and not dec.has_unfinished()  # nothing taken
    ok = pre.export_kv("ok")
    dec.import_kv("ok", ok.token_ids, ok.first_token, ok.blocks, fits)
    outs = []
    while dec.has_unfinished():
        outs += [o for o in dec.step() if o.finished]
    assert [len(o.token_ids) for o in outs] == [20]
    assert dec.stats().num_preemptions == 0
