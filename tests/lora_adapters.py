"""Build random PEFT LoRA adapters (and their references) for the LoRA tests (test helper)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import torch

from tests.tiny_models import COMMON, random_model


def make_tiny_llama(root: Path) -> Path:
    """A 2-layer random Llama saved as an HF folder (``tests.tiny_models.COMMON`` sizes)."""
    from transformers import LlamaConfig

    model = random_model(LlamaConfig(**COMMON, tie_word_embeddings=False), 1234)
    d = root / "tiny_llama"
    model.save_pretrained(d, safe_serialization=True)
    return d


@contextlib.contextmanager
def _quiet():
    """transformers 5 deprecation warnings raised inside peft (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def make_adapter(
    base_path: Path,
    out: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str] | str,
    rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    seed: int = 0,
    std: float = 0.08,
) -> Path:
    """Save a PEFT LoRA adapter of ``base_path`` with random A and B (std ``std``) to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type="CAUSAL_LM",
    )
    with _quiet():
        pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    with _quiet():
        pm.save_pretrained(out)
    return out


def peft_reference(base_path: Path, adapter: Path):
    """transformers + peft model with the adapter applied (not merged), eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with _quiet():
        return PeftModel.from_pretrained(base, adapter).eval()


def save_merged(base_path: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into the base weights (PEFT ``merge_and_unload``), saved as an HF folder."""
    import shutil

    with _quiet():
        merged = peft_reference(base_path, adapter).merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (base_path / f).is_file():
            shutil.copy(base_path / f, out / f)
    return out


def edit_config(adapter: Path, out: Path, **changes) -> Path:
    """A copy of ``adapter`` with ``adapter_config.json`` fields changed (None deletes a field)."""
    import shutil

    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0][len(ids) :].tolist()


def hf_logprobs(model, ids: list[int], gen: list[int]) -> torch.Tensor:
    with torch.no_grad():
        lg = model(input_ids=torch.tensor([ids + gen])).logits[0].float()
    lp = torch.log_softmax(lg, -1)
    return torch.stack([lp[len(ids) - 1 + j, t] for j, t in enumerate(gen)])
