"""KV transfer share of TTFT for a 2k-token prompt on the embedded disaggregated cluster.

Sends ``--reps`` uncached prompts of ``--tokens`` random token ids through the router (1 prefill + 1
decode worker + store on 127.0.0.1) and reads the phase timings the router returns in the final
message: ``transfer`` is the prefill worker publishing the prompt's KV blocks to the store (inside
TTFT: the first token is released once its blocks are published). Prints the median share
transfer / TTFT next to Mooncake's published 4.2% (GPU, RDMA). The decode worker's pull happens after
the first token and is not part of TTFT.

Usage: python bench/kv_ttft_share.py [--tokens 2048] [--reps 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.client import Client  # noqa: E402
from pdserve.launcher import ClusterSpec, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    path = resolve_model_path(a.model)
    rng = random.Random(0)
    cl = launch(ClusterSpec(model_path=str(path)))
    rows = []
    try:
        with Client(cl.router_address, timeout=300) as c:
            for i in range(a.reps + 1):  # the first request warms up
                prompt = [rng.randrange(100, 40000) for _ in range(a.tokens)]
                done = c.complete(prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
                f = done.finish
                if i and f.cached_prompt_tokens == 0:
                    rows.append((f.ttft_s, f.phases["prefill"], f.phases["transfer"]))
    finally:
        cl.stop()
    print(f"{'TTFT s':>8} {'prefill s':>10} {'transfer s':>11} {'share':>7}")
    for t, p, x in rows:
        print(f"{t:>8.3f} {p:>10.3f} {x:>11.4f} {x / t:>7.2%}")
    share = statistics.median(x / t for t, _, x in rows)
    print(
        f"median KV transfer share of TTFT for a {a.tokens}-token prompt: {share:.2%} (Mooncake, GPU: 4.2%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
