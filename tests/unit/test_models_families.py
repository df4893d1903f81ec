"""Qwen3, Phi-3, Gemma 3 and the mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) against
transformers.

Tiny random-weight checkpoints are built with transformers 5.23 (``save_pretrained``,
safetensors) once per module; every 1-d weight (norms, q/k norms, biases) is randomised too, so
a missing norm or bias cannot hide behind HF's ones/zeros initialisation.

* Golden: greedy tokens identical and log-probs within 1e-3 of transformers' forward, with
  chunked prefill (chunks of 16, block size 8) and a second round starting from prefix-cache hits.
* The MoE block alone equals HF's sparse block on a batch, and runs each expert at most once
  per batch (grouped by expert, not per token).
* Disaggregated == whole for two MoE models and Gemma 3: prefill_only + export_kv on one engine, import_kv and
  decode on another, the whole engine's tokens and log-probs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.tiny_models import save_random_models

TOL = 1e-3
VOCAB = 320
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
WINDOW = 24


def _configs() -> dict:
    from transformers import (
        Gemma3TextConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    return {
        # head_dim 32 != hidden/heads (16); every q/k/v/o bias on
        "qwen3": Qwen3Config(**COMMON, head_dim=32, attention_bias=True),
        # half the head rotated; every layer windowed
        "phi3": Phi3Config(
            **COMMON,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            sliding_window=WINDOW,
            pad_token_id=None,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "mixtral": MixtralConfig(
            **{**COMMON, "intermediate_size": 48}, num_local_experts=4, num_experts_per_tok=2
        ),
        # layer 1 dense (mlp_only_layers); shared expert; q/k/v bias; weights not renormalised
        "qwen2_moe": Qwen2MoeConfig(
            **COMMON,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            shared_expert_intermediate_size=80,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
        # local (windowed, theta 1e4) and global (theta 1e6, linear scaling) layers; logit cap;
        # query_pre_attn_scalar != head_dim; tied embeddings
        "gemma3": Gemma3TextConfig(
            **{**COMMON, "tie_word_embeddings": True},
            head_dim=32,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            },
            query_pre_attn_scalar=20,
            final_logit_softcapping=5.0,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        "qwen3_moe": Qwen3MoeConfig(
            **COMMON,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=40,
            norm_topk_prob=True,
        ),
    }


def make_models(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    configs = _configs()
    return save_random_models(root, {k: v for k, v in configs.items() if not names or k in names})


ARCHS = ["qwen3", "phi3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe"]
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def hf(models):
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


def _prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_ref(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    x = torch.tensor([ids])
    with torch.no_grad():
        gen = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None
        )[0][len(ids) :].tolist()
        lp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0].float(), -1)
    return gen, torch.stack([lp[len(ids) - 1 + j, t] for j, t in enumerate(gen)])


def _check(out, ref) -> None:
    toks, lps = ref
    assert out.token_ids == toks
    ours = torch.tensor([lp.logprob for lp in out.logprobs])
    assert torch.allclose(ours, lps, atol=TOL), (ours - lps).abs().max()


def _engine(path: Path, **kw) -> LLMEngine:
    base = dict(num_kv_blocks=128, max_num_batched_tokens=512, block_size=8)
    base.update(kw)
    return LLMEngine.from_pretrained(path, EngineConfig(**base))


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_with_chunked_prefill_and_prefix_hits(models, hf, arch) -> None:
    """Round 1: prompts of 5, 37 and 100 tokens prefilled in chunks of 16 (decodes batched with
    the chunks). Round 2: prompts sharing 64 and 96 tokens with round 1 start from prefix hits."""
    eng = _engine(models[arch], long_prefill_token_threshold=16, max_num_batched_tokens=40)
    model = hf(arch)
    first = _prompts((5, 37, 100), seed=1)
    for ids, out in zip(first, eng.generate(first, GREEDY), strict=True):
        _check(out, _hf_ref(model, ids, GREEDY.max_tokens))
    second = [first[2][:64] + _prompts((11,), seed=2)[0], first[2][:96] + _prompts((3,), seed=3)[0]]
    outs = eng.generate(second, GREEDY)
    assert [o.num_cached_tokens for o in outs] == [64, 96]
    for ids, out in zip(second, outs, strict=True):
        _check(out, _hf_ref(model, ids, GREEDY.max_tokens))
    assert eng.kv.num_used_blocks == 0


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_block_equals_hf_and_groups_tokens_by_expert(models, hf, arch, grouped, monkeypatch) -> None:
    """Layer 0's MoE block on 1 and 32 tokens equals HF's sparse block. Grouped path: each
    projection is one grouped matmul for the whole batch; loop path: each expert that has
    tokens runs exactly once per batch (never one token at a time)."""
    import torch.nn.functional as F

    from engine.models.loader import load_model
    from engine.models.moe import SparseMoE

    ours = load_model(models[arch], torch.float32, torch.device("cpu")).model.layers[0].mlp
    ref = hf(arch).model.layers[0].mlp
    assert isinstance(ours, SparseMoE) and ours.w13t is not None  # fused: stacked expert weights
    assert ours.grouped  # torch has grouped_mm
    ours.grouped = grouped
    experts: list[int] = []
    grouped_calls: list[int] = []
    run, gmm = SparseMoE._expert, F.grouped_mm
    monkeypatch.setattr(SparseMoE, "_expert", lambda self, e, x: experts.append(e) or run(self, e, x))
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: grouped_calls.append(1) or gmm(*a, **k))
    g = torch.Generator().manual_seed(3)
    for t in (1, 32):
        x = torch.randn(t, 64, generator=g)
        experts.clear()
        grouped_calls.clear()  # transformers' experts call grouped_mm too: ours are read before it runs
        with torch.no_grad():
            got = ours(x)
            calls = (len(grouped_calls), list(experts))
            want = ref(x.unsqueeze(0))[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        _, ids = ours.route(x)
        assert calls == ((2, []) if grouped else (0, sorted(set(ids.flatten().tolist()))))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gemma3"])
def test_disaggregated_equals_whole(models, arch) -> None:
    """prefill_only + export_kv on one engine, import_kv on another, decode: the whole engine's
    tokens and log-probs (block size 8; one prompt shorter than a block, one a multiple of it)."""
    path = models[arch]
    prompts = _prompts((5, 24, 61), seed=11)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    whole = _engine(path).generate(prompts, params)
    pre, dec = _engine(path, long_prefill_token_threshold=16), _engine(path)
    for i, p in enumerate(prompts):
        pre.add_request(f"r{i}", p, params, prefill_only=True)
    while pre.has_unfinished():
        pre.step()
    for i, p in enumerate(prompts):
        kv = pre.export_kv(f"r{i}")
        dec.import_kv(
            f"r{i}",
            p,
            kv.first_token,
            kv.blocks,
            params,
            shape=kv.shape,
            model_id=kv.model_id,
            first_logprob=kv.first_logprob,
        )
        pre.release(f"r{i}")
    assert pre.kv.num_used_blocks == 0
    got: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    toks: dict[str, list[int]] = {}
    while dec.has_unfinished():
        for o in dec.step():
            got[o.request_id].extend(o.logprobs)
            if o.finished:
                toks[o.request_id] = o.token_ids
    for i, w in enumerate(whole):
        assert toks[f"r{i}"] == w.token_ids
        ours = torch.tensor([lp.logprob for lp in got[f"r{i}"]])  # tokens 2.. (1 came with the KV)
        ref = torch.tensor([lp.logprob for lp in w.logprobs][1:])
        assert torch.allclose(ours, ref, atol=1e-5)
    assert dec.kv.num_used_blocks == 0


def _perturb(arch: str, model) -> None:
    """Switch off the feature the tiny config exercises, in HF's own model."""
    with torch.no_grad():
        if arch == "gemma3":  # the sliding layers' own RoPE (theta 1e4) -> the global one
            rot = model.model.rotary_emb
            rot.sliding_attention_inv_freq.copy_(rot.full_attention_inv_freq)
        elif arch == "gemma3_cap":  # no final logit soft-capping
            model.config.final_logit_softcapping = None
        elif arch == "qwen3":  # q/k norms -> plain RMS normalisation (weights 1)
            for lyr in model.model.layers:
                lyr.self_attn.q_norm.weight.fill_(1.0)
                lyr.self_attn.k_norm.weight.fill_(1.0)
        elif arch == "phi3":  # the window off
            model.config.sliding_window = None
            for lyr in model.model.layers:
                lyr.self_attn.sliding_window = None
        elif arch == "qwen2_moe":  # the shared expert off
            model.model.layers[0].mlp.shared_expert_gate.weight.fill_(-1e4)
        elif arch == "qwen3_moe":  # no renormalisation of the top-k weights
            model.model.layers[0].mlp.gate.norm_topk_prob = False
            model.model.layers[1].mlp.gate.norm_topk_prob = False
        else:  # mixtral: top-1 routing instead of top-2
            for lyr in model.model.layers:
                lyr.mlp.gate.top_k = 1


@pytest.mark.parametrize("feature", [*ARCHS, "gemma3_cap"])
def test_the_tiny_configs_exercise_their_feature(models, feature) -> None:
    """The golden tests have power: without the family's feature transformers answers otherwise."""
    from transformers import AutoModelForCausalLM

    arch = feature.split("_cap")[0]
    ids = torch.tensor(_prompts((60,), seed=9))
    a = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).eval()
    _perturb(feature, b)
    with torch.no_grad():
        la, lb = torch.log_softmax(a(ids).logits[0], -1), torch.log_softmax(b(ids).logits[0], -1)
    assert (la - lb).abs().max() > 10 * TOL


@pytest.mark.parametrize("arch", ["qwen3", "phi3", "gemma3"])
def test_tensor_parallel_shards_add_up(models, arch) -> None:
    """Qwen3 (q/k norms, o_proj bias), Phi-3 (built fused), Gemma3 (Gemma q/k norms): two
    shards' attention and MLP outputs sum to the whole model's (the engine all-reduces them)."""
    import copy

    from engine.attention import AttentionMetadata, PrefillSlice
    from engine.models.loader import load_model
    from engine.models.tp_shard import shard_model

    whole = load_model(models[arch], torch.float32, torch.device("cpu"))
    cfg = whole.config
    tp, t = 2, 7
    shards = [shard_model(copy.deepcopy(whole), r, tp, lambda x: None) for r in range(tp)]
    for s in shards:
        for lyr in s.model.layers:
            lyr.self_attn.all_reduce = lyr.mlp.all_reduce = None
    x = torch.randn(t, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = whole.rotary(torch.arange(t), x.dtype)
    md = AttentionMetadata(torch.arange(t), 0, None, None, [PrefillSlice(0, t, 0, None)], 16)
    kvh = cfg.num_key_value_heads
    for li in range(cfg.num_hidden_layers):
        want_attn = whole.model.layers[li].self_attn(
            x, cos, sin, torch.zeros(2, 4, 16, kvh, cfg.head_dim), md
        )
        attn = sum(
            s.model.layers[li].self_attn(x, cos, sin, torch.zeros(2, 4, 16, kvh // tp, cfg.head_dim), md)
            for s in shards
        )
        torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-5)
        mlp = sum(s.model.layers[li].mlp(x) for s in shards)
        torch.testing.assert_close(mlp, whole.model.layers[li].mlp(x), rtol=1e-5, atol=1e-5)
