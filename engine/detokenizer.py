"""Incremental detokenizing: a growing list of token ids -> text deltas, linear in the output length.

Each new token costs one decode of a short window of recent ids (the vLLM / HF TGI scheme), never
of the whole output:

* ``prefix_offset`` .. ``read_offset``: ids already turned into text, kept only as left context;
  ``read_offset`` .. end: ids whose text is not yet confirmed.
* A token's text is confirmed when ``decode(ids[prefix_offset:])`` minus ``decode(ids[prefix_offset:
  read_offset])`` is final: the window's text does not end in U+FFFD (an incomplete UTF-8 sequence
  the next token may complete) and its last token is not a byte-fallback piece ``<0xNN>`` (a
  SentencePiece run of byte pieces decodes as a whole, and a later byte can still turn it into
  U+FFFDs). Unconfirmed text waits; ``final=True`` flushes it as it stands.
* A tokenizer with a ``decode_stream`` (a lone ByteLevel decoder: ``engine.tokenizer.Tokenizer``)
  is detokenized by it instead: tokenizers' Rust ``DecodeStream``, the same window scheme in one
  call per id. Its text up to a complete character never changes as ids follow, so ``final=True``
  flushes what it still holds as ``decode(ids)`` past the text confirmed so far.
* The state after any list of ids does not depend on how the ids were split into ``add`` calls
  (tokens are taken one at a time inside ``add``), so a resumed request's state (preemption, swap,
  migration, re-dispatch, a KV import on a decode worker) is rebuilt exactly by adding its ids again.

Contract: the concatenated deltas of a request (up to its final ``add``) and ``text`` equal
``tokenizer.decode(ids, skip_special_tokens)`` of all its ids at once, cut before the first stop
string. Text that could be the start of a stop string is held back until it can't be; a matched
stop string is cut (it and anything after it never reach the user).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pdserve.errors import InternalError, InvalidRequestError

_REPLACEMENT = "\ufffd"


def _never(_token_id: int) -> bool:
    return False


class DetokTokenizer(Protocol):
    """What the detokenizer needs of a tokenizer (``engine.tokenizer.Tokenizer`` has it all).

    ``decode(ids)`` skips special tokens; it is passed ``skip_special_tokens=False`` only when the
    detokenizer is asked to keep them. ``is_byte_piece`` / ``is_special`` may be absent (a
    tokenizer without byte-fallback pieces / special tokens, e.g. a test double), and so may
    ``decode_stream(skip_special_tokens)`` (``engine.tokenizer.Tokenizer.decode_stream``: a
    per-id step function whose text is prefix-stable, or None; absent or None: the window)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def _stream_of(tokenizer: DetokTokenizer, skip_special_tokens: bool) -> Callable[[int], str | None] | None:
    make = getattr(tokenizer, "decode_stream", None)
    return make(skip_special_tokens) if make is not None else None


class IncrementalDetokenizer:
    """Per-request detokenizer state; see the module docstring for the contract.

    ``text``: the output text confirmed so far (cut before a matched stop string); ``emitted``:
    chars of ``text`` already returned as deltas (a resumed stream sets it to what its client has).
    ``text`` / ``emitted`` / ``ids`` given together rebuild a request's state: the ids are decoded
    again (one window per token) and ``text`` must be a prefix of their text, else
    InvalidRequestError (a different tokenizer wrote it).

    Work per token is bounded by the window, the new text and the longest stop string: the text is
    kept as chunks (joined only when ``text`` is read), the not-yet-returned text and the tail that
    stop strings are searched in are kept apart.
    """

    def __init__(
        self,
        tokenizer: DetokTokenizer,
        stop: tuple[str, ...] = (),
        text: str = "",
        emitted: int = 0,
        ids: list[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self._is_byte_piece = getattr(tokenizer, "is_byte_piece", _never)
        self._is_special = getattr(tokenizer, "is_special", _never)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_len: int | None = 0  # len(decode(ids[prefix_offset:read_offset])), None: unknown
        self._chunks: list[str] = []  # "".join(_chunks) == text
        self._len = 0  # len(text)
        self._emitted = 0
        self._pending = ""  # text[emitted:]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._tail = ""  # text[_scan_from:]: where the next stop string can start
        self._scan_from = 0
        self._matched: str | None = None
        self._open_run = False  # the last text-giving token was a byte-fallback piece
        # the Rust stream (None: the window scheme below); whether it holds ids without text yet
        self._step = _stream_of(tokenizer, skip_special_tokens)
        self._held = False
        if ids:
            for t in ids:
                self._push(int(t))
            if not self.text.startswith(text):
                raise InvalidRequestError(
                    f"the resumed request's text ({len(text)} chars) is not a prefix of its "
                    f"{len(ids)} output tokens' text: another tokenizer wrote it"
                )
            # the source searched its text for stop strings; what the ids give beyond it, not yet
            self._scan_from = max(0, len(text) - self._max_stop + 1)
            self._tail = self.text[self._scan_from :]
        elif text:
            raise InvalidRequestError("a detokenizer's text cannot be restored without its token ids")
        self.emitted = emitted

    @property
    def text(self) -> str:
        """The confirmed output text (one join of the chunks since the last read)."""
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def emitted(self) -> int:
        """Chars of ``text`` already returned; setting it (a resumed stream's client already has
        that many) makes the next deltas start there."""
        return self._emitted

    @emitted.setter
    def emitted(self, n: int) -> None:
        self._emitted = n
        self._pending = self.text[n:]

    # -- decoding --------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _push(self, token_id: int) -> None:
        """Append one id; confirm the window's new text when it is final."""
        self.ids.append(token_id)
        if self._step is not None:
            new = self._step(token_id)
            self._held = new is None
            if new is not None:
                self._append(new)
            return
        if self._is_byte_piece(token_id):
            self._open_run = True
        elif not (self.skip_special_tokens and self._is_special(token_id)):
            self._open_run = False  # (a skipped special token does not end a byte run)
        if not self._open_run:
            self._confirm(final=False)  # a byte-fallback run decodes as a whole: wait for its end

    def _flush_stream(self) -> None:
        """The end of a streamed request: the text of the ids the stream still holds (a trailing
        incomplete character, as U+FFFD), from one decode of all ids."""
        if not self._held:
            return
        self._held = False
        full = self._decode(self.ids)
        text = self.text
        if not full.startswith(text):  # cannot happen for a lone ByteLevel decoder
            raise InternalError(
                f"incremental text ({len(text)} chars) is not a prefix of the {len(self.ids)} ids' text"
            )
        self._append(full[len(text) :])

    def _confirm(self, final: bool) -> None:
        if self._step is not None:
            if final:
                self._flush_stream()
            return
        n = len(self.ids)
        if self.read_offset == n:
            return
        window = self._decode(self.ids[self.prefix_offset :])
        if not final and window.endswith(_REPLACEMENT):
            return
        if self._prefix_len is None:
            self._prefix_len = len(self._decode(self.ids[self.prefix_offset : self.read_offset]))
        new = window[self._prefix_len :]
        self._append(new)
        if new or self.prefix_offset == self.read_offset:
            # the confirmed ids become the next window's left context; ids that gave no text
            # (skipped special tokens) never become the whole context, so a decoder that strips
            # its first character (SentencePiece's leading space) never strips a new one
            self.prefix_offset, self._prefix_len = self.read_offset, None
        else:
            self._prefix_len = len(window)
        self.read_offset = n

    def _append(self, new: str) -> None:
        if not new:
            return
        if self._emitted <= self._len:
            self._pending += new
        else:  # a resumed client already has part of it
            self._pending += new[self._emitted - self._len :]
        self._chunks.append(new)
        self._len += len(new)
        if self.stop:
            self._tail += new

    # -- public ----------------------------------------------------------------------------
    def add(self, token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Append tokens; return (text delta, matched stop string or None). ``final``: the request
        ends here, so unconfirmed text (a trailing incomplete character) is flushed as it stands.
        After a stop string matched, tokens are ignored and only held-back text is returned."""
        if self._matched is None:
            before = self._len
            for t in token_ids:
                self._push(int(t))
            if final:
                self._confirm(final=True)
            if self.stop and self._len > before:
                self._find_stop()
        hold = 0 if (final or self._matched is not None) else max(self._max_stop - 1, 0)
        k = max(0, self._len - hold - self._emitted)
        delta, self._pending = self._pending[:k], self._pending[k:]
        self._emitted += k
        return delta, self._matched

    def _find_stop(self) -> None:
        best, matched = -1, None
        for s in self.stop:
            i = self._tail.find(s)
            if i != -1 and (best == -1 or i < best):
                best, matched = i, s
        if matched is not None:
            cut = self._scan_from + best
            self._chunks[:] = [self.text[:cut]]
            self._pending = self._pending[: max(0, cut - self._emitted)]
            self._len, self._tail, self._matched = cut, "", matched
        else:
            keep = min(len(self._tail), self._max_stop - 1)
            self._scan_from = self._len - keep
            self._tail = self._tail[len(self._tail) - keep :]


class OutputText:
    """A request's text rendered from its outputs' token ids by the caller, off the engine thread
    (``LLMEngine.take_detokenizer``; #12: the decode worker's event loop renders it, as vLLM v1's
    front end does): :meth:`render` sets ``text_delta`` and ``text`` of each output, which must
    be given in order, to exactly what ``LLMEngine._emit`` would have set (the same detokenizer
    state fed the same ids: a finished output's eos / stop token id is not rendered, the last
    output flushes). Only for requests without stop strings (the engine keeps those);
    ``speculative``: the engine decodes speculatively (a step's several tokens, of which only
    the last can be the stop token, as ``LLMEngine._detok_run`` renders them)."""

    __slots__ = ("detok", "speculative")

    def __init__(self, detok: IncrementalDetokenizer, speculative: bool = False) -> None:
        if detok.stop:
            raise InvalidRequestError("OutputText renders requests without stop strings only")
        self.detok = detok
        self.speculative = speculative

    def render(self, out) -> None:  # noqa: ANN001 - an engine.outputs.RequestOutput
        """Set ``out.text_delta`` / ``out.text`` (the output's ``new_token_ids``, ``finished``
        and ``stop_reason`` are read)."""
        new, finished = out.new_token_ids, out.finished
        if not finished:
            visible = new
        elif self.speculative and len(new) > 1:
            visible = new[:-1] if out.stop_reason == new[-1] else new
        else:
            stop = out.stop_reason
            visible = [t for t in new if t != stop]
        d = self.detok
        out.text_delta = d.add(visible, final=finished)[0]
        out.text = d.text
