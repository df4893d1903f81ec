"""KV handoff cost for a 2k-token prompt on the embedded disaggregated cluster, store vs direct.

For each KV transport (``--transports``, default both) launches the embedded cluster (1 prefill +
1 decode worker + store on 127.0.0.1) and sends ``--reps`` uncached prompts of ``--tokens`` random
token ids through the router (one warm-up first). From the phase timings the router returns:

* ``publish``: the prefill worker handing the KV off (``transfer - kv_pull``), inside TTFT (the
  first token is released once the KV is published). Store: a leased Put to the store node;
  direct (``dist``, gloo): keeping the blocks in the outbox.
* ``pull``: the decode worker fetching it (``kv_pull``), after the first token. Store: shared
  memory from the arena; direct: a gloo point-to-point push from the prefill worker.
* ``handoff``: publish + pull.

Prints per request and the medians, the share publish / TTFT next to Mooncake's published 4.2%
(GPU, RDMA), and the ratio of the direct handoff to the store handoff measured in the same run
(< 1: the direct path is faster).

Usage: python bench/kv_ttft_share.py [--tokens 2048] [--reps 5] [--transports store,dist]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import Client  # noqa: E402
from pdserve.kv_transfer import KVTransport  # noqa: E402
from pdserve.launcher import ClusterSpec, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402


@dataclass(frozen=True)
class Row:
    ttft_s: float
    prefill_s: float
    publish_s: float
    pull_s: float

    @property
    def handoff_s(self) -> float:
        return self.publish_s + self.pull_s


def measure(path: Path, transport: KVTransport, tokens: int, reps: int) -> list[Row]:
    rng = random.Random(0)  # the same prompts for every transport
    cl = launch(ClusterSpec(model_path=str(path), kv_transport=transport))
    rows = []
    try:
        with Client(cl.router_address, timeout=300) as c:
            for i in range(reps + 1):  # the first request warms up
                prompt = [rng.randrange(100, 40000) for _ in range(tokens)]
                done = c.complete(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
                f = done.finish
                if i and f.cached_prompt_tokens == 0:
                    pull = f.kv_pull_s
                    rows.append(Row(f.ttft_s, f.phases["prefill"], f.phases["transfer"] - pull, pull))
    finally:
        cl.stop()
    return rows


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=2048, help="uncached prompt length, tokens")
    ap.add_argument("--reps", type=int, default=5, help="requests measured per transport")
    ap.add_argument("--transports", default="store,dist", help="comma-separated: store, dist")
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    try:
        transports = [KVTransport(t.strip()) for t in a.transports.split(",") if t.strip()]
    except ValueError as e:
        ap.error(f"{e}; transports are {[t.value for t in KVTransport]}")
    path = resolve_model_path(a.model)
    medians: dict[KVTransport, float] = {}
    for t in transports:
        rows = measure(path, t, a.tokens, a.reps)
        if not rows:
            print(f"{t.value}: no uncached request measured", file=sys.stderr)
            return 1
        print(f"\n[{t.value}] {a.tokens}-token uncached prompts")
        print(
            f"{'TTFT s':>8} {'prefill s':>10} {'publish s':>10} {'pull s':>8} {'handoff s':>10} {'share':>7}"
        )
        for r in rows:
            print(
                f"{r.ttft_s:>8.3f} {r.prefill_s:>10.3f} {r.publish_s:>10.4f} {r.pull_s:>8.4f} "
                f"{r.handoff_s:>10.4f} {r.publish_s / r.ttft_s:>7.2%}"
            )
        share = statistics.median(r.publish_s / r.ttft_s for r in rows)
        medians[t] = statistics.median(r.handoff_s for r in rows)
        print(
            f"median: KV publish {share:.2%} of TTFT (Mooncake, GPU: 4.2%); "
            f"whole handoff {medians[t] * 1000:.1f} ms (publish + pull)"
        )
    if KVTransport.STORE in medians and KVTransport.DIST in medians:
        ratio = medians[KVTransport.DIST] / medians[KVTransport.STORE]
        print(f"\nratio direct (gloo) / store (shm) handoff, same run: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
