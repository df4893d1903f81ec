"""#12: a decode stream's text rendered off the engine thread (``LLMEngine.take_detokenizer`` +
``engine.detokenizer.OutputText``, used by the decode worker's event loop) is byte-identical,
output by output, to the text the engine renders itself: SmolLM2's golden prompts and a
multi-byte one (characters split across tokens), an eos finish (the stop token is not
rendered), preemption (recompute), a KV import (the first token rendered by the engine before
the hand-over) and a live migration mid-stream (the client's text continued from the ids). The
engine keeps the detokenizer of requests with stop strings and of parallel-sampling choices."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, OutputText
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError

MULTIBYTE = "Translate to Japanese and add emoji: good morning, friend ->"


@pytest.fixture(scope="module")
def prompts():
    from tests.unit.test_golden_hf import PROMPTS

    return [*PROMPTS, MULTIBYTE]


def _engine(path, blocks: int = 512) -> LLMEngine:
    return LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=blocks))


def _run(eng: LLMEngine, texts: dict[str, OutputText]) -> dict[str, list[tuple[str, str, list[int]]]]:
    """Step ``eng`` to the end: each request's outputs as (text_delta, text, new ids), the ones in
    ``texts`` rendered by their OutputText (as the decode worker's loop does)."""
    got: dict[str, list[tuple[str, str, list[int]]]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id in texts:
                assert o.text_delta == "" and o.text == ""  # the engine rendered nothing
                texts[o.request_id].render(o)
            got.setdefault(o.request_id, []).append((o.text_delta, o.text, list(o.new_token_ids)))
    return got


@pytest.fixture(scope="module")
def tiny_llama(smollm_path, tmp_path_factory):
    """The serving bench's model: tiny random Llama with SmolLM2's tokenizer (its sampled tokens
    split multi-byte characters often)."""
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("hotpath"), tokenizer_from=smollm_path)["llama"]


def _compare(path, cases, blocks: int) -> tuple[LLMEngine, dict]:
    """Run ``cases`` (prompt, params) on two engines, the engine rendering the text in one and
    OutputText in the other: every output's (delta, text, ids) equal; the second engine's outputs."""
    ref_eng, eng = _engine(path, blocks), _engine(path, blocks)
    texts: dict[str, OutputText] = {}
    for i, (p, sp) in enumerate(cases):
        ref_eng.add_request(f"r{i}", p, sp)
        eng.add_request(f"r{i}", p, sp)
        d = eng.take_detokenizer(f"r{i}")
        assert d is not None
        texts[f"r{i}"] = OutputText(d)
    ref, got = _run(ref_eng, {}), _run(eng, texts)
    assert got == ref
    for outs in got.values():
        assert "".join(d for d, _, _ in outs) == outs[-1][1]
        assert outs[-1][1] == eng.tokenizer.decode([t for _, _, n in outs for t in n])
    return eng, got


def test_loop_text_equals_engine_text_golden(smollm_path, prompts):
    """SmolLM2's golden prompts, greedy, and a chat prompt that ends on eos (not rendered)."""
    eng = _engine(smollm_path)
    chat = eng.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    cases = [(p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)) for p in prompts]
    cases.append((chat, SamplingParams(max_tokens=64, temperature=0.0)))
    eng, got = _compare(smollm_path, cases, 512)
    eos = got[f"r{len(cases) - 1}"]
    assert eos[-1][2][-1] == eng.tokenizer.eos_token_id and "<|im_end|>" not in eos[-1][1]


@pytest.mark.parametrize("blocks", [512, 12], ids=["plain", "preempt_recompute"])
def test_loop_text_equals_engine_text_multibyte(tiny_llama, blocks):
    """Random sampling on the bench's tiny model: characters split across tokens (held back,
    then completed), also when a small KV pool preempts and recomputes requests."""
    cases = [
        ([5 + s, 200, 17, 90], SamplingParams(max_tokens=64, temperature=1.0, seed=s, ignore_eos=True))
        for s in range(6)
    ]  # its 320 ids are SmolLM2's first 320 pieces: mostly single bytes
    eng, got = _compare(tiny_llama, cases, blocks)
    ids = [t for outs in got.values() for _, _, n in outs for t in n]
    assert any("\ufffd" in eng.tokenizer.decode([t]) for t in ids)  # a split character was rendered
    if blocks < 512:
        assert eng.stats().num_preemptions > 0


def test_engine_keeps_stop_strings_and_groups(smollm_path):
    eng = _engine(smollm_path)
    eng.add_request("s", "1, 2, 3,", SamplingParams(max_tokens=12, temperature=0.0, stop=(" 5,",)))
    eng.add_request("g", "1, 2, 3,", SamplingParams(max_tokens=4, temperature=0.8, n=2, seed=1))
    assert eng.take_detokenizer("s") is None  # stop strings: the engine cuts the text
    assert eng.take_detokenizer("g") is None  # a group id is not a tracked request
    for rid in list(eng._tracked):  # the group's parent / choices
        assert eng.take_detokenizer(rid) is None
    assert eng.take_detokenizer("nope") is None
    outs = [o for _ in range(40) if eng.has_unfinished() for o in eng.step()]
    s = [o for o in outs if o.request_id == "s"]
    assert s[-1].finished and s[-1].stop_reason == " 5," and s[-1].text == "".join(o.text_delta for o in s)
    assert s[-1].text.endswith(" 4,") and "5" not in s[-1].text
    with pytest.raises(InvalidRequestError, match="stop strings"):
        OutputText(IncrementalDetokenizer(eng.tokenizer, ("x",)))


def test_import_first_token_then_loop_text(smollm_path):
    """A handoff: the first token is rendered by the engine (import_kv) before the hand-over, its
    text (a partial character held back) continues in the loop's deltas exactly."""
    pre, ref_eng, eng = _engine(smollm_path), _engine(smollm_path), _engine(smollm_path)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    pre.add_request("h", MULTIBYTE, sp, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    exp = pre.export_kv("h")
    ids, first = exp.token_ids, exp.first_token
    for e in (ref_eng, eng):
        e.import_kv("h", ids, first, exp.blocks, sp)
    d = eng.take_detokenizer("h")
    assert d is not None and d.ids == [first]
    ref, got = _run(ref_eng, {}), _run(eng, {"h": OutputText(d)})
    assert got == ref
    full = eng.tokenizer.decode([first, *[t for _, _, n in got["h"] for t in n]])
    first_text = IncrementalDetokenizer(eng.tokenizer).add([first])[0]
    assert first_text + got["h"][-1][1][len(first_text) :] == full


def test_migration_mid_stream(smollm_path):
    """The source renders on the loop, migrates mid-stream: the client's text (source deltas, then
    the destination's ids rendered from the client's index, as the router and direct.py do)
    equals the engine run whole; the final state carries no engine text."""
    from engine.migration import migrate_in_process

    src, dst, ref_eng = _engine(smollm_path), _engine(smollm_path), _engine(smollm_path)
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True, seed=3)
    ref_eng.add_request("m", MULTIBYTE, sp)
    whole = _run(ref_eng, {})["m"]
    src.add_request("m", MULTIBYTE, sp)
    text = OutputText(src.take_detokenizer("m"))
    client_text, client_ids = "", []
    for _ in range(20):
        for o in src.step():
            text.render(o)
            client_text += o.text_delta
            client_ids += o.new_token_ids
    final = migrate_in_process(src, dst, "m")
    assert final.output_token_ids == client_ids and final.detok_text == ""
    resumed = IncrementalDetokenizer(src.tokenizer, ids=client_ids)
    resumed.emitted = len(client_text)
    while dst.has_unfinished():
        for o in dst.step():
            client_ids += o.new_token_ids
            client_text += resumed.add(o.new_token_ids, final=o.finished)[0]
    assert client_ids == [t for _, _, n in whole for t in n]
    assert client_text == whole[-1][1] == src.tokenizer.decode(client_ids)


def test_speculative_last_token_rule():
    """OutputText follows _emit's two rules for a finished output's stop token: speculative
    (several tokens a step) drops only the last; otherwise every token equal to it."""

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    def out(new, finished, stop):
        return RequestOutput("r", new, new, "", "", finished, None, 0, 0, stop_reason=stop)

    o = out([1, 2, 2], True, 2)
    OutputText(IncrementalDetokenizer(Tok()), speculative=True).render(o)
    assert o.text_delta == "bc" and o.text == "bc"
    o = out([1, 2], True, 2)
    OutputText(IncrementalDetokenizer(Tok())).render(o)
    assert o.text_delta == "b"
    o = out([2], False, None)
    OutputText(IncrementalDetokenizer(Tok())).render(o)
    assert o.text_delta == "c"


class _ToyTok:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i) for i in ids)


def test_loop_queue_renders_after_the_engine_hands_its_detokenizer_over():
    """decode_worker.service._LoopQueue.take_text: the adder runs, the detokenizer is taken, and
    every output put on the queue (the inbox's drain) is rendered before any consumer sees it;
    a failure passes untouched; an engine that keeps the detokenizer (None) leaves text as is."""
    from decode_worker.service import _LoopQueue

    class Inbox:
        def put(self, q, item, urgent=True):
            q.put_nowait(item)

    class Eng:
        def __init__(self, detok):
            self.detok, self.added = detok, []

        def take_detokenizer(self, rid):
            return self.detok

    async def main():
        q = _LoopQueue(Inbox())
        eng = Eng(IncrementalDetokenizer(_ToyTok()))
        assert q.take_text("r", lambda e: e.added.append("r") or 7, False)(eng) == 7 and eng.added == ["r"]
        o1 = RequestOutput("r", [1, 2], [1, 2], "", "", False, None, 0, 0)
        o2 = RequestOutput("r", [3], [1, 2, 3], "", "", True, None, 0, 0, stop_reason=3)
        err = RuntimeError("engine failed")
        for item in (o1, o2, err):
            q.put(item)
        got = [q.get_nowait() for _ in range(3)]
        assert got == [o1, o2, err]
        assert (o1.text_delta, o1.text, o2.text_delta, o2.text) == ("bc", "bc", "", "bc")
        kept = _LoopQueue(Inbox())
        kept.take_text("k", lambda e: None, False)(Eng(None))
        o3 = RequestOutput("k", [1], [1], "engine's", "engine's", False, None, 0, 0)
        kept.put(o3)
        assert kept.get_nowait().text_delta == "engine's"

    import asyncio

    asyncio.run(main())


def test_detok_env_is_checked(monkeypatch):
    from decode_worker.service import DETOK_ENV, detok_on_loop

    monkeypatch.delenv(DETOK_ENV, raising=False)
    assert detok_on_loop() is True
    monkeypatch.setenv(DETOK_ENV, "engine")
    assert detok_on_loop() is False
    monkeypatch.setenv(DETOK_ENV, "router")
    with pytest.raises(ValueError, match="PDSERVE_DECODE_DETOK"):
        detok_on_loop()
