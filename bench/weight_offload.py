"""Weight offloading (issue #15 part 4, FlexGen): decode throughput with part of the weights off the
device vs fully resident, and vs the bound the measured host/disk bandwidth sets, in one run.

SmolLM2-135M (fp32, CPU: the "device" is the engine's resident working set) runs the same offline
batch (``--batch`` prompts of ``--prompt`` tokens, ``--max-tokens`` greedy tokens each) on engines
that differ only in ``weight_memory_budget_bytes``: the whole model (resident), then device budgets
of 100% / 50% / 25% of the weights (a budget under the minimum -- the non-layer weights plus two
layer buffers -- is refused by the engine; the bench says so and runs at the minimum instead),
and 50% with every offloaded layer on disk (``weight_host_budget_bytes=0``). Each offloaded run
must produce the resident run's tokens exactly.

Figures: tokens/s (generated tokens over the batch's wall time), ratio to resident, bytes copied
per step, and the I/O bound: ``tokens per step / (host bytes per step / host_bw + disk bytes per
step / disk_bw)`` with bandwidths measured in this run (host: a copy of one layer's bytes; disk: a
read of a just-written file after a page-cache drop), and the bound on throughput
``min(resident, I/O bound)``; "of bound" is offloaded / that bound. The disk tier's reads in the
run itself may be served by the OS page cache (the file was just written): the bound uses the
cold read rate, so a run above its bound says the page cache served it. The engines are built
once and run interleaved for ``--repeats`` rounds (a load change on a shared host hits all of
them); each engine's best round is reported.

KV offloading (``kv_memory_budget_bytes``, :mod:`engine.kv_offload`): engines with the KV of 50%
and 100% of the layers in the host pool (budgets of ``layers - k`` layers' pools and two staging
buffers of :func:`engine.kv_offload.staging_bound` blocks), one with the 50% in the disk-backed pool
(``kv_host_budget_bytes=0``; priced at the measured disk rate) and one with 50% of the weights and
50% of the KV off the device, in the same rounds.
Their table: tokens/s and the ratio to resident, KV bytes moved per step (held blocks in, new rows
out, counted by the engine), the predicted step time of the cost model for those bytes
(:func:`engine.offload_policy.predict_step_s` with the measured compute and host bandwidth), and
the I/O bound ``tokens per step / (KV bytes per step / host_bw)``; "of bound" is offloaded /
``min(resident, I/O bound)``. ``--no-kv`` skips them, ``--no-weights`` the weight engines. Every
engine takes ``--linear`` (default ``torch``: an offloaded model takes torch's linear and KV
offloading turns the fused native forward off, so the resident reference must take the same path
for the ratio to measure the offloading, not the kernels).

Usage: python bench/weight_offload.py [--batch 8] [--prompt 32] [--max-tokens 16] [--repeats 2] [--model PATH]
       [--no-kv] [--no-weights]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.kv_offload import staging_bound  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.offload import fixed_nbytes, layer_nbytes, measure_rates, offline_batch_size  # noqa: E402
from engine.offload_policy import NUM_SLOTS, KVStepCost, WeightTier, kv_device_bytes, predict_step_s  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.cli_help import apply  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="prompts in the offline batch (default 8)")
    p.add_argument("--prompt", type=int, default=32, help="tokens per prompt (default 32)")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds over the engines (default 2)")
    p.add_argument("--model", default=None, help="model folder (default: the converted SmolLM2-135M)")
    p.add_argument(
        "--linear",
        default="torch",
        choices=["torch", "auto"],
        help="EngineConfig.linear of every engine (default torch: offloaded weights take torch's linear and KV "
        "offloading turns the fused native forward off, so the resident reference takes the same path)",
    )
    p.add_argument("--no-kv", action="store_true", help="skip the KV offloading engines")
    p.add_argument("--no-weights", action="store_true", help="skip the weight offloading engines")
    return apply(p)


def run(
    eng: LLMEngine, prompts: list[list[int]], params: SamplingParams
) -> tuple[list[list[int]], float, int]:
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    dt = time.perf_counter() - t0
    return [o.token_ids for o in outs], dt, eng.num_steps - steps0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.model:
        path = Path(a.model)
    else:
        from pdserve.model_setup import ensure_default_model

        path = ensure_default_model(progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    base = dict(
        num_kv_blocks=a.batch * (-(-(a.prompt + a.max_tokens) // 16) + 1),
        max_num_seqs=a.batch,
        max_model_len=a.prompt + a.max_tokens,  # the KV staging buffers' bound (staging_bound)
        linear=a.linear,
    )
    tmp = tempfile.mkdtemp(prefix="pdserve-offload-bench-")

    ref = LLMEngine.from_pretrained(path, EngineConfig(**base))
    m = ref.runner.model
    lbytes = [layer_nbytes(x) for x in m.model.layers]
    fixed = fixed_nbytes(m)
    total = fixed + sum(lbytes)
    floor = fixed + NUM_SLOTS * max(lbytes)
    rates = measure_rates(m, tmp)
    del m
    print(
        f"model {path.name}: weights {total / 2**20:.1f} MiB ({len(lbytes)} layers of {max(lbytes) / 2**20:.2f} MiB, "
        f"{fixed / 2**20:.1f} MiB outside the layers); minimum device budget {floor / 2**20:.1f} MiB "
        f"({100 * floor / total:.1f}% of the weights)"
    )
    print(
        f"measured: host->device {rates.host_bw / 1e9:.2f} GB/s, disk read (cold) {rates.disk_bw / 1e9:.2f} GB/s; "
        f"batch {a.batch} x {a.max_tokens} tokens, {torch.get_num_threads()} torch threads, "
        f"{a.repeats} interleaved rounds (best of each)"
    )
    engines: dict[str, LLMEngine] = {"resident": ref}
    weight_cases = (
        []
        if a.no_weights
        else [
            ("100%", 1.0, None),
            ("50%", 0.5, None),
            ("25%", 0.25, None),
            ("50%, disk only", 0.5, 0),
        ]
    )
    for name, frac, host in weight_cases:
        budget = int(total * frac)
        if budget < floor:
            print(
                f"  {name}: {budget} bytes is under the minimum {floor}: refused by the engine; running at the minimum"
            )
            name = f"{name}->min {100 * floor / total:.0f}%"
            budget = floor
        engines[name] = LLMEngine.from_pretrained(
            path,
            EngineConfig(
                **base,
                weight_memory_budget_bytes=budget,
                weight_host_budget_bytes=host,
                weight_offload_dir=tmp,
            ),
        )
    nl = len(lbytes)
    kv_layer = ref.kv.num_blocks * ref.runner.kv_cache[0, :, 0].numel() * ref.runner.kv_cache.element_size()
    kv_block = kv_layer // ref.kv.num_blocks
    staging = staging_bound(ref.kv.num_blocks, 16, a.batch, a.prompt + a.max_tokens)
    kv_engines: dict[str, LLMEngine] = {}
    if not a.no_kv:
        for name, k, wfrac in [
            ("KV 50%", nl // 2, None),
            ("KV 100%", nl, None),
            ("KV 50% + weights 50%", nl // 2, 0.5),
            ("KV 50%, disk", nl // 2, "disk"),
        ]:
            extra: dict = {}
            if wfrac == "disk":  # every offloaded layer's KV in the disk-backed pool
                extra = dict(kv_host_budget_bytes=0, kv_offload_dir=tmp)
            elif wfrac is not None:
                extra = dict(
                    weight_memory_budget_bytes=max(floor, int(total * wfrac)), weight_offload_dir=tmp
                )
            # budget for k offloaded layers with the engine's staging buffers (staging_bound blocks)
            budget = kv_device_bytes(nl, kv_layer, staging * kv_block, k)
            cfg = EngineConfig(**base, kv_memory_budget_bytes=budget, **extra)
            kv_engines[name] = engines[name] = LLMEngine.from_pretrained(path, cfg)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for eng in engines.values():
        run(eng, prompts[:1], warm)
    best: dict[str, tuple[float, int, int, float]] = {}  # name -> (seconds, steps, bytes copied, stall s)
    kv_best: dict[
        str, tuple[int, int, int]
    ] = {}  # name -> KV (read bytes, write bytes, reads) of the best round
    ok = True
    want: list[list[int]] | None = None
    for _ in range(a.repeats):
        for name, eng in engines.items():
            w = eng.weight_offload
            s0 = w.snapshot() if w else None
            k0 = eng.kv_offload.snapshot() if eng.kv_offload else None
            got, secs, steps = run(eng, prompts, params)
            s1 = w.snapshot() if w else None
            k1 = eng.kv_offload.snapshot() if eng.kv_offload else None
            if want is None:
                want = got
            ok &= got == want
            copied = s1.bytes_copied - s0.bytes_copied if s1 and s0 else 0
            stall = s1.stall_s - s0.stall_s if s1 and s0 else 0.0
            if name not in best or secs < best[name][0]:
                best[name] = (secs, steps, copied, stall)
                if k0 and k1:
                    kv_best[name] = (
                        k1.read_bytes - k0.read_bytes,
                        k1.write_bytes - k0.write_bytes,
                        k1.stall_s - k0.stall_s,
                    )
    ntok = a.batch * a.max_tokens
    ref_tps = ntok / best["resident"][0]
    print(f"resident: {ref_tps:.1f} tok/s ({best['resident'][1]} steps, {best['resident'][0]:.2f} s)")
    print(
        f"{'budget':>22} {'tiers d/h/k':>12} {'tok/s':>8} {'x resident':>10} {'MiB/step':>9} "
        f"{'I/O bound tok/s':>15} {'of bound':>8} {'stall s':>8} {'offline batch':>13}"
    )
    for name, eng in engines.items():
        w = eng.weight_offload
        if w is None:
            continue
        p = w.placement
        secs, steps, copied, stall = best[name]
        tiers = f"{p.tiers.count(WeightTier.DEVICE)}/{p.tiers.count(WeightTier.HOST)}/{p.tiers.count(WeightTier.DISK)}"
        tps = ntok / secs
        host_b = sum(lbytes[i] for i in p.offloaded if p.tiers[i] is WeightTier.HOST)
        disk_b = sum(lbytes[i] for i in p.offloaded if p.tiers[i] is WeightTier.DISK)
        io_s = host_b / rates.host_bw + disk_b / rates.disk_bw if len(p.offloaded) > NUM_SLOTS else 0.0
        io_bound = (ntok / max(steps, 1)) / io_s if io_s else float("inf")
        bound = min(ref_tps, io_bound)
        pick = offline_batch_size(w, max_batch=64).batch_size if w.rates else 0
        print(
            f"{name:>22} {tiers:>12} {tps:8.1f} {tps / ref_tps:10.3f} {copied / max(steps, 1) / 2**20:9.1f} "
            f"{io_bound:15.1f} {tps / bound:8.3f} {stall:8.2f} {pick:13d}"
        )
    if kv_engines:
        ref_s = best["resident"][0] / max(best["resident"][1], 1)
        print(
            f"KV offloading: {nl} layers, KV pool {ref.kv.num_blocks} blocks ({kv_layer / 2**20:.2f} MiB a layer), "
            f"staging buffers of {staging} blocks; resident step {ref_s * 1e3:.1f} ms"
        )
        print(
            f"{'engine':>22} {'KV off':>7} {'tok/s':>8} {'x resident':>10} {'KV MiB/step':>11} "
            f"{'pred ms/step':>12} {'ms/step':>8} {'I/O bound tok/s':>15} {'of bound':>8} {'stall s':>8}"
        )
    for name, eng in kv_engines.items():
        ko = eng.kv_offload
        assert ko is not None
        secs, steps, _, _ = best[name]
        rd, wr, stall = kv_best.get(name, (0, 0, 0.0))
        tps = ntok / secs
        per_step = (rd + wr) / max(steps, 1)
        nk = len(ko.placement.offloaded)
        nd = len(ko.placement.disk)  # layers whose KV is in the disk pool: priced at the disk rate
        io_s = per_step * ((nk - nd) / rates.host_bw + nd / rates.disk_bw) / max(nk, 1)
        io_bound = (ntok / max(steps, 1)) / io_s if io_s else float("inf")
        bound = min(ref_tps, io_bound)
        layer_rd, layer_wr = rd / max(steps * nk, 1), wr / max(steps * nk, 1)
        kv = KVStepCost(
            ko.placement.offloaded,
            layer_rd / rates.host_bw,
            layer_wr / rates.host_bw,
            ko.placement.disk,
            layer_rd / rates.disk_bw,
            layer_wr / rates.disk_bw,
        )
        wo = eng.weight_offload
        tiers = wo.placement.tiers if wo else (WeightTier.DEVICE,) * nl
        # the measured resident step spread over the layers as the compute (the model's compute
        # per layer is measured for a 16-row batch; a decode step's is what the resident run took)
        comp = [ref_s / nl] * nl
        pred = predict_step_s(tiers, lbytes, comp, rates.host_bw, rates.disk_bw, 0.0, kv=kv)
        print(
            f"{name:>22} {100 * ko.placement.fraction:6.0f}% {tps:8.1f} {tps / ref_tps:10.3f} {per_step / 2**20:11.2f} "
            f"{pred * 1e3:12.1f} {secs / max(steps, 1) * 1e3:8.1f} {io_bound:15.1f} {tps / bound:8.3f} {stall:8.2f}"
        )
    for eng in engines.values():
        eng.close()
    print("tokens identical to the resident run in every case:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
