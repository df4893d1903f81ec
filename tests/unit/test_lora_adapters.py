"""LoRA adapter loading and validation (engine.lora.peft_format, targets, slots, manager).

Every adapter that cannot be served exactly is refused with an error naming the adapter and the
field (or tensor); the engine's other adapters keep serving.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterError, AdapterSpec, LoRAConfig
from engine.lora.peft_format import load_adapter
from engine.lora.slots import SlotTable
from engine.lora.targets import target_map
from engine.models.loader import load_model
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError, ModelNotFoundError
from tests.lora_adapters import edit_config, make_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cfg")
    base = make_tiny_llama(root)
    good = make_adapter(base, root / "good", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=1)
    tm = target_map(load_model(base, torch.float32, torch.device("cpu")), "llama")
    return root, base, good, tm


def test_targets_of_fused_llama(env):
    _, _, _, tm = env
    assert tm.kinds == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    q, k, v = (tm.targets[f"model.layers.1.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj"))
    assert q.module == k.module == v.module == "model.layers.1.self_attn.qkv"
    assert (q.out_offset, k.out_offset, v.out_offset) == (0, 64, 96)  # 4 heads x 16, 2 kv heads x 16
    up = tm.targets["model.layers.0.mlp.up_proj"]
    assert (up.module, up.out_offset, up.out_features, up.in_features) == (
        "model.layers.0.mlp.gate_up",
        128,
        128,
        64,
    )


def test_good_adapter_loads_with_peft_scales(env):
    root, base, good, tm = env
    a = load_adapter("good", good, tm)
    assert sorted(a.weights) == sorted(
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    assert set(a.config.scales.values()) == {2.0} and a.config.max_rank == 4
    rp = make_adapter(
        base,
        root / "patterns",
        r=8,
        alpha=16,
        targets=["q_proj", "o_proj"],
        rslora=True,
        rank_pattern={"o_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 4},
    )
    b = load_adapter("patterns", rp, tm)
    assert b.config.ranks["model.layers.0.self_attn.o_proj"] == 2
    assert b.config.scales["model.layers.0.self_attn.o_proj"] == pytest.approx(16 / 2**0.5)
    assert b.config.scales["model.layers.0.self_attn.q_proj"] == pytest.approx(16 / 8**0.5)
    assert b.config.scales["model.layers.1.self_attn.q_proj"] == pytest.approx(4 / 8**0.5)
    # fan_in_fan_out is reset to False by PEFT for nn.Linear targets: accepted
    ok = load_adapter("fifo", edit_config(good, root / "fifo", fan_in_fan_out=True), tm)
    assert torch.equal(
        ok.weights["model.layers.0.self_attn.q_proj"][0], a.weights["model.layers.0.self_attn.q_proj"][0]
    )


BAD_CONFIGS = [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"lora_bias": True}, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights"),
    ({"exclude_modules": ["down_proj"]}, "exclude_modules"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"some_future_option": 3}, "some_future_option"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"task_type": "SEQ_CLS"}, "task_type"),
    ({"r": 8}, "'r'"),  # the weights have rank 4
    ({"rank_pattern": {"down_proj": 2}}, "rank_pattern"),
    ({"r": 0}, "'r'"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"target_modules": ["q_proj", "foo_proj"]}, "foo_proj"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
    ({"target_modules": "lm_head|.*q_proj"}, "lm_head"),
    ({"target_modules": ".*nothing"}, "target_modules"),
    ({"target_modules": ["q_proj"]}, "not a LoRA A/B weight of a module in target_modules"),  # extra tensors
    ({"target_modules": ["q_proj", "v_proj", "down_proj", "k_proj"]}, "k_proj.lora_A"),  # missing tensors
]


@pytest.mark.parametrize(("changes", "field"), BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_config_refused_naming_adapter_and_field(env, changes, field, tmp_path):
    _, _, good, tm = env
    path = edit_config(good, tmp_path / "bad", **changes)
    with pytest.raises(AdapterError) as ei:
        load_adapter("my-bad", path, tm)
    assert "'my-bad'" in str(ei.value) and field in str(ei.value), str(ei.value)


def test_missing_files_refused(env, tmp_path):
    _, _, good, tm = env
    with pytest.raises(ModelNotFoundError, match="'gone'.*does not exist"):
        load_adapter("gone", tmp_path / "nope", tm)
    no_cfg = edit_config(good, tmp_path / "no_cfg")
    (no_cfg / "adapter_config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="'x'.*adapter_config.json"):
        load_adapter("x", no_cfg, tm)
    no_w = edit_config(good, tmp_path / "no_w")
    (no_w / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="'y'.*adapter_model.safetensors"):
        load_adapter("y", no_w, tm)
    broken = edit_config(good, tmp_path / "broken")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="'z'.*adapter_config.json"):
        load_adapter("z", broken, tm)


def _rewrite(good, out, fn):
    path = edit_config(good, out)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_bad_tensors_refused(env, tmp_path):
    _, _, good, tm = env
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def wrong_in(t):
        t[key] = torch.zeros(4, 32)  # an adapter of a model with another hidden size

    with pytest.raises(AdapterError, match=r"'s'.*q_proj.lora_A has shape \(4, 32\).*in_features = 64"):
        load_adapter("s", _rewrite(good, tmp_path / "s", wrong_in), tm)

    def dora(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)

    with pytest.raises(AdapterError, match="'d'.*lora_magnitude_vector"):
        load_adapter("d", _rewrite(good, tmp_path / "d", dora), tm)

    def lm_head(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)

    with pytest.raises(AdapterError, match="'h'.*lm_head"):
        load_adapter("h", _rewrite(good, tmp_path / "h", lm_head), tm)

    def nan(t):
        t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][0, 0] = float("nan")

    with pytest.raises(AdapterError, match="'n'.*layers.1.mlp.down_proj.lora_B holds non-finite"):
        load_adapter("n", _rewrite(good, tmp_path / "n", nan), tm)


def test_engine_start_and_runtime_registration(env, tmp_path):
    root, base, good, _ = env
    bad = edit_config(good, tmp_path / "bad", use_dora=True)
    cfg = EngineConfig(num_kv_blocks=64)
    with pytest.raises(AdapterError, match="'broken'.*use_dora"):
        LLMEngine.from_pretrained(
            base, cfg, lora=LoRAConfig((AdapterSpec("good", str(good)), AdapterSpec("broken", str(bad))))
        )
    eng = LLMEngine.from_pretrained(base, cfg, lora=LoRAConfig((AdapterSpec("good", str(good)),)))
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(AdapterError, match="'broken'.*use_dora"):
        eng.lora.register(AdapterSpec("broken", str(bad)))
    big = make_adapter(base, tmp_path / "big", r=16, alpha=16, targets=["q_proj"])
    with pytest.raises(AdapterError, match="'big'.*16 is larger than.*max_lora_rank 4"):
        eng.lora.register(AdapterSpec("big", str(big)))
    assert eng.adapters() == ["good"]  # nothing else affected
    eng.add_request("r1", [1, 2, 3], sp, adapter_id="good")
    with pytest.raises(ModelNotFoundError, match="'broken' is not served.*served: good"):
        eng.add_request("r2", [1, 2, 3], sp, adapter_id="broken")
    while eng.has_unfinished():
        eng.step()
    plain = LLMEngine.from_pretrained(base, cfg)
    with pytest.raises(
        ModelNotFoundError, match="'good' is not served: this engine serves only the base model"
    ):
        plain.add_request(None, [1, 2, 3], sp, adapter_id="good")


def test_unsupported_model_type_refused(env):
    from engine.lora.targets import target_map as tmap

    with pytest.raises(InvalidRequestError, match="not supported for model type 'mixtral'"):
        tmap(torch.nn.Module(), "mixtral")


def test_slot_table_lru_and_pins():
    t = SlotTable(2)
    assert t.acquire("a").load and t.acquire("b").load
    assert t.acquire("a") == t.acquire("a")  # resident: no load
    assert t.acquire("c") is None  # both pinned
    t.release("b")
    got = t.acquire("c")
    assert got.load and got.evicted == "b" and t.slot_of("b") is None
    for _ in range(3):
        t.release("a")
    t.release("c")  # LRU order now: a (released first), then c
    got = t.acquire("d")
    assert got.evicted == "a" and t.resident() == ["d", "c"]
    with pytest.raises(RuntimeError, match="released more often"):
        t.release("a")


def test_adapter_spec_parse():
    assert AdapterSpec.parse("sql=/tmp/x") == AdapterSpec("sql", "/tmp/x")
    for bad in ("sql", "=x", "sql="):
        with pytest.raises(ValueError, match="NAME=PATH"):
            AdapterSpec.parse(bad)
    with pytest.raises(ValueError, match="not valid"):
        AdapterSpec("bad name", "/x")
    with pytest.raises(ValueError, match="unique"):
        LoRAConfig((AdapterSpec("a", "/x"), AdapterSpec("a", "/y")))


def test_lora_linear_matches_per_token_reference():
    """Every grouping path (one segment over the batch, row ranges, permuted segments, base rows)
    == x @ W^T + b + x @ A[s]^T @ B[s] token by token; the views survive ``.to()``."""
    from engine.lora.layers import LoRABatchContext, LoRALinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 6)
    ctx = LoRABatchContext()
    m = LoRALinear(
        base, ctx, num_slots=3, num_targets=1, rank=2, dtype=torch.float32, device=torch.device("cpu")
    )
    m = m.to(torch.float64).to(torch.float32)  # buffers replaced: the per-slot views follow
    with torch.no_grad():
        m.lora_a.copy_(torch.randn(3, 2, 8, generator=g))
        m.lora_b.copy_(torch.randn(3, 2, 6, generator=g))
    x = torch.randn(7, 8, generator=g)
    for slots in ([1] * 7, [2, 2, 2, 0, 0, -1, -1], [0, 1, 0, -1, 2, 1, 0], [-1] * 7):
        ctx.set(slots, list(range(7)), torch.device("cpu"))
        got = m(x)
        want = base(x)
        for t, s in enumerate(slots):
            if s >= 0:
                want[t] += x[t] @ m.lora_a[s].t() @ m.lora_b[s]
        assert torch.allclose(got, want, atol=1e-5), slots
    ctx.clear()
    assert torch.equal(m(x), base(x))
