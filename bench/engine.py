"""Engine benchmark: per-step decode overhead and mixed-workload throughput vs HF transformers.

Both sides are measured in this run on this machine and printed as ratios:

1. Decode step time at batch 1/8/32 and a fixed context: pdserve engine ``step()`` (paged KV,
   scheduler, sampler, detokenizer included) vs a raw HF forward with ``DynamicCache`` at the same
   batch and context (model call only). Target: ratio <= 1.15.
2. Throughput on 64 requests whose input/output lengths are sampled from the Azure 2023 code
   trace, scaled down 8x: engine (continuous batching, chunked prefill) vs HF ``generate`` in
   static batches of the same size. Target: ratio >= 3.

Usage: python bench/engine.py [--model PATH] [--context 256] [--steps 16] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402

DATA = Path(os.environ.get("PDSERVE_DATA", ROOT / ".." / "shared" / "data"))


def _median_time(fn, n: int) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def decode_step_overhead(path: Path, batch: int, context: int, steps: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, DynamicCache

    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(10, 40000, (context,), generator=g).tolist() for _ in range(batch)]
    # engine: prefill everything, then time decode-only steps
    eng = LLMEngine.from_pretrained(
        path,
        EngineConfig(
            num_kv_blocks=batch * (context + 4 * steps) // 16 + 64,
            max_num_seqs=batch,
            max_num_batched_tokens=max(2048, context),
            long_prefill_token_threshold=0,
        ),
    )
    sp = SamplingParams(max_tokens=4 * steps + 8, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, sp)
    while any(r.num_output_tokens == 0 for r in eng.scheduler.running + eng.scheduler.waiting):
        eng.step()
    for _ in range(3):
        eng.step()
    t_eng = _median_time(eng.step, steps)

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        cache = DynamicCache(config=hf.config)
        out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        pos = [context]

        def hf_step() -> None:
            o = hf(
                input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([pos[0]])
            )
            pos[0] += 1
            o.logits[:, -1:].argmax(-1)

        for _ in range(3):
            hf_step()
        t_hf = _median_time(hf_step, steps)
    return t_eng, t_hf


def azure_workload(n: int, scale: int, seed: int = 0) -> list[tuple[int, int]]:
    with open(DATA / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    pick = rng.sample(rows, n)
    return [
        (max(1, int(r["ContextTokens"]) // scale), max(1, int(r["GeneratedTokens"]) // scale)) for r in pick
    ]


def throughput(path: Path, n: int, batch: int, scale: int) -> tuple[float, float, int]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    work = azure_workload(n, scale)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 40000, (i,), generator=g).tolist() for i, _ in work]
    total_out = sum(o for _, o in work)

    eng = LLMEngine.from_pretrained(
        path,
        EngineConfig(
            num_kv_blocks=4096,
            max_num_seqs=batch,
            max_num_batched_tokens=1024,
            long_prefill_token_threshold=512,
        ),
    )
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in work]
    t = time.perf_counter()
    eng.generate(prompts, params, use_tqdm=True)
    t_eng = time.perf_counter() - t

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for b in tqdm(range(0, n, batch), desc="hf generate", unit="batch"):
            chunk = prompts[b : b + batch]
            outs = [o for _, o in work[b : b + batch]]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max(outs),
                min_new_tokens=max(outs),
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
    t_hf = time.perf_counter() - t
    return total_out / t_eng, total_out / t_hf, total_out


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--context", type=int, default=256, help="context length of the decode-step test, tokens")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes of the decode-step test")
    ap.add_argument("--requests", type=int, default=64, help="requests of the throughput test")
    ap.add_argument(
        "--static-batch", type=int, default=16, help="HF generate's static batch size in the throughput test"
    )
    ap.add_argument("--quick", action="store_true", help="smaller run for a smoke test")
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    if a.quick:
        a.steps, a.batches, a.requests, a.context = 4, "1,8", 16, 64
    path = resolve_model_path(a.model)
    print(f"model {path.name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\n1) decode step, context {a.context} (target engine/HF <= 1.15)")
    print(f"{'batch':>6} {'engine ms':>10} {'HF ms':>10} {'ratio':>7}  verdict")
    ok = True
    for b in (int(x) for x in a.batches.split(",")):
        te, th = decode_step_overhead(path, b, a.context, a.steps)
        r = te / th
        ok &= r <= 1.15
        print(f"{b:>6} {te * 1e3:>10.2f} {th * 1e3:>10.2f} {r:>7.3f}  {'PASS' if r <= 1.15 else 'FAIL'}")
    print(
        f"\n2) throughput, {a.requests} Azure-code requests scaled /8, batch {a.static_batch} (target engine/HF >= 3)"
    )
    te, th, n = throughput(path, a.requests, a.static_batch, 8)
    r = te / th
    ok &= r >= 3
    print(
        f"output tokens {n}: engine {te:.1f} tok/s, HF static batches {th:.1f} tok/s, ratio {r:.2f}  "
        f"{'PASS' if r >= 3 else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
