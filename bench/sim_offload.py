"""Weight and KV offloading in the simulator (issue #15 part 4): an offline job on one A100 with
part of the weights and/or KV off the device, priced by the engine's own cost model
(``engine.offload_policy.predict_step_s`` via ``simulator.offload``), against the resident model.

Each row is one instance configuration (``simulator.offload.SimOffloadConfig``): where the
placement put the weights (layers on host / disk) and the KV (layers off the device: in the host
pool / in the disk-backed pool beyond ``kv_host_gib``), the KV pool it leaves (blocks: weight
offloading frees device memory for KV, ``kv_host_gib`` and ``kv_disk_gib`` grow the pool) and the
blocks a KV staging buffer holds (the engine's ``staging_bound``: ``max_num_seqs`` sequences of
``--max-model-len`` tokens, at most the pool), ``max_num_seqs`` (``--batch``, or with
``offline_batch`` the cost model's choice under it,
``EngineConfig.offline_batch``), the predicted decode step of a batch that size at ``--prompt``
context (the plan's ``step_s``: the cost model with the latency model's compute) and the I/O bound of
that step (the bytes it copies over the bandwidths, disk-backed KV layers at the disk's, overlap
ignored), then the simulated offline job:
``--requests`` requests arriving at once (``--prompt`` tokens in, ``--output`` out, vLLM-style
scheduler, ``max_num_seqs`` ``--batch``): output tokens/s over the job's simulated time and the
ratio to the resident row of the same model, mean TPOT, preemptions, and the share of busy time
the copies added (``instance_stats`` ``offload_s``). Llama-2-70B does not fit one A100 resident
(refused; shown) and runs with its weights offloaded (FlexGen's point).

Deterministic (no wall-clock figure); bandwidths ``--host-gbs`` (PCIe 4.0 x16) and ``--disk-gbs``
(one NVMe SSD) are assumptions, not measurements.

Usage: python bench/sim_offload.py [--requests 512] [--batch 256] [--prompt 512] [--output 128]
[--max-model-len N]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdserve import cli_help  # noqa: E402
from router.policy import SLO  # noqa: E402
from simulator.config import SimConfig, colocated, vllm_scheduler  # noqa: E402
from simulator.latency import LatencySpec  # noqa: E402
from simulator.models import model_spec  # noqa: E402
from simulator.offload import GIB, OffloadPlan, SimOffloadConfig  # noqa: E402
from simulator.sim import Simulation  # noqa: E402
from simulator.workload import Workload, WorkloadRequest  # noqa: E402


@dataclass(frozen=True)
class Row:
    name: str
    model: str
    offload: SimOffloadConfig | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--requests", type=int, default=512, help="requests of the offline job (default 512)")
    p.add_argument(
        "--batch",
        type=int,
        default=256,
        help="max_num_seqs of the instance (default 256; the offline batch's bound)",
    )
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per request (default 512)")
    p.add_argument("--output", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="the instance's max_model_len (default --prompt + --output: the job's need; "
        "it bounds the KV staging buffers)",
    )
    p.add_argument("--host-gbs", type=float, default=25.0, help="host -> device bandwidth, GB/s (default 25)")
    p.add_argument("--disk-gbs", type=float, default=3.0, help="disk -> device bandwidth, GB/s (default 3)")
    return cli_help.apply(p)


def rows(host: float, disk: float) -> list[Row]:
    w7 = model_spec("llama-2-7b").weight_bytes / GIB

    def o(**kw) -> SimOffloadConfig:
        return SimOffloadConfig(host_gb_s=host, disk_gb_s=disk, **kw)

    return [
        Row("resident", "llama-2-7b", None),
        Row("weights 50% off", "llama-2-7b", o(weight_budget_gib=0.5 * w7)),
        Row("weights 75% off", "llama-2-7b", o(weight_budget_gib=0.25 * w7)),
        Row(
            "weights 75% off, host 1 GiB (rest disk)",
            "llama-2-7b",
            o(weight_budget_gib=0.25 * w7, weight_host_gib=1.0),
        ),
        Row(
            "weights 50% off, offline batch", "llama-2-7b", o(weight_budget_gib=0.5 * w7, offline_batch=True)
        ),
        Row("KV host pool 64 GiB", "llama-2-7b", o(kv_host_gib=64.0)),
        Row("KV host 16 GiB + disk 48 GiB", "llama-2-7b", o(kv_host_gib=16.0, kv_disk_gib=48.0)),
        Row("KV disk 64 GiB (host 0)", "llama-2-7b", o(kv_host_gib=0.0, kv_disk_gib=64.0)),
        Row("resident", "llama-2-70b", None),
        Row("weights: 40 GiB on device", "llama-2-70b", o(weight_budget_gib=40.0)),
        Row(
            "weights: 40 GiB device, 32 GiB host (rest disk)",
            "llama-2-70b",
            o(weight_budget_gib=40.0, weight_host_gib=32.0),
        ),
        Row(
            "weights: 40 GiB on device, offline batch",
            "llama-2-70b",
            o(weight_budget_gib=40.0, offline_batch=True),
        ),
    ]


def io_bound_s(plan: OffloadPlan, held_blocks: int, new_tokens: int) -> float:
    """Seconds the step's copies take back to back (no overlap): weight layers off the device
    and, per offloaded KV layer, the held blocks in and the new rows out (the host-pool layers
    at the host bandwidth, the disk-backed ones at the disk's)."""
    w = plan.weights
    t = w.host_bytes / plan.host_bw + w.disk_bytes / plan.disk_bw
    kv = plan.kv
    per_layer = held_blocks * kv.block_bytes + new_tokens * kv.block_bytes // plan.block_size
    nd = len(kv.disk)
    return t + (len(kv.offloaded) - nd) * per_layer / plan.host_bw + nd * per_layer / plan.disk_bw


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    max_len = a.max_model_len or a.prompt + a.output
    if max_len < a.prompt + a.output:
        raise SystemExit(f"--max-model-len {max_len} is below --prompt + --output ({a.prompt + a.output})")
    wl = Workload("offline", tuple(WorkloadRequest(0.0, a.prompt, a.output) for _ in range(a.requests)))
    print(
        f"offline job: {a.requests} requests x ({a.prompt} in, {a.output} out) at t=0, one A100, "
        f"max_num_seqs {a.batch}, max_model_len {max_len}; host {a.host_gbs} GB/s, "
        f"disk {a.disk_gbs} GB/s"
    )
    print(
        "| model | config | weights off (host/disk layers) | KV layers off (host/disk) | pool blocks | "
        "staging blocks | max_num_seqs | pred. decode step (compute) | I/O bound | tok/s | vs resident | "
        "TPOT mean | preempt. | copies/busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    resident: dict[str, float] = {}
    for r in rows(a.host_gbs, a.disk_gbs):
        spec = LatencySpec(r.model, "a100")
        n = max_len
        try:
            c = colocated(spec, 1, scheduler=vllm_scheduler(n, a.batch), max_model_len=n, offload=r.offload)
            g = c.groups[0]
            if not c.fits(g):
                raise ValueError(f"{r.model} does not fit on one A100 (no room for KV)")
        except ValueError as e:
            print(f"| {r.model} | {r.name} | refused: {e} |||||||||||| ")
            continue
        plan = c.offload_plan(g)
        lat = c.latency_model(1)
        seqs = c.scheduler_for(g).max_num_seqs  # the offline batch's choice where set
        base = lat.decode_time(seqs, seqs * a.prompt)
        held = seqs * -(-a.prompt // c.block_size)
        if plan is not None:
            step = plan.step_s(base, held, seqs)
            bound = io_bound_s(plan, held, seqs)
            tiers = plan.weights
            hl = sum(1 for t in tiers.tiers if t.value == "host")
            dl = sum(1 for t in tiers.tiers if t.value == "disk")
            nd = len(plan.kv.disk)
            w_off, kv_off = f"{hl}/{dl}", f"{len(plan.kv.offloaded) - nd}/{nd}"
            stg = str(plan.kv.staging) if plan.kv.offloaded else "-"
        else:
            step, bound, w_off, kv_off, stg = base, 0.0, "0/0", "0/0", "-"
        res = Simulation(c, SimConfig(slo=SLO(1e9, 1e9))).run(wl)
        st = res.instance_stats["mixed0"]
        tps = a.requests * a.output / res.sim_time_s
        if r.offload is None:
            resident[r.model] = tps
        ratio = f"{tps / resident[r.model]:.2f}x" if r.model in resident else "-"
        tpot = res.summary()["tpot_mean"]
        copies = st.get("offload_s", 0.0) / st["busy_s"] if st["busy_s"] else 0.0
        print(
            f"| {r.model} | {r.name} | {w_off} | {kv_off} | {c.kv_blocks_for(g)} | {stg} | {seqs} | {step * 1e3:.1f} ms "
            f"(compute {base * 1e3:.1f}) | {bound * 1e3:.1f} ms | {tps:.0f} | {ratio} | {tpot * 1e3:.1f} ms | "
            f"{st['preemptions']} | {copies:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
