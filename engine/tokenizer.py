"""Tokenizer (HF ``tokenizers``) with the model's chat template (jinja2). Incremental detokenizing
lives in ``engine.detokenizer`` (re-exported here)."""

from __future__ import annotations

import enum
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from engine.detokenizer import IncrementalDetokenizer
from pdserve.errors import InvalidRequestError, ModelNotFoundError

__all__ = ["IncrementalDetokenizer", "PieceEncoding", "Tokenizer", "piece_encoding"]


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet inverted: the printable character each byte is written as
    in a byte-level vocabulary -> that byte (the ``bytes_to_unicode`` table of GPT-2/tiktoken)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_LEVEL = _byte_level_decoder()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class PieceEncoding(enum.Enum):
    """How a vocabulary piece (``id_to_token``) spells its bytes, read from tokenizer.json's
    ``decoder``: byte-level BPE (GPT-2 alphabet), SentencePiece style (``▁`` for a space, with or
    without ``<0xNN>`` byte-fallback pieces), or anything else (the decoder's own text)."""

    BYTE_LEVEL = "byte_level"
    METASPACE = "metaspace"
    OTHER = "other"


def _decoder_types(d: Any) -> list[dict[str, Any]]:
    if not isinstance(d, dict):
        return []
    if d.get("type") == "Sequence":
        return [x for sub in d.get("decoders", []) for x in _decoder_types(sub)]
    return [d]


def piece_encoding(decoder: Any) -> tuple[PieceEncoding, str]:
    """(encoding, the SentencePiece space marker) of a tokenizer.json ``decoder`` object."""
    parts = _decoder_types(decoder)
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return PieceEncoding.BYTE_LEVEL, ""
    for p in parts:
        if p.get("type") == "Metaspace":
            return PieceEncoding.METASPACE, str(p.get("replacement", "\u2581"))
        pat = p.get("pattern")
        if p.get("type") == "Replace" and isinstance(pat, dict) and p.get("content") == " ":
            return PieceEncoding.METASPACE, str(pat.get("String", "\u2581"))
    if "ByteFallback" in types:
        return PieceEncoding.METASPACE, "\u2581"
    return PieceEncoding.OTHER, ""


class Tokenizer:
    """Encode/decode text and render chat messages with the model's own template."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ModelNotFoundError(f"no tokenizer.json in {str(path)!r}")
        self._tok = HFTokenizer.from_file(str(tj))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        template = cfg.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self._compiled: jinja2.Template | None = None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.vocab_size = self._tok.get_vocab_size()
        decoder = json.loads(tj.read_text()).get("decoder")
        self._pieces, self._space = piece_encoding(decoder)
        # only a lone ByteLevel decoder: its text is the UTF-8 of the pieces' bytes, so text
        # confirmed up to a complete character never changes as ids follow (see decode_stream)
        self._byte_level_only = [p.get("type") for p in _decoder_types(decoder)] == ["ByteLevel"]
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self._special: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._bytes_cache: dict[int, bytes] = {}
        self._cache_lock = threading.Lock()
        self._byte_pieces: frozenset[int] = frozenset()
        if self._pieces is PieceEncoding.METASPACE:
            found = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
            self._byte_pieces = frozenset(i for i in found if i is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """An incremental decoder of this tokenizer's ids (tokenizers' Rust ``DecodeStream``, one
        call per id, ~4x cheaper than a window decode in Python): ``step(id)`` returns the text
        the id confirms (None while it gives none yet: an incomplete UTF-8 character, a skipped
        special token). None when it does not apply: only a tokenizer whose decoder is a lone
        ByteLevel has it. There the text of ids already confirmed never changes as more follow
        (byte-level text is the lossy UTF-8 of the pieces' bytes, and confirmed text ends on a
        complete character); a SentencePiece byte-fallback run can turn confirmed text into
        U+FFFDs, and other decoders strip or join pieces, which the window scheme of
        :class:`engine.detokenizer.IncrementalDetokenizer` handles instead."""
        if not self._byte_level_only:
            return None
        stream, tok = DecodeStream(skip_special_tokens=skip_special_tokens), self._tok
        return lambda token_id: stream.step(tok, token_id)

    def is_byte_piece(self, token_id: int) -> bool:
        """True for a SentencePiece byte-fallback piece ``<0xNN>``: its text depends on the byte
        pieces around it (a run of them decodes as a whole), so it is never detokenized alone."""
        return token_id in self._byte_pieces

    def is_special(self, token_id: int) -> bool:
        """True for a special added token (the ones ``decode(skip_special_tokens=True)`` drops)."""
        return token_id in self._special

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` stands for on its own, exactly.

        Byte-level BPE pieces map back through the GPT-2 byte alphabet (a piece may hold part of
        a UTF-8 character); a byte-fallback piece ``<0xNN>`` is the single byte NN; a
        SentencePiece piece has its space marker turned into a space (its leading space kept, as
        it is part of the token); an added/special token is its content in UTF-8 (e.g.
        ``<|im_end|>``). Other vocabularies: the UTF-8 of the decoder's text of the token.
        Raises InvalidRequestError for an id outside the vocabulary.
        """
        b = self._bytes_cache.get(token_id)
        if b is None:
            b = self._compute_bytes(token_id)
            with self._cache_lock:
                self._bytes_cache[token_id] = b
        return b

    def token_text(self, token_id: int) -> str:
        """The text of token ``token_id`` on its own: :meth:`token_bytes` decoded as UTF-8, with
        U+FFFD for an incomplete character (what ``decode([token_id])`` gives for a byte-level
        vocabulary, special tokens included)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def _compute_bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.encode()
        piece = self._tok.id_to_token(token_id) if token_id >= 0 else None
        if piece is None:
            raise InvalidRequestError(
                f"token id {token_id} is not in the vocabulary (size {self.vocab_size})"
            )
        if self._pieces is PieceEncoding.BYTE_LEVEL and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if self._pieces is PieceEncoding.METASPACE:
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return bytes([int(m.group(1), 16)])
            return piece.replace(self._space, " ").encode()
        return self._tok.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template: send a plain prompt instead")
        if not messages:
            raise InvalidRequestError("messages must not be empty")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidRequestError("each message needs a 'role' and a 'content'")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg: str) -> None:
                raise InvalidRequestError(f"chat template refused the messages: {msg}")

            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
