"""Tokenizer (HF ``tokenizers``) with the model's chat template (jinja2), and incremental detokenizing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from pdserve.errors import InvalidRequestError, ModelNotFoundError


def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v


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


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text that could be the start of a stop string is held back until it can't be; a matched
    stop string is cut (it and anything after it never reach the user).
    """

    tokenizer: Tokenizer
    stop: tuple[str, ...] = ()
    text: str = ""  # full decoded output (up to a stop string)
    emitted: int = 0  # chars of ``text`` already returned
    ids: list[int] = field(default_factory=list)

    def add(self, token_ids: list[int], final: bool = False) -> tuple[str, str | None]:
        """Append tokens; return (text delta, matched stop string or None)."""
        self.ids.extend(token_ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd") and not final:
            full = full[:-1]  # an incomplete UTF-8 sequence: wait for the next token
        matched: str | None = None
        if self.stop:
            start = max(0, len(self.text) - max(len(s) for s in self.stop))
            best = -1
            for s in self.stop:
                i = full.find(s, start)
                if i != -1 and (best == -1 or i < best):
                    best, matched = i, s
            if matched is not None:
                full = full[:best]
        self.text = full
        hold = 0 if (final or matched) else max((len(s) - 1 for s in self.stop), default=0)
        upto = max(self.emitted, len(full) - hold)
        delta = full[self.emitted : upto]
        self.emitted = upto
        return delta, matched
