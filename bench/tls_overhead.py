"""What TLS costs pdserve: the embedded cluster and KV transfer, with and without it, in one run.

1. Serving (target: TLS + auth / plaintext <= 1.05x). Two embedded clusters run side by side on
   127.0.0.1 with the real SmolLM2-135M model: one plaintext (the development mode), one with
   TLS on every port, mutual TLS between the processes, the cluster token and an API key on
   every request (``ClusterSpec.tls``, a dev CA made by the launcher; ``--api-keys``). Requests
   go in back-to-back pairs, one to each cluster, the order alternating (ABBA: load from anything
   else on the machine hits both alike); each is one greedy generation of ``--max-tokens``
   tokens with ignore_eos. Measured: TTFT (first chunk at the client) and relayed tokens/s
   (tokens after the first / time after the first chunk). Ratios are TLS over plaintext for TTFT
   and plaintext over TLS for tokens/s (> 1: TLS is slower). The figure of merit is the median of
   the per-pair ratios with a 95% bootstrap interval; the verdict is PASS only when the whole
   interval is within the target, FAIL when all of it is above, else INCONCLUSIVE (the run's
   noise is wider than the 5% margin: more ``--pairs`` or a quieter machine). Also printed: the
   ratio of the two medians, the 1-minute load average at start and end, and the CPU seconds
   per request of every process of each cluster (user + system from /proc, which machine load
   hardly moves: the cost TLS adds, whatever the wall clock does).
2. KV transfer (reported, no target): a store node process per mode (plaintext; TLS + mTLS +
   token), blocks of the SmolLM2-135M layout; ``KVStoreClient.put_blocks`` and
   ``get_blocks_into`` over the gRPC stream (no shared memory), GB/s = 1e9 bytes / s, median of
   interleaved repetitions.

Usage: python bench/tls_overhead.py [--quick] [--pairs N] [--max-tokens N] [--kv-mib M ...] [--no-kv]
Prints a table and one JSON line of the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.block_hash import chain_hashes  # noqa: E402
from kv_store.client import KVStoreClient  # noqa: E402
from kv_store.layout import KVLayout  # noqa: E402
from pdserve.auth.keys import FileKeyStore, issue_key  # noqa: E402
from pdserve.certs import write_dev_pki  # noqa: E402
from pdserve.client import Client  # noqa: E402
from pdserve.launcher import ClusterSpec, LocalCluster, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402
from pdserve.security import SecurityConfig, TLSMode, internal_channel  # noqa: E402

MiB = 1 << 20
TARGET = 1.05
PROMPT = (
    "Summarise the main trade-offs between disaggregated prefill and decode serving and "
    "colocated serving of large language models, in three short points."
)
# SmolLM2-135M's KV layout (30 layers, 3 KV heads, head dim 64), float32 as the CPU workers store it
LAYOUT = KVLayout("bench-tls", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", block_size=16)


# ---------------------------------------------------------------------------- serving
def _one(client: Client, max_tokens: int) -> tuple[float, float]:
    """(TTFT s, relayed tokens/s after the first chunk) of one streamed generation."""
    t0 = time.perf_counter()
    first = last = 0.0
    n_first = n = 0
    for ch in client.generate(PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        now = time.perf_counter()
        if not first and ch.token_ids:
            first, n_first = now, len(ch.token_ids)
        n += len(ch.token_ids)
        last = now
    if n != max_tokens or not first:
        raise RuntimeError(f"expected {max_tokens} tokens, got {n}")
    return first - t0, (n - n_first) / (last - first)


def _cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds the processes ``pids`` have used (Linux /proc; None elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def median_ci(values: list[float], rng: random.Random, resamples: int = 2000) -> tuple[float, float, float]:
    """(median, low, high): the median of ``values`` and a 95% bootstrap interval of it
    (percentile method, ``resamples`` resamples with replacement)."""
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def verdict(low: float, high: float, target: float = TARGET) -> str:
    """PASS when the whole interval is within the target, FAIL when all of it is above, else
    INCONCLUSIVE (the run's noise is wider than the margin: more pairs or a quieter machine)."""
    if high <= target:
        return "PASS"
    if low > target:
        return "FAIL"
    return "INCONCLUSIVE"


def bench_serving(model: Path, pairs: int, max_tokens: int, seed: int = 0) -> dict:
    """Two clusters side by side (plaintext; TLS + mTLS + cluster token + API keys), ``pairs``
    back-to-back request pairs in alternating order (ABBA...), per-pair ratios."""
    # a long heartbeat timeout: on a loaded shared machine a late heartbeat must not unregister a
    # worker mid-run (that would measure the machine, not TLS)
    spec = {
        "model_path": str(model),
        "worker_kv_blocks": 512,
        "store_capacity_blocks": 1024,
    }
    clusters: dict[str, LocalCluster] = {}
    load = {"start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-keys-") as d:
        keys = Path(d) / "keys.yaml"
        api_key = issue_key(FileKeyStore(str(keys), create=True), "bench")[0]
        try:
            clusters["plaintext"] = launch(ClusterSpec(**spec, router_args=("--heartbeat-timeout-s", "30")))
            clusters["tls"] = launch(
                ClusterSpec(
                    **spec,
                    tls=True,
                    router_args=("--heartbeat-timeout-s", "30", "--api-keys", str(keys)),
                )
            )
            tls_cl = clusters["tls"]
            assert tls_cl.pki is not None
            clients = {
                "plaintext": Client(clusters["plaintext"].router_address, timeout=300),
                "tls": Client(tls_cl.router_address, timeout=300, ca=str(tls_cl.pki.ca), api_key=api_key),
            }
            for _ in range(3):  # warm-up: first requests pay one-time costs (not timed)
                for c in clients.values():
                    _one(c, max_tokens)
            pids = {k: [p.pid for p in cl.procs.values()] for k, cl in clusters.items()}
            cpu0 = {k: _cpu_s(v) for k, v in pids.items()}
            got: dict[str, list[tuple[float, float]]] = {k: [] for k in clients}
            for i in range(pairs):  # ABBA: each cluster goes first in half the pairs
                order = ("plaintext", "tls") if i % 2 == 0 else ("tls", "plaintext")
                for k in order:
                    got[k].append(_one(clients[k], max_tokens))
            cpu1 = {k: _cpu_s(v) for k, v in pids.items()}
            for c in clients.values():
                c.close()
        finally:
            for cl in clusters.values():
                cl.stop()
    load["end"] = os.getloadavg()
    out: dict = {
        k: {
            "ttft_ms": statistics.median(t for t, _ in v) * 1000,
            "tokens_per_s": statistics.median(r for _, r in v),
        }
        for k, v in got.items()
    }
    out["ttft_ratio"] = out["tls"]["ttft_ms"] / out["plaintext"]["ttft_ms"]
    out["tokens_per_s_ratio"] = out["plaintext"]["tokens_per_s"] / out["tls"]["tokens_per_s"]
    # per back-to-back pair, then the median and its bootstrap interval: load that drifts during
    # the run (other processes on the machine) cancels within a pair
    rng = random.Random(seed)
    both = list(zip(got["plaintext"], got["tls"], strict=True))
    for key, ratios in (
        ("ttft", [t / p for (p, _), (t, _) in both]),
        ("tokens_per_s", [p / t for (_, p), (_, t) in both]),
    ):
        med, lo, hi = median_ci(ratios, rng)
        out[f"{key}_ratio_paired"] = med
        out[f"{key}_ratio_ci95"] = [lo, hi]
        out[f"{key}_verdict"] = verdict(lo, hi)
    if all(v is not None for v in (*cpu0.values(), *cpu1.values())):
        cpu = {k: (cpu1[k] - cpu0[k]) / pairs for k in clients}  # type: ignore[operator]
        out["cpu_s_per_request"] = cpu
        out["cpu_ratio"] = cpu["tls"] / cpu["plaintext"]
    out["pairs"], out["max_tokens"], out["loadavg"] = pairs, max_tokens, load
    out["cpus"] = os.cpu_count()
    return out


# ---------------------------------------------------------------------------- KV transfer
def _spawn_store(max_blocks: int, security_args: list[str]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "kv_store", "--node-id", "bench-tls", "--capacity-blocks", str(max_blocks)]
    args += ["--model-id", LAYOUT.model_id, "--num-layers", str(LAYOUT.num_layers)]
    args += ["--num-kv-heads", str(LAYOUT.num_kv_heads), "--head-dim", str(LAYOUT.head_dim)]
    args += ["--dtype", LAYOUT.dtype, "--block-size", str(LAYOUT.block_size), "--max-workers", "4"]
    args += ["--no-shm", *security_args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.wait(10)
        raise RuntimeError(f"store exited {p.returncode} before serving")
    return p, json.loads(line)["address"]


def bench_kv(sizes_mib: list[int], reps: int) -> dict:
    nb = LAYOUT.block_nbytes
    max_blocks = max(-(-s * MiB // nb) for s in sizes_mib)
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-pki-") as d:
        pki = write_dev_pki(d)
        server_tls = SecurityConfig(
            tls=TLSMode.ON,
            ca_file=str(pki.ca),
            cert_file=str(pki.server_cert),
            key_file=str(pki.server_key),
            cluster_token_file=str(pki.cluster_token),
        )
        modes = {
            "plaintext": (SecurityConfig(tls=TLSMode.OFF), ["--tls", "off"]),  # asked for explicitly
            "tls": (server_tls, server_tls.to_args()),
        }
        procs, clients = [], {}
        try:
            for name, (cfg, args) in modes.items():
                p, addr = _spawn_store(max_blocks, args)
                procs.append(p)
                clients[name] = KVStoreClient(addr, timeout_s=300, channel=internal_channel(addr, cfg))
            hashes = chain_hashes(
                list(range(max_blocks * LAYOUT.block_size)), LAYOUT.block_size, LAYOUT.model_id
            )
            block = os.urandom(nb)
            rows = []
            for size in sizes_mib:
                n = -(-size * MiB // nb)
                hs = hashes[:n]
                dst = np.zeros(n * nb, dtype=np.uint8)
                outs = [memoryview(dst)[i * nb : (i + 1) * nb] for i in range(n)]
                times: dict[str, dict[str, list[float]]] = {k: {"put": [], "get": []} for k in clients}
                for r in range(reps):
                    for k in clients if r % 2 == 0 else reversed(list(clients)):
                        c = clients[k]
                        t0 = time.perf_counter()
                        c.put_blocks(LAYOUT, hs, [block] * n)  # idempotent: the same keys each rep
                        t1 = time.perf_counter()
                        c.get_blocks_into(LAYOUT, hs, outs)
                        t2 = time.perf_counter()
                        times[k]["put"].append(t1 - t0)
                        times[k]["get"].append(t2 - t1)
                row: dict = {"mib": round(n * nb / MiB, 1)}
                for k, v in times.items():
                    for op in ("put", "get"):
                        row[f"{k}_{op}_gbps"] = n * nb / statistics.median(v[op]) / 1e9
                for op in ("put", "get"):
                    row[f"{op}_ratio"] = row[f"tls_{op}_gbps"] / row[f"plaintext_{op}_gbps"]
                rows.append(row)
        finally:
            for c in clients.values():
                c.close()
            for p in procs:
                p.terminate()
                p.wait(10)
    return {"reps": reps, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs and smaller KV sizes")
    ap.add_argument(
        "--pairs", "--requests", type=int, default=None, help="timed request pairs (default 40; --quick 12)"
    )
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per generation (default 32)")
    ap.add_argument("--kv-mib", type=int, nargs="*", default=None, help="KV sizes in MiB (default 16 64)")
    ap.add_argument("--kv-reps", type=int, default=5, help="repetitions per KV size (default 5)")
    ap.add_argument("--no-kv", action="store_true", help="serving only (skip the KV transfer part)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    pairs = a.pairs or (12 if a.quick else 40)
    sizes = a.kv_mib or ([8, 32] if a.quick else [16, 64])
    model = resolve_model_path(None)
    serving = bench_serving(model, pairs, a.max_tokens, a.seed)
    kv = None if a.no_kv else bench_kv(sizes, a.kv_reps)

    la = serving["loadavg"]
    print(
        f"serving: {model.name}, {pairs} request pairs x {a.max_tokens} tokens, ABBA order; "
        f"TLS cluster: TLS + mTLS + cluster token + API key. {serving['cpus']} CPUs, load average "
        f"{la['start'][0]:.2f} at start, {la['end'][0]:.2f} at end (1 min)"
    )
    print(f"  {'':<10} {'TTFT ms':>9} {'tok/s':>8}")
    for k in ("plaintext", "tls"):
        print(f"  {k:<10} {serving[k]['ttft_ms']:>9.1f} {serving[k]['tokens_per_s']:>8.1f}")
    for what, key in (("TTFT", "ttft"), ("tokens/s", "tokens_per_s")):
        lo, hi = serving[f"{key}_ratio_ci95"]
        print(
            f"  TLS cost, {what:<9} median of pairs {serving[f'{key}_ratio_paired']:.3f}x "
            f"(95% CI {lo:.3f}-{hi:.3f}; ratio of medians {serving[f'{key}_ratio']:.3f}x)  "
            f"target <= {TARGET}x: {serving[f'{key}_verdict']}"
        )
    if "cpu_ratio" in serving:
        c = serving["cpu_s_per_request"]
        print(
            f"  CPU s per request, every process of the cluster: plaintext {c['plaintext']:.3f}, "
            f"TLS {c['tls']:.3f} ({serving['cpu_ratio']:.3f}x; load-insensitive)"
        )
    if kv is not None:
        print(f"KV transfer over gRPC (store node process, no shm), GB/s, median of {a.kv_reps}")
        print(
            f"  {'MiB':>6} {'put plain':>10} {'put TLS':>9} {'ratio':>6} {'get plain':>10} {'get TLS':>9} {'ratio':>6}"
        )
        for r in kv["rows"]:
            print(
                f"  {r['mib']:>6} {r['plaintext_put_gbps']:>10.3f} {r['tls_put_gbps']:>9.3f} {r['put_ratio']:>6.2f}"
                f" {r['plaintext_get_gbps']:>10.3f} {r['tls_get_gbps']:>9.3f} {r['get_ratio']:>6.2f}"
            )
    print(json.dumps({"serving": serving, "kv": kv}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
