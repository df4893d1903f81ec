"""Incremental detokenizing (engine.detokenizer): the streamed deltas and the final text equal the
tokenizer's decode of all the ids at once, for random id sequences of the real SmolLM2 tokenizer
(byte-level BPE: tokenizers' Rust DecodeStream, and the Python window scheme) and of a small
SentencePiece-style tokenizer with byte-fallback pieces (the window scheme), however the
ids are split into ``add`` calls, with stop strings, and after the state is rebuilt from the ids
(resume); and the per-token work is a short window, not the whole output."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from pdserve.errors import InvalidRequestError

SAMPLE = "Héllo wörld — naïve café ✓ 日本語 🙂👍🏽 👨‍👩‍👧 ∑∫ Привет 𝔘𝔫𝔦 \n\t end"


@pytest.fixture(scope="module")
def smol(smollm_path) -> Tokenizer:
    return Tokenizer(smollm_path)


class _WindowOnly(Tokenizer):
    """SmolLM2's tokenizer without its Rust decode stream: the window scheme on byte-level BPE."""

    def decode_stream(self, skip_special_tokens: bool = True):
        return None


@pytest.fixture(scope="module")
def smol_window(smollm_path) -> Tokenizer:
    return _WindowOnly(smollm_path)


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    """SentencePiece-style BPE (``▁`` spaces, a Strip decoder) with byte-fallback pieces, one
    special token and one added non-special token."""
    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ("▁", "H", "e", "l", "o", "▁H", "▁He", "▁Hel", "▁Hell", "▁Hello", "é", "▁é", "日", "▁w")
    for piece in pieces:
        vocab[piece] = len(vocab)
    merges = [("▁", "H"), ("▁H", "e"), ("▁He", "l"), ("▁Hel", "l"), ("▁Hell", "o"), ("▁", "é")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken("</s>", special=True)])
    tok.add_tokens([AddedToken("<tool>", special=False)])
    d = tmp_path_factory.mktemp("sp_tok")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return Tokenizer(d)


def _pool(tok: Tokenizer) -> list[int]:
    """Ids worth drawing often: the sample's (multi-byte characters split across tokens, emoji),
    the added/special tokens, byte pieces."""
    ids = set(tok.encode(SAMPLE, add_special_tokens=False))
    ids.update(tok._added)
    ids.update(i for i in tok._byte_pieces if i % 7 == 0 or i - min(tok._byte_pieces) >= 0x80)
    return sorted(ids)


def _ids(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    one = st.one_of(st.sampled_from(_pool(tok)), st.integers(0, tok.vocab_size - 1))
    return st.lists(one, max_size=40)


def _stream(d: IncrementalDetokenizer, ids: list[int], cuts: list[int]) -> list[str]:
    """Feed ``ids`` in chunks ending at ``cuts``, then the final (empty) add."""
    out, at = [], 0
    for c in sorted({min(c, len(ids)) for c in cuts}) + [len(ids)]:
        out.append(d.add(ids[at:c])[0])
        at = c
    out.append(d.add([], final=True)[0])
    return out


def _check_equal(tok: Tokenizer, ids: list[int], cuts: list[int], skip: bool) -> None:
    full = tok.decode(ids, skip_special_tokens=skip)
    d = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    assert "".join(_stream(d, ids, cuts)) == full
    assert d.text == full


def _check_resume(tok: Tokenizer, ids: list[int], k: int) -> None:
    full = tok.decode(ids)
    src = IncrementalDetokenizer(tok)
    head = "".join(src.add([t])[0] for t in ids[:k])
    dst = IncrementalDetokenizer(tok, text=src.text, emitted=src.emitted, ids=list(ids[:k]))
    assert dst.text == src.text and (dst.prefix_offset, dst.read_offset) == (
        src.prefix_offset,
        src.read_offset,
    )
    tail = "".join(dst.add([t])[0] for t in ids[k:]) + dst.add([], final=True)[0]
    assert head + tail == full


def _check_stop(tok: Tokenizer, ids: list[int], a: int, n: int) -> None:
    full = tok.decode(ids)
    stop = full[a : a + n]
    if not stop:
        return
    d = IncrementalDetokenizer(tok, (stop, "\x00never"))
    parts, matched = [], None
    for t in ids:
        delta, matched = d.add([t])
        parts.append(delta)
        if matched:
            break
    delta, matched = d.add([], final=True)
    parts.append(delta)
    assert matched == stop
    assert "".join(parts) == d.text == full[: full.index(stop)]


_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("name", ["smol", "smol_window", "sp"])
def test_property_streamed_text_equals_full_decode(name, request):
    tok = request.getfixturevalue(name)

    @_SETTINGS
    @given(_ids(tok), st.lists(st.integers(0, 40), max_size=6), st.booleans())
    def check(ids, cuts, skip):
        _check_equal(tok, ids, cuts, skip)

    check()


@pytest.mark.parametrize("name", ["smol", "smol_window", "sp"])
def test_property_resume_rebuilds_state_exactly(name, request):
    tok = request.getfixturevalue(name)

    @_SETTINGS
    @given(_ids(tok), st.integers(0, 40))
    def check(ids, k):
        _check_resume(tok, ids, min(k, len(ids)))

    check()


@pytest.mark.parametrize("name", ["smol", "smol_window", "sp"])
def test_property_stop_strings_spanning_tokens(name, request):
    tok = request.getfixturevalue(name)

    @_SETTINGS
    @given(_ids(tok), st.integers(0, 60), st.integers(1, 6))
    def check(ids, a, n):
        _check_stop(tok, ids, a, n)

    check()


def test_multibyte_and_emoji_split_across_tokens(smol):
    ids = smol.encode(SAMPLE, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in smol.token_text(i)]
    assert partial, "the sample should split a character across tokens"
    d = IncrementalDetokenizer(smol)
    parts = [d.add([i])[0] for i in ids]
    assert all("\ufffd" not in p for p in parts)  # never an incomplete character mid-stream
    parts.append(d.add([], final=True)[0])
    assert "".join(parts) == SAMPLE


def test_special_tokens_skipped_or_kept(smol):
    ids = smol.encode("Hi there", add_special_tokens=False)
    ids = [smol.eos_token_id, *ids, smol.eos_token_id, *ids]
    for skip in (True, False):
        _check_equal(smol, ids, [1, 2, 5], skip)
    assert "<|im_end|>" not in IncrementalDetokenizer(smol).add(ids, final=True)[0]


def test_sentencepiece_leading_space_after_special_token(sp):
    hello, eos = sp.encode("Hello", add_special_tokens=False), sp.eos_token_id
    for ids in ([eos, *hello, eos, *hello], [*hello, eos, eos, *hello], [eos, eos, *hello]):
        for skip in (True, False):
            _check_equal(sp, ids, [1, 2, 3], skip)


def test_byte_fallback_run_waits_for_its_end(sp):
    b = {x: sp._tok.token_to_id(f"<0x{x:02X}>") for x in (0xE2, 0x82, 0xAC, 0xFF)}
    hello = sp.encode("Hello", add_special_tokens=False)
    d = IncrementalDetokenizer(sp)
    assert d.add([*hello, b[0xE2], b[0x82], b[0xAC]])[0] == "Hello"  # '€' could still turn into U+FFFDs
    assert d.add([b[0xFF]])[0] == ""
    assert d.add(hello, final=True)[0] == "\ufffd" * 4 + "Hello"
    assert d.text == sp.decode([*hello, b[0xE2], b[0x82], b[0xAC], b[0xFF], *hello])


def test_resume_refuses_text_of_another_tokenizer(smol):
    ids = smol.encode("Hello world", add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="not a prefix"):
        IncrementalDetokenizer(smol, text="Goodbye", ids=ids)
    with pytest.raises(InvalidRequestError, match="without its token ids"):
        IncrementalDetokenizer(smol, text="Hello")


class _CountingTokenizer:
    """Wraps a tokenizer, recording how many ids each decode call was given."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def is_byte_piece(self, token_id):
        return self.tok.is_byte_piece(token_id)

    def is_special(self, token_id):
        return self.tok.is_special(token_id)


def test_per_token_work_is_a_short_window(smol):
    """2048 tokens: at most two decodes per token, each of a few ids (the old detokenizer decoded
    the whole output every token)."""
    ids = (smol.encode(SAMPLE + " The quick brown fox.", add_special_tokens=False) * 80)[:2048]
    c = _CountingTokenizer(smol)
    d = IncrementalDetokenizer(c)
    text = "".join(d.add([t])[0] for t in ids) + d.add([], final=True)[0]
    assert text == smol.decode(ids)
    assert len(c.sizes) <= 2 * len(ids) + 1 and max(c.sizes) <= 8


def _stream_engine(eng, prompts, params) -> dict[str, tuple[str, object]]:
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    deltas: dict[str, list[str]] = {}
    final: dict[str, object] = {}
    while eng.has_unfinished():
        for o in eng.step():
            deltas.setdefault(o.request_id, []).append(o.text_delta)
            if o.finished:
                final[o.request_id] = o
    return {rid: ("".join(d), final[rid]) for rid, d in deltas.items()}


@pytest.mark.parametrize(
    "cfg",
    [{"num_kv_blocks": 512}, {"num_kv_blocks": 24}, {"num_kv_blocks": 24, "swap_space_bytes": 64 << 20}],
    ids=["plain", "preempt_recompute", "preempt_swap"],
)
def test_engine_streams_golden_prompts_exactly(smollm_path, cfg):
    """The golden prompts (and a multi-byte one) through the engine, 64 greedy tokens: each
    request's streamed deltas == its final text == decode of its output ids at once, also when
    a small KV pool preempts (recompute or swap) and resumes requests."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from tests.unit.test_golden_hf import PROMPTS

    eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(**cfg))
    prompts = [*PROMPTS, "Translate to Japanese and add emoji: good morning, friend ->"]
    got = _stream_engine(eng, prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    assert len(got) == len(prompts)
    for streamed, out in got.values():
        assert streamed == out.text == eng.tokenizer.decode(out.token_ids)
    if cfg["num_kv_blocks"] < 512:
        assert eng.stats().num_preemptions > 0
    if "swap_space_bytes" in cfg:
        assert eng.stats().num_swap_outs > 0


def test_resumed_client_ahead_of_confirmed_text(smol):
    """direct.py's resume: the client already has more chars than the rebuilt state confirmed
    (its source flushed them); the deltas continue exactly where the client is."""
    ids = smol.encode("Hello wörld 🙂 and more 日本語", add_special_tokens=False)
    full = smol.decode(ids)
    for k in range(len(ids) + 1):
        for have in range(len(smol.decode(ids[:k])) + 1):
            d = IncrementalDetokenizer(smol, ("\x00",))
            d.add(ids[:k])
            d.emitted = have
            rest = "".join(d.add([t])[0] for t in ids[k:]) + d.add([], final=True)[0]
            assert full[:have] + rest == full


def test_the_rust_stream_serves_a_lone_byte_level_decoder_only(smol, sp):
    d = IncrementalDetokenizer(smol)
    assert d._step is not None and smol.decode_stream() is not None
    assert IncrementalDetokenizer(sp)._step is None and sp.decode_stream() is None


def test_a_trailing_incomplete_character_is_flushed_at_the_end(smol, smol_window):
    """An output cut inside a character: the stream holds the partial bytes, the final add
    flushes them as U+FFFD, exactly as the window scheme and a decode of all ids."""
    ids = smol.encode("ok 𝔘𝔫𝔦", add_special_tokens=False)
    cut = next(k for k in range(len(ids), 0, -1) if smol.decode(ids[:k]).endswith("\ufffd"))
    for tok in (smol, smol_window):
        d = IncrementalDetokenizer(tok)
        streamed = "".join(d.add([t])[0] for t in ids[:cut])
        assert "\ufffd" not in streamed
        assert streamed + d.add([], final=True)[0] == smol.decode(ids[:cut]) == d.text
