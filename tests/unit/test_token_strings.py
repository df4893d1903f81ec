"""Token strings for logprobs: ``Tokenizer.token_bytes`` / ``token_text`` give each token's own
exact bytes and text, checked against the HF tokenizer itself (byte-level BPE: SmolLM2) and on a
small SentencePiece-style vocabulary with byte-fallback pieces built here."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from engine.tokenizer import PieceEncoding, Tokenizer, piece_encoding
from pdserve.errors import InvalidRequestError
from pdserve.proto_convert import name_logprob_tokens
from pdserve.v1 import common_pb2


@pytest.fixture(scope="module")
def smol(smollm_path) -> Tokenizer:
    return Tokenizer(smollm_path)


def test_byte_level_text_is_the_decoded_single_token(smol):
    """For every token of the vocabulary, token_text == the tokenizer's decode of that token alone."""
    assert smol._pieces is PieceEncoding.BYTE_LEVEL
    hf = smol._tok
    bad = [
        i for i in range(smol.vocab_size) if smol.token_text(i) != hf.decode([i], skip_special_tokens=False)
    ]
    assert bad == []


def test_byte_level_bytes_spell_the_text_exactly(smol):
    text = "héllo — 日本語 🙂 naïve"
    ids = smol.encode(text, add_special_tokens=False)
    raw = [smol.token_bytes(i) for i in ids]
    assert b"".join(raw).decode() == text
    # some tokens hold only part of a character: their text is U+FFFD, their bytes are exact
    partial = [b for b in raw if "\ufffd" in b.decode("utf-8", errors="replace")]
    assert partial, "the sample should split a multi-byte character"
    assert all(len(b) >= 1 for b in partial)
    eos = smol.eos_token_id
    assert smol.token_text(eos) == smol.eos_token and smol.token_bytes(eos) == smol.eos_token.encode()


def test_out_of_vocabulary_id_is_refused(smol):
    with pytest.raises(InvalidRequestError, match="not in the vocabulary"):
        smol.token_bytes(10**9)
    with pytest.raises(InvalidRequestError):
        smol.token_bytes(-1)


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A SentencePiece-style BPE (``▁`` for spaces) with byte-fallback pieces <0x00>..<0xFF>."""
    vocab = {"<unk>": 0, "</s>": 1}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "H", "e", "l", "o", "▁H", "▁He", "▁Hel", "▁Hell", "▁Hello"):
        vocab[piece] = len(vocab)
    merges = [("▁", "H"), ("▁H", "e"), ("▁He", "l"), ("▁Hel", "l"), ("▁Hell", "o")]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    d = tmp_path_factory.mktemp("sp")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d, vocab


def test_byte_fallback_pieces_are_raw_bytes(sentencepiece_dir):
    d, vocab = sentencepiece_dir
    t = Tokenizer(d)
    assert t._pieces is PieceEncoding.METASPACE
    assert t.token_bytes(vocab["<0xE2>"]) == b"\xe2"
    assert t.token_text(vocab["<0xE2>"]) == "\ufffd"
    assert t.token_bytes(vocab["<0x41>"]) == b"A" and t.token_text(vocab["<0x41>"]) == "A"
    # the space a piece starts with is part of the token (the decoder strips it only at the start)
    assert t.token_bytes(vocab["▁Hello"]) == b" Hello" and t.token_text(vocab["▁Hello"]) == " Hello"
    # the bytes of a text's pieces, byte-fallback ones included, spell it
    ids = t._tok.encode("▁Hello▁—").ids
    assert any(i in (vocab["<0xE2>"], vocab["<0x80>"], vocab["<0x94>"]) for i in ids)
    assert b"".join(t.token_bytes(i) for i in ids).decode() == " Hello \u2014"


def test_piece_encoding_of_decoders():
    assert piece_encoding({"type": "ByteLevel"})[0] is PieceEncoding.BYTE_LEVEL
    assert piece_encoding({"type": "Metaspace", "replacement": "▁"}) == (PieceEncoding.METASPACE, "▁")
    assert piece_encoding({"type": "WordPiece", "prefix": "##"})[0] is PieceEncoding.OTHER
    assert piece_encoding(None)[0] is PieceEncoding.OTHER


def test_router_names_logprob_tokens(smol):
    """What the router does to every GenerateResponse logprob: text and bytes on the sampled token
    and on each alternative."""
    ids = smol.encode(" Paris 日", add_special_tokens=False)
    lp = common_pb2.TokenLogprob(
        token_id=ids[0],
        logprob=-0.1,
        top_logprobs=[common_pb2.TopLogprob(token_id=i, logprob=-1.0 - k) for k, i in enumerate(ids)],
    )
    name_logprob_tokens([lp], smol.token_bytes)
    assert lp.token == smol.token_text(ids[0]) and lp.token_bytes == smol.token_bytes(ids[0])
    assert [t.token for t in lp.top_logprobs] == [smol.token_text(i) for i in ids]
    assert b"".join(t.token_bytes for t in lp.top_logprobs) == " Paris 日".encode()
