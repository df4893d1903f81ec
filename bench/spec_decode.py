"""Speculative decoding benchmark (#17): tokens/s with and without prompt-lookup drafts.

SmolLM2-135M (fp32, CPU), greedy, two workloads in one run:

* repetitive: code continuation and extraction prompts (the output copies spans of the prompt or
  of itself; prompt lookup's case);
* non-repetitive: open-ended prose prompts (few n-gram matches).

For each workload and batch size, an engine without speculation and one with
``SpeculativeConfig(num_speculative_tokens=k)`` generate the same requests, alternately, ``--reps``
times; the medians of generated tokens / wall time (prefill included) are compared. Also printed:
the acceptance rate (kept drafts / drafted tokens), the drafted tokens, the engine steps
(plain/spec), and whether the two engines' tokens were identical (they must be).

``--weight-dtypes float32,int8`` repeats it with weight-only int8 (``EngineConfig.weight_dtype``),
whose native kernel reads each weight once for up to 16 rows: a verification step of k + 1 rows
then costs about one decode step, where fp32 small-row GEMMs cost several (measured on this CPU).

Usage: python bench/spec_decode.py [--k 4] [--max-tokens 64] [--batches 1,4] [--reps 3]
       [--weight-dtypes float32,int8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.spec_decode import SpeculativeConfig  # noqa: E402

REPETITIVE = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
    "    return a * b\n\ndef div(a, b):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "class Point3:\n    def __init__(self, x, y, z):\n",
    "Customers: Alice Smith (alice@example.com), Bob Jones (bob@example.com), Carol White "
    "(carol@example.com), Dan Brown (dan@example.com).\nList every customer's email address, one per line:\n",
    '{"name": "alpha", "id": 1, "tags": ["a", "b"]}\n{"name": "beta", "id": 2, "tags": ["b", "c"]}\n'
    '{"name": "gamma", "id": 3, "tags": [',
]
NON_REPETITIVE = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are three good habits for staying healthy? Describe each briefly.",
    "Describe a walk through a busy market in a city you imagine.",
]


def run_once(
    eng: LLMEngine, prompts: list[str], params: SamplingParams, batch: int
) -> tuple[float, int, list]:
    """Generate every prompt, ``batch`` at a time; (seconds, generated tokens, token ids)."""
    toks: list = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        toks.extend(o.token_ids for o in eng.generate(prompts[i : i + batch], params))
    return time.perf_counter() - t0, sum(len(t) for t in toks), toks


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M)")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (num_speculative_tokens)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per configuration (median)")
    ap.add_argument("--weight-dtypes", default="float32", help="comma-separated: float32, int8")
    return cli_help.apply(ap)


def main() -> None:
    args = build_parser().parse_args()
    if args.model is None:
        from pdserve.model_setup import ensure_default_model

        args.model = ensure_default_model(progress=False)
    print(f"SmolLM2 CPU, greedy, max_tokens={args.max_tokens}, k={args.k}, reps={args.reps} (median)")
    print(
        f"{'weights':<7} {'workload':<15} {'batch':>5} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} "
        f"{'accept':>6} {'drafted':>8} {'steps p/s':>10} {'identical':>9}"
    )
    for wd in args.weight_dtypes.split(","):
        bench_dtype(args, wd)


def bench_dtype(args: argparse.Namespace, wd: str) -> None:
    cfg = dict(num_kv_blocks=512, block_size=16, max_num_batched_tokens=1024, weight_dtype=wd)
    plain = LLMEngine.from_pretrained(args.model, EngineConfig(**cfg))
    spec = LLMEngine.from_pretrained(
        args.model, EngineConfig(**cfg, speculative=SpeculativeConfig(num_speculative_tokens=args.k))
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    run_once(plain, REPETITIVE[:1], SamplingParams(max_tokens=4), 1)  # warm-up (kernel build, caches)
    run_once(spec, REPETITIVE[:1], SamplingParams(max_tokens=4), 1)
    for name, prompts in (("repetitive", REPETITIVE), ("non-repetitive", NON_REPETITIVE)):
        for batch in (int(b) for b in args.batches.split(",")):
            tp, ts = [], []
            same = True
            d0, a0 = spec.spec_draft_tokens, spec.spec_accepted_tokens
            s0p, s0s = plain.num_steps, spec.num_steps
            for _ in range(args.reps):
                sec, n, ref = run_once(plain, prompts, params, batch)
                tp.append(n / sec)
                sec, n, got = run_once(spec, prompts, params, batch)
                ts.append(n / sec)
                same &= got == ref
            drafted, accepted = spec.spec_draft_tokens - d0, spec.spec_accepted_tokens - a0
            steps_p, steps_s = plain.num_steps - s0p, spec.num_steps - s0s
            mp, ms = statistics.median(tp), statistics.median(ts)
            rate = accepted / drafted if drafted else 0.0
            print(
                f"{wd:<7} {name:<15} {batch:>5} {mp:>11.1f} {ms:>10.1f} {ms / mp:>6.2f}x {rate:>6.1%} {drafted:>8} "
                f"{steps_p:>4}/{steps_s:<5} {'yes' if same else 'NO':>9}",
                flush=True,
            )
    plain.close()
    spec.close()


if __name__ == "__main__":
    main()
