"""LoRA serving configuration (frozen)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter to serve: ``name`` (what requests put in their ``adapter``/``model`` field)
    and ``path`` (a PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``)."""

    name: str
    path: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"LoRA adapter name {self.name!r} is not valid: 1-128 characters, letters, digits and "
                "._:/@+- (starting with a letter or digit)"
            )
        if not self.path:
            raise ValueError(f"LoRA adapter {self.name!r} has an empty path")

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """``NAME=PATH`` (the ``--lora`` flag's form)."""
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora expects NAME=PATH, got {text!r}")
        return cls(name.strip(), path.strip())


@dataclass(frozen=True)
class LoRAConfig:
    """How an engine serves LoRA adapters (S-LoRA / Punica).

    ``adapters`` are registered when the engine starts: each is validated and read from disk into
    host memory then (a bad adapter fails the start, naming it and the field). ``max_loras`` is
    the number of adapter slots in engine (device) memory: at most that many distinct adapters
    run at once; a request whose adapter has no free slot waits (it never runs on the base model).
    ``max_lora_rank`` sizes each slot (None: the largest rank among ``adapters``); an adapter of a
    larger rank is refused. ``max_cpu_loras`` caps the adapters kept in host memory (None: all);
    one dropped from host memory is read from disk again, in the background, when next needed.
    """

    adapters: tuple[AdapterSpec, ...] = ()
    max_loras: int = 8
    max_lora_rank: int | None = None
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras must be >= 1, got {self.max_cpu_loras}")
        names = [a.name for a in self.adapters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"LoRA adapter names must be unique; repeated: {dup}")
        if self.max_lora_rank is None and not self.adapters:
            raise ValueError("max_lora_rank is required when no adapter is given at start")
