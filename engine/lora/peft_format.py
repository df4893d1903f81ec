"""Read and validate a PEFT LoRA adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) against a model's targets (:mod:`engine.lora.targets`).

What is implemented is exactly PEFT's LoRA forward for ``nn.Linear`` targets:
``y = base(x) + (x @ A^T @ B^T) * scale`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``), ``r``/``alpha`` per module from ``rank_pattern``/``alpha_pattern`` (PEFT's
``get_pattern_key`` rule: the first pattern ``p`` with ``re.match(rf"(.*\\.)?({p})$", name)``),
targets chosen from ``target_modules`` by PEFT's rule (a list: exact name or ``.``-suffix; a
string: ``re.fullmatch``; ``"all-linear"``: every projection, not ``lm_head``).

Everything else that changes the math is refused with :class:`AdapterError` naming the adapter
and the field (DoRA, LoRA bias, trained base biases, ``modules_to_save``, ``layers_to_transform``,
init methods that rewrite the base weights, ...); a field this module does not know is refused
unless it is empty/false. Dropout is training only; ``fan_in_fan_out`` is reset to False by PEFT
for ``nn.Linear`` targets (the only kind here), so it does not change the math either.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.lora.targets import Target, TargetMap
from pdserve.errors import InvalidRequestError, ModelNotFoundError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# fields that do not change inference math (informational, training-only or runtime hints)
_IGNORED = frozenset(
    {
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "fan_in_fan_out",  # PEFT resets it to False for nn.Linear targets
        "runtime_config",
        "megatron_core",
        "qalora_group_size",
        "ensure_weight_tying",  # only acts on tied embedding adapters, refused below
        "layers_pattern",  # only acts with layers_to_transform, refused below
    }
)
# fields read below
_HANDLED = frozenset(
    {
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "init_lora_weights",
    }
)
# fields that must hold the value PEFT uses for plain LoRA (anything else is not implemented)
_MUST_BE_EMPTY = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "exclude_modules",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "use_qalora",
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "use_bdlora",
)
# init methods whose saved adapter is exactly A and B (the others rewrite the base weights)
_PLAIN_INITS = (True, False, "gaussian")


class AdapterError(InvalidRequestError):
    """A LoRA adapter that cannot be served; the message names the adapter and the field."""


def _empty(v: Any) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that define the math, resolved per target:
    ``ranks[hf_name]`` and ``scales[hf_name]`` for every targeted module."""

    name: str
    ranks: dict[str, int]
    scales: dict[str, float]

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values())


@dataclass
class HostAdapter:
    """An adapter's weights in host memory (float32): ``weights[hf_name] = (A [r, in],
    B [out, r] multiplied by the module's scale)``."""

    name: str
    path: Path
    config: AdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _pattern_key(patterns: list[str], name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching ``name`` as a ``.``-suffix regex."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", name):
            return p
    return None


def _list_matches(entry: str, name: str) -> bool:
    return name == entry or name.endswith(f".{entry}")


def _resolve_targets(name: str, tm: TargetMap, target_modules: Any) -> list[Target]:
    untargetable = ("lm_head", "model.embed_tokens", "model.norm")
    if target_modules is None:
        raise AdapterError(f"LoRA adapter {name!r}: field 'target_modules' is missing")
    if target_modules == "all-linear":
        return list(tm.targets.values())
    if isinstance(target_modules, str):
        try:
            rx = re.compile(target_modules)
        except re.error as e:
            raise AdapterError(
                f"LoRA adapter {name!r}: field 'target_modules' is not a valid regex: {e}"
            ) from None
        bad = [m for m in untargetable if rx.fullmatch(m)]
        if bad:
            raise AdapterError(
                f"LoRA adapter {name!r}: field 'target_modules' matches {bad[0]!r}, which LoRA serving does not "
                f"support (supported: {', '.join(tm.kinds)})"
            )
        found = [t for t in tm.targets.values() if rx.fullmatch(t.hf_name)]
        if not found:
            raise AdapterError(
                f"LoRA adapter {name!r}: field 'target_modules' {target_modules!r} matches no module of this "
                f"model (it has {', '.join(tm.kinds)})"
            )
        return found
    if not isinstance(target_modules, list) or not all(isinstance(e, str) for e in target_modules):
        raise AdapterError(
            f"LoRA adapter {name!r}: field 'target_modules' must be a list of names or a regex"
        )
    found: dict[str, Target] = {}
    for entry in target_modules:
        if any(_list_matches(entry, m) for m in untargetable):
            raise AdapterError(
                f"LoRA adapter {name!r}: field 'target_modules' names {entry!r}, which LoRA serving does not "
                f"support (supported: {', '.join(tm.kinds)})"
            )
        hit = [t for t in tm.targets.values() if _list_matches(entry, t.hf_name)]
        if not hit:
            raise AdapterError(
                f"LoRA adapter {name!r}: field 'target_modules' names {entry!r}, a module this model does not "
                f"have (it has {', '.join(tm.kinds)})"
            )
        for t in hit:
            found[t.hf_name] = t
    return list(found.values())


def _number(name: str, field: str, v: Any, *, integer: bool) -> float:
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if not ok or isinstance(v, bool) or v <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise AdapterError(f"LoRA adapter {name!r}: field {field!r} must be {kind}, got {v!r}")
    return v


def parse_config(name: str, raw: dict[str, Any], tm: TargetMap) -> tuple[AdapterConfig, list[Target]]:
    """Validate ``adapter_config.json`` content against the model; returns the resolved
    config and the targeted modules. Raises AdapterError naming the adapter and the field."""
    if raw.get("peft_type") != "LORA":
        raise AdapterError(
            f"LoRA adapter {name!r}: field 'peft_type' is {raw.get('peft_type')!r}, expected 'LORA'"
        )
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(
            f"LoRA adapter {name!r}: field 'task_type' is {raw['task_type']!r}; only CAUSAL_LM adapters are served"
        )
    for field in _MUST_BE_EMPTY:
        if not _empty(raw.get(field)):
            raise AdapterError(
                f"LoRA adapter {name!r}: field {field!r} = {raw[field]!r} is not supported "
                "(only plain LoRA on the projections is implemented)"
            )
    if raw.get("bias", "none") != "none":
        raise AdapterError(
            f"LoRA adapter {name!r}: field 'bias' = {raw['bias']!r} is not supported (only 'none': "
            "trained base biases are not applied)"
        )
    init = raw.get("init_lora_weights", True)
    if not any(init is p or (isinstance(p, str) and init == p) for p in _PLAIN_INITS):
        raise AdapterError(
            f"LoRA adapter {name!r}: field 'init_lora_weights' = {init!r} is not supported (it rewrites the "
            "base weights; convert the adapter to plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion)"
        )
    known = _IGNORED | _HANDLED | set(_MUST_BE_EMPTY) | {"bias"}
    for field, v in raw.items():
        if field not in known and not _empty(v):
            raise AdapterError(f"LoRA adapter {name!r}: field {field!r} = {v!r} is not supported")
    r = int(_number(name, "r", raw.get("r"), integer=True))
    alpha = _number(name, "lora_alpha", raw.get("lora_alpha", 8), integer=False)
    rslora = raw.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"LoRA adapter {name!r}: field 'use_rslora' must be true or false, got {rslora!r}")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for field, pat in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pat, dict):
            raise AdapterError(f"LoRA adapter {name!r}: field {field!r} must be an object")
        for k, v in pat.items():
            _number(name, f"{field}[{k!r}]", v, integer=field == "rank_pattern")
    targets = _resolve_targets(name, tm, raw.get("target_modules"))
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for t in targets:
        rk = _pattern_key(list(rank_pattern), t.hf_name)
        ak = _pattern_key(list(alpha_pattern), t.hf_name)
        rt = int(rank_pattern[rk]) if rk is not None else r
        at = float(alpha_pattern[ak]) if ak is not None else float(alpha)
        ranks[t.hf_name] = rt
        scales[t.hf_name] = at / math.sqrt(rt) if rslora else at / rt
    return AdapterConfig(name, ranks, scales), targets


def read_config(name: str, path: Path) -> dict[str, Any]:
    f = path / CONFIG_FILE
    if not path.is_dir():
        raise ModelNotFoundError(f"LoRA adapter {name!r}: folder {str(path)!r} does not exist")
    if not f.is_file():
        raise ModelNotFoundError(f"LoRA adapter {name!r}: {CONFIG_FILE} is missing in {str(path)!r}")
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"LoRA adapter {name!r}: {CONFIG_FILE} must hold a JSON object")
    return raw


def load_adapter(name: str, path: str | Path, tm: TargetMap) -> HostAdapter:
    """Read, validate and load an adapter into host memory (float32, scale folded into B).

    Raises ModelNotFoundError (missing folder/files) or AdapterError (anything not servable),
    each naming the adapter and the field or tensor."""
    path = Path(path)
    cfg, targets = parse_config(name, read_config(name, path), tm)
    wf = path / WEIGHTS_FILE
    if not wf.is_file():
        extra = (
            " (adapter_model.bin is not read: save with safe_serialization)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise ModelNotFoundError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} is missing in {str(path)!r}{extra}")
    want: dict[str, tuple[str, str]] = {}  # tensor key -> (hf_name, "A"|"B")
    for t in targets:
        want[f"{_PREFIX}{t.hf_name}.lora_A.weight"] = (t.hf_name, "A")
        want[f"{_PREFIX}{t.hf_name}.lora_B.weight"] = (t.hf_name, "B")
    got: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(wf), framework="pt", device="cpu") as sf:
            keys = list(sf.keys())  # noqa: SIM118 - safe_open is not a mapping
            for key in keys:
                if key not in want:
                    raise AdapterError(
                        f"LoRA adapter {name!r}: tensor {key!r} in {WEIGHTS_FILE} is not a LoRA A/B weight of a "
                        "module in target_modules (unsupported: DoRA magnitudes, LoRA biases, embeddings, "
                        "lm_head, modules_to_save)"
                    )
                got.setdefault(want[key][0], {})[want[key][1]] = sf.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file is the adapter's fault
        raise AdapterError(f"LoRA adapter {name!r}: {WEIGHTS_FILE} cannot be read: {e}") from None
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t in targets:
        pair = got.get(t.hf_name, {})
        for part in ("A", "B"):
            if part not in pair:
                raise AdapterError(
                    f"LoRA adapter {name!r}: tensor {_PREFIX}{t.hf_name}.lora_{part}.weight is missing from "
                    f"{WEIGHTS_FILE} (target_modules selects {t.hf_name})"
                )
        a, b = pair["A"], pair["B"]
        r = cfg.ranks[t.hf_name]
        if not a.is_floating_point() or not b.is_floating_point():
            raise AdapterError(
                f"LoRA adapter {name!r}: {t.hf_name} weights must be floating point, got {a.dtype}"
            )
        if tuple(a.shape) != (r, t.in_features):
            raise AdapterError(
                f"LoRA adapter {name!r}: {t.hf_name}.lora_A has shape {tuple(a.shape)}, expected "
                f"{(r, t.in_features)} (field 'r'/'rank_pattern' = {r}, the model's in_features = {t.in_features})"
            )
        if tuple(b.shape) != (t.out_features, r):
            raise AdapterError(
                f"LoRA adapter {name!r}: {t.hf_name}.lora_B has shape {tuple(b.shape)}, expected "
                f"{(t.out_features, r)} (field 'r'/'rank_pattern' = {r}, the model's out_features = {t.out_features})"
            )
        af, bf = a.float().contiguous(), (b.float() * cfg.scales[t.hf_name]).contiguous()
        for part, w in (("A", af), ("B", bf)):
            if not torch.isfinite(w).all():
                raise AdapterError(
                    f"LoRA adapter {name!r}: {t.hf_name}.lora_{part} holds non-finite values (NaN/inf, "
                    "or overflow once scaled by lora_alpha/r)"
                )
        weights[t.hf_name] = (af, bf)
    return HostAdapter(name, path, cfg, weights)
