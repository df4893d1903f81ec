"""LoRA adapters on a tensor-parallel engine (TP=2, real follower processes, fp32 CPU).

Column-parallel targets (q/k/v/gate/up, Phi-3's fused qkv/gate_up) keep B's rows of a rank's
output columns, row-parallel ones (o/down) A's columns of its input columns; the followers mirror
rank 0's slot writes and per-step slot lists. Checked: TP=2 == TP=1 (greedy tokens identical,
log-probs within 1e-3) for a batch mixing several adapters and the base model, == transformers +
peft; slot eviction and reload; an adapter registered at run time; bad adapters refused naming
the adapter and the field.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.lora.peft_format import AdapterError
from engine.lora.targets import Target, shard_weights
from engine.sampling_params import SamplingParams
from tests.lora_adapters import (
    edit_config,
    hf_greedy,
    hf_logprobs,
    make_adapter,
    make_tiny_llama,
    peft_reference,
)

LOGPROB_TOL = 1e-3
N_GEN = 10
PARAMS = SamplingParams(max_tokens=N_GEN, temperature=0.0, ignore_eos=True, logprobs=0)

# (name, r, alpha, targets, rslora, rank_pattern)
ADAPTERS = [
    ("qv", 4, 8, ["q_proj", "v_proj", "down_proj"], False, None),
    ("all", 8, 16, "all-linear", True, {"o_proj": 2}),
    ("ku", 2, 3, ["k_proj", "up_proj", "gate_proj"], False, None),
    ("mlp", 6, 12, ["o_proj", "gate_proj", "up_proj", "down_proj"], False, {"layers.1.mlp.up_proj": 3}),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_tp")
    base = make_tiny_llama(root)
    paths = {}
    for i, (name, r, alpha, targets, rslora, rp) in enumerate(ADAPTERS):
        paths[name] = make_adapter(
            base, root / name, r=r, alpha=alpha, targets=targets, rslora=rslora, rank_pattern=rp, seed=20 + i
        )
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (6, 23, 41)]
    return root, base, paths, prompts


def _lora(paths, **kw) -> LoRAConfig:
    return LoRAConfig(tuple(AdapterSpec(n, str(p)) for n, p in paths.items()), **kw)


def _engine(base, tp: int, lora: LoRAConfig) -> LLMEngine:
    return LLMEngine.from_pretrained(
        base,
        EngineConfig(
            num_kv_blocks=128,
            tensor_parallel_size=tp,
            max_num_batched_tokens=48,
            long_prefill_token_threshold=16,
        ),
        lora=lora,
    )


def _run(eng: LLMEngine, reqs: list[tuple[list[int], str]]):
    ids = [eng.add_request(None, p, PARAMS, adapter_id=a) for p, a in reqs]
    final, lps = {}, {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            lps[o.request_id].extend(lp.logprob for lp in o.logprobs)
            if o.finished:
                final[o.request_id] = (o.token_ids, torch.tensor(lps[o.request_id]))
    return [final[i] for i in ids]


@pytest.fixture(scope="module")
def engines(tiny):
    """TP=1 and TP=2 engines on the same adapters; 3 slots for 4 adapters (evictions happen)."""
    _, base, paths, _ = tiny
    cfg = _lora(paths, max_loras=3)
    one = _engine(base, 1, cfg)
    two = _engine(base, 2, cfg)
    yield one, two
    two.close()
    assert all(not p.is_alive() for p in two.runner.followers)


def _reqs(tiny) -> list[tuple[list[int], str]]:
    _, _, paths, prompts = tiny
    names = ["", *paths]
    return [(prompts[i % len(prompts)], names[i % len(names)]) for i in range(10)]


def test_shard_weights_cut_column_and_row_targets() -> None:
    """Pure: the ranks' column pieces stack to the whole B (per block of a fused target); the
    ranks' row-parallel updates sum to the whole update."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    row = Target("m.o_proj", "o_proj", 0, "m.o_proj", in_features=4, out_features=8, out_offset=0)
    total = sum(
        x[:, r * 4 : (r + 1) * 4]
        @ shard_weights(row, a, b, r, 2)[0].t()
        @ shard_weights(row, a, b, r, 2)[1].t()
        for r in range(2)
    )
    torch.testing.assert_close(total, x @ a.t() @ b.t())
    # Phi-3's fused qkv: whole rows [q 4 | k 2 | v 2]; rank r keeps q[2r:2r+2], k[r], v[r]
    fused = Target(
        "m.qkv_proj", "qkv_proj", 0, "m.qkv", in_features=8, out_features=4, out_offset=0, parts=(2, 1, 1)
    )
    bq = torch.arange(8.0).unsqueeze(1)
    assert shard_weights(fused, a, bq, 0, 2)[1].flatten().tolist() == [0, 1, 4, 6]
    assert shard_weights(fused, a, bq, 1, 2)[1].flatten().tolist() == [2, 3, 5, 7]
    assert shard_weights(fused, a, bq, 1, 2)[0] is a
    with pytest.raises(ValueError, match="output rows"):
        shard_weights(fused, a, bq[:6], 0, 2)


def test_tp2_mixed_adapters_equal_tp1_and_peft(tiny, engines) -> None:
    """10 requests over 4 adapters and the base model in shared steps (chunked prefill, 3 slots
    for 4 adapters: slot evictions and reloads mirrored to the follower)."""
    _, base, paths, _ = tiny
    one, two = engines
    reqs = _reqs(tiny)
    ref = _run(one, reqs)
    loads_before = two.lora.stats.slot_loads
    got = _run(two, reqs)
    assert two.lora.stats.slot_evictions > 0 and two.lora.stats.slot_loads > loads_before
    for (_p, name), (rt, rl), (gt, gl) in zip(reqs, ref, got, strict=True):
        assert gt == rt, name
        assert torch.allclose(gl, rl, atol=LOGPROB_TOL), name
    # golden: the TP=2 engine's output with each adapter == transformers + peft
    for name, path in paths.items():
        peft = peft_reference(base, path)
        for (p, n), (toks, lps) in zip(reqs, got, strict=True):
            if n != name:
                continue
            want = hf_greedy(peft, p, N_GEN)
            assert toks == want, name
            assert torch.allclose(lps, hf_logprobs(peft, p, want), atol=LOGPROB_TOL), name
    _, _, _, prompts = tiny
    base_out = {tuple(p): t for p, (t, _) in zip(prompts, _run(two, [(p, "") for p in prompts]), strict=True)}
    for (p, n), (t, _) in zip(reqs, got, strict=True):
        if n in ("all", "mlp"):
            assert t != base_out[tuple(p)], f"{n} changes nothing"


def test_tp2_adapter_registered_at_run_time(tiny, engines) -> None:
    root, base, _, prompts = tiny
    one, two = engines
    extra = make_adapter(base, root / "late", r=5, alpha=10, targets="all-linear", seed=99)
    for eng in engines:
        eng.lora.register(AdapterSpec("late", str(extra)))
    reqs = [(prompts[1], "late"), (prompts[2], "qv"), (prompts[0], "late")]
    for (rt, rl), (gt, gl) in zip(_run(one, reqs), _run(two, reqs), strict=True):
        assert gt == rt
        assert torch.allclose(gl, rl, atol=LOGPROB_TOL)
    peft = peft_reference(base, extra)
    assert _run(two, [(prompts[1], "late")])[0][0] == hf_greedy(peft, prompts[1], N_GEN)
    # a bad adapter at run time is refused naming it and the field; the engine keeps serving
    big = make_adapter(base, root / "big", r=16, alpha=16, targets=["q_proj"], seed=7)
    with pytest.raises(AdapterError, match=r"'big'.*max_lora_rank"):
        two.lora.register(AdapterSpec("big", str(big)))
    assert _run(two, [(prompts[0], "qv")])[0][0] == _run(one, [(prompts[0], "qv")])[0][0]


def test_tp2_bad_adapter_at_start_is_refused_and_followers_stop(tiny) -> None:
    import multiprocessing as mp

    root, base, paths, _ = tiny
    children = len(mp.active_children())
    dora = edit_config(paths["qv"], root / "dora", use_dora=True)
    with pytest.raises(AdapterError, match=r"'dora'.*use_dora"):
        _engine(base, 2, _lora({"dora": dora}))
    # shapes of another model (a shard's shapes would not do either: checked against the whole model)
    other = make_adapter(base, root / "other_src", r=2, alpha=2, targets=["q_proj"], seed=1)
    from safetensors.torch import load_file, save_file

    w = load_file(other / "adapter_model.safetensors")
    w = {k: (v[: v.shape[0] // 2] if "lora_B" in k else v) for k, v in w.items()}
    save_file(w, other / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"'half'.*shape"):
        _engine(base, 2, _lora({"half": other}))
    assert len(mp.active_children()) == children  # the refused engines' followers were stopped


def test_tp2_phi3_fused_targets_equal_peft(tmp_path) -> None:
    """Phi-3's fused qkv_proj / gate_up_proj targets: each block cut per rank."""
    from transformers import Phi3Config

    from tests.tiny_models import COMMON, random_model

    cfg = Phi3Config(**COMMON, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = random_model(cfg, 1)
    base = tmp_path / "phi3"
    model.save_pretrained(base)
    adapter = make_adapter(
        base,
        tmp_path / "a",
        r=4,
        alpha=8,
        targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        seed=3,
    )
    eng = _engine(base, 2, _lora({"a": adapter}))
    try:
        p = list(range(5, 40))
        (toks, lps), (base_toks, _) = _run(eng, [(p, "a"), (p, "")])
    finally:
        eng.close()
    ref = peft_reference(base, adapter)
    want = hf_greedy(ref, p, N_GEN)
    assert toks == want
    assert torch.allclose(lps, hf_logprobs(ref, p, want), atol=LOGPROB_TOL)
    assert toks != base_toks
