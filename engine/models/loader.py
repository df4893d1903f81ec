"""Load an HF checkpoint folder (safetensors, single file or sharded) into our model.

:func:`model_class` maps each supported ``model_type`` to its module (engine.models.llama,
qwen3, phi3, moe, gemma2, gemma3); a family's ``checkpoint_renames`` map its tensor names onto the modules'.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.models.config import ModelConfig
from engine.models.linear_native import (
    LinearBackend,
    apply_native_linear,
    resolve_linear,
)
from engine.models.llama import LlamaForCausalLM
from engine.models.no_init import skip_param_init
from engine.models.quant import WeightDType, check_weight_dtype, quantize_model
from engine.models.rope import RotaryEmbedding
from pdserve.errors import ModelNotFoundError


def model_class(cfg: ModelConfig) -> type[LlamaForCausalLM]:
    """The model class of ``cfg.model_type`` (every type engine.models.config accepts)."""
    from engine.models.gemma2 import Gemma2ForCausalLM
    from engine.models.gemma3 import Gemma3ForCausalLM
    from engine.models.moe import MixtralForCausalLM, MoEForCausalLM
    from engine.models.phi3 import Phi3ForCausalLM
    from engine.models.qwen3 import Qwen3ForCausalLM

    classes: dict[str, type[LlamaForCausalLM]] = {
        "llama": LlamaForCausalLM,
        "mistral": LlamaForCausalLM,
        "qwen2": LlamaForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "phi3": Phi3ForCausalLM,
        "mixtral": MixtralForCausalLM,
        "qwen2_moe": MoEForCausalLM,
        "qwen3_moe": MoEForCausalLM,
        "gemma2": Gemma2ForCausalLM,
        "gemma3_text": Gemma3ForCausalLM,
    }
    return classes[cfg.model_type]


def _param_name(cls: type[LlamaForCausalLM], name: str) -> str:
    for old, new in cls.checkpoint_renames:
        name = name.replace(old, new)
    return name


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto`` = float32 on CPU, the checkpoint's dtype on CUDA."""
    if name == "auto":
        return _DTYPES.get(cfg.torch_dtype, torch.float32) if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelNotFoundError(f"no model.safetensors (or index) in {str(path)!r}")


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    fuse: bool = True,
    weight_dtype: str | WeightDType = WeightDType.FLOAT32,
    linear: str | LinearBackend = LinearBackend.TORCH,
) -> LlamaForCausalLM:
    """Load the checkpoint at ``path`` in ``dtype`` on ``device``; q/k/v and gate/up fused unless
    ``fuse`` is False; projections quantised per ``weight_dtype`` (:mod:`engine.models.quant`,
    which refuses what it does not implement before any weight is read); float32 projections on
    the ``linear`` backend (:mod:`engine.models.linear_native`; ``native`` refused, naming why,
    before any weight is read where it does not apply)."""
    wd = WeightDType.parse(weight_dtype)
    path = Path(path)
    cfg = ModelConfig.from_path(path)
    check_weight_dtype(wd, cfg, dtype, device, fuse)
    lb = resolve_linear(linear, cfg, dtype, device, wd.value)
    cls = model_class(cfg)
    if device.type == "cpu":  # parameters allocated, not initialised: every one is loaded below
        with skip_param_init():
            model = cls(cfg, max_positions)
    else:  # no host copy of an accelerator's model (the meta device imports torch._dynamo: ~1 s)
        with torch.device("meta"):
            model = cls(cfg, max_positions)
        model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for ckpt_name in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _param_name(cls, ckpt_name)
                if name not in params:
                    if "rotary_emb" in name:
                        continue
                    raise ValueError(f"unexpected weight {ckpt_name!r} in {f.name}")
                if name in seen:
                    raise ValueError(f"weight {ckpt_name!r} in {f.name} loads {name!r} a second time")
                t = sf.get_tensor(ckpt_name)
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"weight {name}: shape {tuple(t.shape)} != expected {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(p.dtype))
                seen.add(name)
    model.tie_weights()
    missing = [n for n in params if n not in seen and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    model = model.to(dtype)
    # rotary tables are buffers computed at init (on meta above, off the CPU): rebuild them, in float32
    model.rotary = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope).to(
        device
    )
    if hasattr(model, "make_local_rotary"):  # Gemma3's second RoPE table, likewise
        local = model.make_local_rotary(max_positions)
        model.rotary_local = None if local is None else local.to(device)
    if fuse:
        model.fuse_weights()
    model.eval()
    model.requires_grad_(False)
    model = quantize_model(model, wd)
    return apply_native_linear(model) if lb is LinearBackend.NATIVE else model
