"""Tensor parallelism of the engine (engine/models/tp_shard.py, engine/tp_group.py,
engine/tp_runner.py) on CPU with gloo.

* In process: every rank's shard of an attention / MLP block produces a partial sum, and the
  partial sums add up to the unsharded block's output (the all-reduce's job); sizes that do
  not divide are refused with a message naming them.
* Real processes: a TP=2 engine (rank 0 here, a spawned follower) on tiny Qwen2 (QKV bias) and
  Llama checkpoints gives the greedy tokens of the TP=1 engine, with logprobs within float
  tolerance; its exported KV equals the TP=1 engine's (whole heads, rank order), and hands off to
  a TP=1 decode engine and back; a follower exits when its worker is SIGKILLed.
* SmolLM2-135M at TP=3 (9 heads, 3 KV heads) gives the TP=1 greedy output (slow).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata, PrefillSlice
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.models.tp_shard import check_divisible, shard_model
from engine.sampling_params import SamplingParams
from tests.prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)


def _prompts(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randint(3, 300, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


# ------------------------------------------------------------------ sharding math, in process


def _prefill_md(t: int, block_size: int = 16) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.arange(t),
        num_decodes=0,
        decode_block_tables=None,
        decode_mask=None,
        prefills=[PrefillSlice(0, t, 0, None)],
        block_size=block_size,
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_shard_partial_sums_add_up_to_the_whole_layer(tiny_models, arch) -> None:
    path = tiny_models[arch]
    whole = load_model(path, torch.float32, torch.device("cpu"))
    cfg = whole.config
    tp = 2
    shards = [shard_model(copy.deepcopy(whole), r, tp, lambda t: None) for r in range(tp)]
    for s in shards:  # the hooks stay off here: the partial sums are checked by hand
        for layer in s.model.layers:
            layer.self_attn.all_reduce = layer.mlp.all_reduce = None
    t = 7
    x = torch.randn(t, cfg.hidden_size)
    pos = torch.arange(t)
    cos, sin = whole.rotary(pos, x.dtype)
    md = _prefill_md(t)
    for li in range(cfg.num_hidden_layers):
        full_cache = torch.zeros(2, 4, 16, cfg.num_key_value_heads, cfg.head_dim)
        want_attn = whole.model.layers[li].self_attn(x, cos, sin, full_cache, md)
        want_mlp = whole.model.layers[li].mlp(x)
        attn = mlp = torch.zeros_like(x)
        caches = []
        for s in shards:
            a = s.model.layers[li].self_attn
            assert (a.h, a.kvh) == (cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp)
            c = torch.zeros(2, 4, 16, a.kvh, cfg.head_dim)
            attn = attn + a(x, cos, sin, c, md)
            mlp = mlp + s.model.layers[li].mlp(x)
            caches.append(c)
        torch.testing.assert_close(attn, want_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp, want_mlp, rtol=1e-5, atol=1e-5)
        # each rank's cache holds its KV heads, in rank order
        torch.testing.assert_close(torch.cat(caches, dim=3), full_cache)


def test_sizes_that_do_not_divide_are_refused(tiny_models) -> None:
    cfg = ModelConfig.from_path(tiny_models["llama"])  # 4 heads, 2 KV heads, intermediate 128
    check_divisible(cfg, 2)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size 4 does not divide the model's \{'num_key_value_heads': 2\}"
    ):
        check_divisible(cfg, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        check_divisible(cfg, 0)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="does not divide"):
        LLMEngine.from_pretrained(
            tiny_models["llama"], EngineConfig(num_kv_blocks=16, tensor_parallel_size=3)
        )


# ------------------------------------------------------------------ real ranks (processes)


def _engine(path: Path, tp: int, blocks: int = 128) -> LLMEngine:
    return LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=blocks, tensor_parallel_size=tp))


@pytest.mark.parametrize("arch", ["qwen2", "llama3_rope"])
def test_tp2_engine_matches_tp1_and_hands_kv_to_any_tp(tiny_models, arch) -> None:
    path = tiny_models[arch]
    one = _engine(path, 1)
    two = _engine(path, 2)
    try:
        assert two.kv_shape == one.kv_shape  # the layout others see is the whole model's
        assert two.runner.kv_cache.shape[4] == one.runner.kv_cache.shape[4] // 2
        prompts = _prompts()
        ref = one.generate(prompts, GREEDY)
        got = two.generate(prompts, GREEDY)
        for r, g in zip(ref, got, strict=True):
            assert g.token_ids == r.token_ids
            for lr, lg in zip(r.logprobs, g.logprobs, strict=True):
                assert lg.logprob == pytest.approx(lr.logprob, abs=1e-4)
        # prefill on TP=2, export whole blocks, decode on TP=1: the same tokens
        for i, p in enumerate(prompts[:3]):
            two.add_request(f"p{i}", p, GREEDY, prefill_only=True)
            one.add_request(f"q{i}", p, GREEDY, prefill_only=True)
        while two.has_unfinished() or one.has_unfinished():
            two.step()
            one.step()
        dec = _engine(path, 1)
        for i, p in enumerate(prompts[:3]):
            kv2, kv1 = two.export_kv(f"p{i}"), one.export_kv(f"q{i}")
            torch.testing.assert_close(kv2.blocks, kv1.blocks, rtol=1e-5, atol=1e-5)
            dec.import_kv(
                f"d{i}", p, kv2.first_token, kv2.blocks, GREEDY, shape=kv2.shape, model_id=kv2.model_id
            )
            two.release(f"p{i}")
            one.release(f"q{i}")
        outs = {}
        while dec.has_unfinished():
            for o in dec.step():
                if o.finished:
                    outs[o.request_id] = o.token_ids
        for i in range(3):
            assert outs[f"d{i}"] == ref[i].token_ids
        # and the other way: TP=1 prefill imported by the TP=2 engine (heads split on import)
        one.add_request("x", prompts[4], GREEDY, prefill_only=True)
        while one.has_unfinished():
            one.step()
        kv = one.export_kv("x")
        two.import_kv(
            "x", prompts[4], kv.first_token, kv.blocks, GREEDY, shape=kv.shape, model_id=kv.model_id
        )
        torch.testing.assert_close(two.runner.export_blocks(two.kv.block_table("x")), kv.blocks)
        final = None
        while two.has_unfinished():
            for o in two.step():
                if o.finished:
                    final = o.token_ids
        assert final == ref[4].token_ids
    finally:
        two.close()
    assert all(not p.is_alive() for p in two.runner.followers)


def test_a_dead_follower_breaks_the_engine_with_a_clear_error(tiny_models) -> None:
    from pdserve.errors import UnavailableError

    eng = _engine(tiny_models["llama"], 2)
    calls: list[str] = []
    eng.runner.on_broken = calls.append
    try:
        assert eng.generate([_prompts(1)[0]], GREEDY)[0].token_ids
        follower = eng.runner.followers[0]
        os.kill(follower.pid, signal.SIGKILL)
        follower.join(timeout=10)
        with pytest.raises(UnavailableError, match=r"tensor-parallel rank 1 of 2 exited|collective failed"):
            for _ in range(50):  # the watchdog or the next collective notices
                eng.generate([_prompts(1)[0]], GREEDY)
                time.sleep(0.1)
        assert len(calls) == 1 and eng.runner.broken == calls[0]
        late: list[str] = []
        eng.runner.on_broken = late.append  # set after the break (a worker wiring up late): told at once
        assert late == calls
        with pytest.raises(UnavailableError, match="must be restarted"):
            eng.runner.export_blocks([0])
    finally:
        eng.close()


_KILL_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
e = LLMEngine.from_pretrained({path!r}, EngineConfig(num_kv_blocks=32, tensor_parallel_size=2))
print(json.dumps([p.pid for p in e.runner.followers]), flush=True)
sys.stdin.read()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped later by init) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_followers_exit_when_their_worker_is_killed(tiny_models) -> None:
    script = _KILL_SCRIPT.format(root=str(ROOT), path=str(tiny_models["llama"]))
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            pids = json.loads(proc.stdout.readline())
            assert len(pids) == 1 and _alive(pids[0])
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            deadline = time.monotonic() + 15
            while any(_alive(p) for p in pids):
                assert time.monotonic() < deadline, "a tensor-parallel follower outlived its worker"
                time.sleep(0.2)
        finally:
            proc.kill()


@pytest.mark.slow
def test_smollm2_tp3_greedy_equals_tp1(smollm_path) -> None:
    one = _engine(smollm_path, 1, 256)
    three = _engine(smollm_path, 3, 256)
    try:
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        ref = one.generate(PROMPTS[:6], params)
        got = three.generate(PROMPTS[:6], params)
        for p, r, g in zip(PROMPTS[:6], ref, got, strict=True):
            assert g.token_ids == r.token_ids, p
    finally:
        three.close()
