"""Latency models on fixed inputs: Vidur tables + first-principles attention, DistServe fits."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from simulator.data import data_path
from simulator.hardware import GpuKind, gpu_spec
from simulator.latency import (
    DistServeEngine,
    DistServeLatencyModel,
    LatencySource,
    LatencySpec,
    VidurLatencyModel,
    make_latency_model,
)
from simulator.latency.vidur import AttentionModel
from simulator.models import ModelSpec, model_spec

_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
        "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")  # fmt: skip


def _vidur_row(tokens: int, tp: int) -> dict[str, str]:
    path = data_path(
        "vidur", "data", "profiling", "compute", "a100", "meta-llama", "Llama-2-7b-hf", "mlp.csv"
    )
    with path.open() as f:
        for row in csv.DictReader(f):
            if int(row["num_tokens"]) == tokens and int(row["num_tensor_parallel_workers"]) == tp:
                return row
    raise AssertionError("row not in table")


def test_vidur_linear_ops_equal_the_table_at_a_profiled_point() -> None:
    m = VidurLatencyModel("llama-2-7b", "a100", 1)
    row = _vidur_row(4096, 1)
    per_layer = sum(float(row[f"time_stats.{op}.median"]) for op in _OPS) * 1e-3
    expect = 32 * per_layer + float(row["time_stats.emb.median"]) * 1e-3
    assert m.linear_time(4096) == pytest.approx(expect, rel=1e-9)
    lo, hi = m.linear_time(4088), m.linear_time(4104)
    assert lo <= m.linear_time(4096) <= hi  # interpolation is monotone here


def test_vidur_tp_adds_all_reduce_and_speeds_up_linear_ops() -> None:
    t1 = VidurLatencyModel("llama-2-7b", "a100", 1).linear_time(2048)
    t2 = VidurLatencyModel("llama-2-7b", "a100", 2).linear_time(2048)
    assert 0.4 * t1 < t2 < t1


def test_vidur_decode_attention_is_memory_bound_by_formula() -> None:
    m = VidurLatencyModel("llama-2-7b", "a100", 1)
    spec, gpu = model_spec("llama-2-7b"), gpu_spec("a100")
    per_token = 32 * 4 * spec.num_kv_heads * spec.head_dim / (gpu.mem_bandwidth * 0.84)
    assert m.decode_time(1, 1000) - m.decode_time(1, 0) == pytest.approx(1000 * per_token, rel=1e-9)


def test_vidur_orders_of_magnitude_against_hardware_bounds() -> None:
    m = VidurLatencyModel("llama-2-7b", "a100", 1)
    spec, gpu = model_spec("llama-2-7b"), gpu_spec("a100")
    weights_read = spec.weight_bytes / gpu.mem_bandwidth  # 6.6 ms: a decode step reads every weight
    assert weights_read < m.decode_time(1, 100) < 3 * weights_read
    flops = 2 * spec.num_params * 2048 / gpu.peak_flops  # 88 ms at peak for a 2048-token prompt
    assert flops < m.prefill_time([2048]) < 4 * flops
    h = VidurLatencyModel("llama-2-7b", "h100", 1)
    assert h.prefill_time([2048]) < m.prefill_time([2048])
    # monotone in every argument
    assert m.step_time([512], [0], 8, 8000) > m.prefill_time([512]) > m.prefill_time([256])
    assert m.prefill_time([512], [4096]) > m.prefill_time([512], [0])


def test_first_principles_attention_matches_vidur_legacy_table() -> None:
    """Calibration check: the legacy A100 attention table (Llama-2-70B shapes, TP2)."""
    spec = ModelSpec("l70-tp2", 80, 8192, 64, 8, 28672, 32000, 69e9, 4096)
    att = AttentionModel(spec, gpu_spec(GpuKind.A100), tp=2)
    pre, dec = [], []
    with data_path("vidur", "data", "profiling", "legacy_2024-05", "a100", "attention.csv").open() as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i % 7:
                continue  # a 1-in-7 sample keeps the test fast
            b, kv = int(row["batch_size"]), int(row["kv_cache_size"])
            if row["is_prefill"] == "True":
                t = float(row["time_stats.attn_prefill.median"]) * 1e-3
                pred = att.prefill([(int(row["prefill_chunk_size"]), kv)] * b)
                pre.append(abs(math.log(pred / t)))
            else:
                t = float(row["time_stats.attn_decode.median"]) * 1e-3
                dec.append(abs(math.log(att.decode(b, b * kv) / t)))
    print(f"median |log error|: prefill {statistics.median(pre):.3f}, decode {statistics.median(dec):.3f}")
    assert statistics.median(pre) < 0.25
    assert statistics.median(dec) < 0.15


def test_distserve_fixed_inputs_match_the_published_fit() -> None:
    with data_path(
        "distserve", "simdistserve", "estimators", "profile_data", "profiler-a100-80g.distserve.json"
    ).open() as f:
        p = json.load(f)["facebook/opt-13b"]["1"]
    a, b, c = p["prefill"]
    m = DistServeLatencyModel("opt-13b", 1)
    assert m.prefill_time([512]) == pytest.approx((a + b * 512 + c * 512**2) / 1e3)
    assert m.prefill_time([100, 300]) == pytest.approx((a + b * 400 + c * (100**2 + 300**2)) / 1e3)
    da, db, dc = p["decoding_smallbs"]
    assert m.decode_time(10, 5000) == pytest.approx((da + db * 5000 + dc * 10) / 1e3)
    la, lb, lc = p["decoding_largebs"]
    assert m.decode_time(128, 64000) == pytest.approx((la + lb * 64000 + lc * 128) / 1e3)
    # a prompt in two chunks costs the whole prompt's work plus one more step intercept
    two = m.prefill_time([256], [0]) + m.prefill_time([256], [256])
    assert two == pytest.approx(m.prefill_time([512]) + a / 1e3)
    # mixed step = prefill + decode without the decode intercept
    assert m.step_time([512], [0], 10, 5000) == pytest.approx(
        m.prefill_time([512]) + (db * 5000 + dc * 10) / 1e3
    )


def test_distserve_engines_and_missing_tp() -> None:
    fast = DistServeLatencyModel("opt-13b", 2)
    slow = DistServeLatencyModel("opt-13b", 2, engine=DistServeEngine.VLLM)
    assert slow.prefill_time([512]) > fast.prefill_time([512])
    with pytest.raises(ValueError, match="TP8"):
        DistServeLatencyModel("opt-13b", 8)


def test_transfer_time_and_factory() -> None:
    spec = LatencySpec("opt-13b", transfer_bandwidth=1e9, transfer_latency_s=1e-3)
    m = make_latency_model(spec, 1)
    assert spec.resolved_source() is LatencySource.DISTSERVE
    assert make_latency_model(spec, 1) is m  # memoised
    assert m.transfer_time(0) == 0.0
    assert m.transfer_time(2e9) == pytest.approx(2.001)
    assert m.kv_transfer_time(1000) == pytest.approx(
        1e-3 + 1000 * model_spec("opt-13b").kv_bytes_per_token / 1e9
    )
    assert LatencySpec("llama-2-7b").resolved_source() is LatencySource.VIDUR
    assert isinstance(make_latency_model(LatencySpec("llama-2-70b", "h100"), 4), VidurLatencyModel)
