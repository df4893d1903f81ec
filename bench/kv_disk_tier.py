"""The store node's disk tier (issue #15 part 3): promotion throughput, and the Mooncake trace
with a DRAM tier smaller than its working set.

Part 1, promotion vs raw read (same files, same run). A BlockStore with a small DRAM arena
(``--dram-blocks``) and a disk tier takes ``--gib`` of SmolLM2-135M KV blocks (fp32, 16 tokens,
720 KiB each); all but the arena's last blocks are demoted into 256 MiB segment files. Then, in
the order they were written:

* raw: each segment file read sequentially (8 MiB ``readv`` into one buffer): the disk's
  bandwidth for these files, the bound for promotion;
* promotion: the demoted blocks leased ``--batch`` at a time (each lease promotes its blocks:
  slot reserved, ``preadv`` into the arena slot, XXH3 checked, committed), then released.

Page cache: without root it cannot be dropped system-wide; before each cold pass the bench asks
the kernel to drop these files' cached pages (``posix_fadvise(POSIX_FADV_DONTNEED)`` after an
``os.sync()``), and also runs both passes warm (files in the page cache). It prints whether the
cold passes were slower than the warm ones (if not, the drop had no effect and "cold" is warm).
Target: promotion >= 0.7x raw (cold; warm shown too).

Part 2, Mooncake conversation trace (``../shared/data/mooncake``, read in place): one global
prefix pool of 512-token blocks (:mod:`simulator.tiered_store`: DRAM LRU, evictions demoted to
an LRU disk tier, disk hits promoted) with DRAM at a few fractions of the trace's working set,
without a disk tier and with one (unlimited, and ``--disk-factor`` x DRAM). Prefix hit ratio =
reused prompt tokens / prompt tokens. Mean TTFT is a transfer-time model, not a queueing
simulation: per request, the best of (a) prefill the whole prompt, (b) load the DRAM-resident
leading run and prefill the rest, (c) with the disk tier, load every cached block (DRAM blocks
at ``--dram-gb-s``, disk blocks at the disk bandwidth) and prefill the rest; prefill time from
the simulator's Vidur latency model (``--model``, A100, TP1, one request alone), loads not
overlapped with compute (conservative). Disk bandwidth: ``--disk-gb-s``, default the cold
promotion bandwidth measured in part 1.

Part 3, the same trace in the simulator (queueing included): 8 prefill instances with a
per-instance DRAM host pool (LIMITED: 1000 blocks of 512 tokens, less than an instance's share
of the working set; 3000, about all of it, as the reference) and the GPU prefix cache (~840 blocks),
without and with an (unlimited) disk tier at the measured and at 3 GB/s (assumed NVMe); the
simulator uses a disk hit only when its read time beats recomputing those tokens
(:mod:`simulator.instance`). Mean and p90 TTFT.

Usage: python bench/kv_disk_tier.py [--gib 1] [--dram-blocks 64] [--batch 16] [--repeats 2]
       [--skip-trace] [--model llama-3-8b] [--dram-gb-s 25] [--disk-gb-s X] [--disk-factor 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.block_hash import chain_hashes  # noqa: E402
from kv_store.disk_tier import DiskTierConfig  # noqa: E402
from kv_store.index import InMemoryIndex  # noqa: E402
from kv_store.layout import KVLayout  # noqa: E402
from kv_store.segment import segment_seq  # noqa: E402
from kv_store.store import BlockStore, StoreConfig  # noqa: E402
from pdserve import cli_help  # noqa: E402

TARGET = 0.7  # promotion / raw sequential read
SMOLLM2 = KVLayout("smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", block_size=16)
GB = 1e9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="GiB of KV blocks demoted to disk (default 1)")
    p.add_argument("--dram-blocks", type=int, default=64, help="DRAM arena slots (default 64)")
    p.add_argument("--batch", type=int, default=16, help="blocks per lease when promoting (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="cold passes of each kind (default 2)")
    p.add_argument("--dir", default=None, help="where the segments go (default: a temporary directory)")
    p.add_argument("--skip-trace", action="store_true", help="part 1 only")
    p.add_argument("--trace-only", action="store_true", help="part 2 only (needs --disk-gb-s)")
    p.add_argument("--model", default="llama-3-8b", help="model of the TTFT model (default llama-3-8b)")
    p.add_argument(
        "--dram-gb-s", type=float, default=25.0, help="DRAM pool -> GPU GB/s (default 25, assumed)"
    )
    p.add_argument("--disk-gb-s", type=float, default=None, help="disk GB/s (default: measured in part 1)")
    p.add_argument(
        "--disk-factor", type=float, default=4.0, help="bounded disk tier = this x DRAM (default 4)"
    )
    p.add_argument("--sim-requests", type=int, default=1500, help="part 3: trace requests (default 1500)")
    p.add_argument("--sim-rate", type=float, default=4.0, help="part 3: arrival rate, req/s (default 4)")
    return cli_help.apply(p)


# ---------------------------------------------------------------------------- part 1
def drop_cache(files: list[Path]) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[Path]) -> tuple[int, float]:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while True:
                got = os.readv(fd, [view])
                if got <= 0:
                    break
                n += got
        finally:
            os.close(fd)
    return n, time.perf_counter() - t0


def promote_all(store: BlockStore, hashes: list[bytes], batch: int) -> tuple[int, float]:
    before = store.stats().promotions
    t0 = time.perf_counter()
    for i in range(0, len(hashes), batch):
        grant = store.lease(hashes[i : i + batch], ttl_s=60)
        store.release(grant.lease_id)
    dt = time.perf_counter() - t0
    n = store.stats().promotions - before
    if n != len(hashes):
        raise SystemExit(f"promoted {n} of {len(hashes)} blocks: the disk tier lost some (see the log)")
    return n * store.layout.block_nbytes, dt


def part1(args: argparse.Namespace, root: Path) -> float:
    layout = SMOLLM2
    nb = layout.block_nbytes
    n = max(args.dram_blocks + 2 * args.batch, int(args.gib * (1 << 30) // nb))
    capacity = int(2 * n * nb + (64 << 20))
    cfg = StoreConfig(
        "bench",
        layout,
        args.dram_blocks,
        use_shm=False,
        disk_tier=DiskTierConfig(
            # 256 MiB segments, smaller for a small --gib (the tier refuses a segment over half its budget)
            str(root),
            capacity,
            segment_bytes=min(256 << 20, capacity // 2),
            max_pending_blocks=256,
        ),
    )
    store = BlockStore(cfg, InMemoryIndex())
    try:
        hashes = chain_hashes(list(range(n * layout.block_size)), layout.block_size, layout.model_id)
        block = bytearray(os.urandom(nb))
        assert store.disk is not None
        t0 = time.perf_counter()
        for i, h in enumerate(hashes):
            block[:8] = i.to_bytes(8, "little")  # distinct bytes per block
            store.put_block(h, block)
            if store.disk.stats().num_pending >= 192:
                store.disk.flush(60)
        store.disk.flush(600)
        t_write = time.perf_counter() - t0
        st = store.stats().disk
        assert st is not None
        demoted = [h for h in hashes if store.node.slot_of(h) is None]
        if st.demotions_dropped or len(demoted) != st.demotions:
            raise SystemExit(f"demotion dropped blocks: {st}")
        files = sorted((p for p in root.iterdir() if segment_seq(p.name) is not None), key=lambda p: p.name)
        total = sum(p.stat().st_size for p in files)
        print(
            f"part 1: {len(demoted)} blocks of {nb} B ({len(demoted) * nb / GB:.2f} GB) demoted into "
            f"{len(files)} segment files ({total / GB:.2f} GB) in {t_write:.2f} s "
            f"({len(demoted) * nb / GB / t_write:.2f} GB/s put+demote); DRAM arena {args.dram_blocks} blocks"
        )
        cold_raw, cold_pro, warm_raw, warm_pro = [], [], [], []
        for r in range(args.repeats):
            order = ("raw", "promote") if r % 2 == 0 else ("promote", "raw")
            for kind in order:
                drop_cache(files)
                if kind == "raw":
                    b, dt = raw_read(files)
                    cold_raw.append(b / dt / GB)
                else:
                    b, dt = promote_all(store, demoted, args.batch)
                    cold_pro.append(b / dt / GB)
        for _ in range(args.repeats):  # warm: read once to fill the cache, then measure
            raw_read(files)
            b, dt = raw_read(files)
            warm_raw.append(b / dt / GB)
            b, dt = promote_all(store, demoted, args.batch)
            warm_pro.append(b / dt / GB)
        med = statistics.median
        cr, cp, wr, wp = med(cold_raw), med(cold_pro), med(warm_raw), med(warm_pro)
        dropped = cr < 0.8 * wr
        print(
            f"  raw sequential read   cold {cr:6.2f} GB/s  warm {wr:6.2f} GB/s   (runs cold {fmt(cold_raw)}, warm {fmt(warm_raw)})"
        )
        print(
            f"  promotion (lease)     cold {cp:6.2f} GB/s  warm {wp:6.2f} GB/s   (runs cold {fmt(cold_pro)}, warm {fmt(warm_pro)})"
        )
        print(
            "  page cache drop: "
            + (
                "effective (cold raw reads are slower than warm ones)"
                if dropped
                else "NOT effective here (cold ~ warm): both 'cold' figures are page-cache reads"
            )
        )
        ratio_c, ratio_w = cp / cr, wp / wr
        verdict = "PASS" if ratio_c >= TARGET else "FAIL"
        print(
            f"  promotion / raw: cold {ratio_c:.2f}x, warm {ratio_w:.2f}x   target >= {TARGET}x (cold): {verdict}"
        )
        s = store.stats()
        assert s.disk is not None
        print(
            f"  node: promotions {s.promotions}, checksum failures {s.disk.checksum_failures}, "
            f"measured read bandwidth (Stats) {s.disk.read_bytes_per_s / GB:.2f} GB/s"
        )
        return cp
    finally:
        store.close()


def fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


# ---------------------------------------------------------------------------- part 2
def part2(args: argparse.Namespace, disk_gb_s: float) -> None:
    from simulator.cache_study import tiered_prefix_hit_ratio
    from simulator.latency import LatencySpec, make_latency_model
    from simulator.models import model_spec
    from simulator.workload import load_mooncake

    w = load_mooncake()
    working = len({h for r in w.requests for h in r.hash_ids})
    m = model_spec(args.model)
    lat = make_latency_model(LatencySpec(args.model, "a100"))
    kv = m.kv_bytes_per_token
    dram_bw, disk_bw = args.dram_gb_s * GB, disk_gb_s * GB
    chunk = 8192
    memo: dict[tuple[int, int], float] = {}

    def prefill(new: int, ctx: int) -> float:
        """Chunked prefill of ``new`` tokens after ``ctx`` cached ones (one request alone)."""
        key = (new, ctx)
        if key not in memo:
            t, done = 0.0, 0
            while done < new:
                n = min(chunk, new - done)
                t += lat.step_time([n], [ctx + done], 0, 0)
                done += n
            memo[key] = t
        return memo[key]

    def ttft(per, disk: bool) -> float:
        total = 0.0
        for length, d, k, run in per:
            best = prefill(length, 0)
            r = min(run, length - 1)
            best = min(best, prefill(length - r, r) + r * kv / dram_bw)
            if disk and k:
                c = min(d + k, length - 1)
                kd = max(0, c - d)
                best = min(best, prefill(length - c, c) + (c - kd) * kv / dram_bw + kd * kv / disk_bw)
            total += best
        return total / len(per)

    print(
        f"\npart 2: Mooncake conversation trace, {len(w.requests)} requests, working set {working} "
        f"blocks of 512 tokens; TTFT model: {args.model} on A100 (Vidur), KV {kv / 1024:.0f} KiB/token, "
        f"DRAM {args.dram_gb_s:g} GB/s (assumed), disk {disk_gb_s:.2f} GB/s"
    )
    print(
        f"{'DRAM':>6} {'blocks':>7} {'disk':>9} | {'hit no-disk':>11} {'hit +disk':>9} {'(of it disk)':>12} | "
        f"{'TTFT no-disk':>12} {'TTFT +disk':>10} {'ratio':>6}"
    )
    for frac in (0.02, 0.05, 0.10, 0.25):
        dram = max(1, int(frac * working))
        base = tiered_prefix_hit_ratio(w, dram, 0)
        t0 = ttft(base.per_request, disk=False)
        for disk_blocks in (None, int(args.disk_factor * dram)):
            tr = tiered_prefix_hit_ratio(w, dram, disk_blocks)
            t1 = ttft(tr.per_request, disk=True)
            label = "unlimited" if disk_blocks is None else f"{disk_blocks}"
            print(
                f"{frac:6.0%} {dram:7d} {label:>9} | {base.ratio:11.1%} {tr.ratio:9.1%} "
                f"{tr.disk_tokens / tr.input_tokens:12.1%} | {t0:11.3f}s {t1:9.3f}s {t1 / t0:6.2f}"
            )


# ---------------------------------------------------------------------------- part 3
def part3(args: argparse.Namespace, disk_gb_s: float) -> None:
    import statistics as st

    from router.policy import InstanceRole, PolicyKind
    from simulator.config import CacheConfig, ClusterConfig, HostPool, InstanceGroup, SimConfig
    from simulator.latency import LatencySpec
    from simulator.sim import Simulation
    from simulator.workload import load_mooncake

    w = load_mooncake(limit=args.sim_requests).with_rate(args.sim_rate)
    working = len({h for r in w.requests for h in r.hash_ids})
    groups = (InstanceGroup(InstanceRole.PREFILL, 8, 1), InstanceGroup(InstanceRole.DECODE, 0, 1))
    print(
        f"\npart 3: simulator, Mooncake trace head ({len(w)} requests at {args.sim_rate:g} req/s, working set "
        f"{working} blocks), 8 x {args.model} prefill instances (A100, Vidur), local cache-aware routing, "
        "per-instance DRAM host pool (LIMITED) + GPU prefix cache; disk tier unlimited; a disk hit is used "
        "only when its read beats recomputing"
    )
    print(f"{'pool/inst':>9} {'disk GB/s':>9} | {'hit':>6} {'disk blocks':>11} | {'mean TTFT':>9} {'p90':>7}")
    for pool_blocks in (1000, 3000):
        for disk in (None, disk_gb_s, 3.0):
            cache = CacheConfig(
                host_pool=HostPool.LIMITED,
                host_pool_tokens=pool_blocks * 512,
                disk_pool_tokens=0 if disk is None else -1,
                disk_gb_s=disk or 1.0,
            )
            c = ClusterConfig(
                LatencySpec(args.model, "a100"), groups, policy=PolicyKind.LOCAL_CACHE_AWARE, cache=cache
            )
            r = Simulation(c, SimConfig()).run(w)
            done = [x for x in r.records if x.finished]
            tt = [x.ttft for x in done]
            hit = sum(x.cached_tokens for x in done) / sum(x.input_len for x in done)
            dblocks = sum(int(s["disk_blocks"]) for s in r.instance_stats.values())
            label = "none" if disk is None else f"{disk:.2f}"
            print(
                f"{pool_blocks:9d} {label:>9} | {hit:6.1%} {dblocks:11d} | {st.mean(tt):8.3f}s "
                f"{st.quantiles(tt, n=10)[-1]:6.3f}s   ({len(done)} served, {len(w) - len(done)} refused: prompt > context)"
            )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.gib <= 0 or args.dram_blocks < 1 or args.batch < 1 or args.repeats < 1:
        raise SystemExit("--gib must be > 0; --dram-blocks, --batch, --repeats >= 1")
    if args.batch > args.dram_blocks // 2:
        raise SystemExit(f"--batch {args.batch} must be at most half of --dram-blocks {args.dram_blocks}")
    disk_gb_s = args.disk_gb_s
    if not args.trace_only:
        if args.dir:
            root = Path(args.dir)
            root.mkdir(parents=True, exist_ok=True)
            if any(root.iterdir()):
                raise SystemExit(f"--dir {root} is not empty")
            measured = part1(args, root)
        else:
            with tempfile.TemporaryDirectory(prefix="pdkv-bench-", dir=os.environ.get("TMPDIR", "/tmp")) as d:
                measured = part1(args, Path(d))
        disk_gb_s = disk_gb_s if disk_gb_s is not None else measured
    if not args.skip_trace:
        if disk_gb_s is None:
            raise SystemExit("--trace-only needs --disk-gb-s")
        part2(args, disk_gb_s)
        part3(args, disk_gb_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
