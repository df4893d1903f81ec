"""Parallel sampling (n=4) vs 4 independent requests: KV blocks and throughput (issue #18).

One engine configuration, two workloads, run in this process (interleaved, ``--repeats`` times):

* group: one request with ``n=4`` (seed s): the prompt is prefilled once, the 4 choices share
  its blocks (copy-on-write of the partial block) and decode together;
* independent (the baseline): 4 requests with the same prompt and seeds s, s+1, s+2, s+3
  submitted at once (``n=1`` each), as a client without ``n`` would send them.

Both produce the same 4 token sequences (checked: choice i == independent request i). Reported,
with prefix caching on and off (the baseline with caching on: requests submitted at once are
prefilled in the same step, so they share nothing unless the token budget splits them):
peak KV blocks in use over the run, mean blocks in use over decode steps, and output tokens/s;
each as group / independent. Target: peak KV blocks <= 0.5x independent (PASS/FAIL).

Model: ``--model`` (default: SmolLM2-135M-Instruct converted under ~/.cache/pdserve/models,
fp32 on CPU); ``--model tiny`` builds a random-weight 4-layer Llama in a temp dir.

Usage: python bench/parallel_sampling.py [--prompt-tokens 512] [--n 4] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

TARGET = 0.5  # peak KV blocks: group / independent
DEFAULT_MODEL = Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default=str(DEFAULT_MODEL), help=f"model folder or 'tiny' (default {DEFAULT_MODEL})"
    )
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--n", type=int, default=4, help="choices (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per choice (default 64)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="runs per workload, interleaved (default 2)")
    p.add_argument("--seed", type=int, default=1, help="sampling seed of choice 0 (default 1)")
    p.add_argument("--device", default="cpu", help="engine device (default cpu)")
    return p


def make_tiny(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    return root


def run_once(eng: LLMEngine, prompt: list[int], params: SamplingParams, group: bool) -> dict:
    """Run one workload to completion; blocks sampled after every step."""
    if group:
        eng.add_request("g", prompt, params)
    else:
        for i in range(params.n):
            eng.add_request(f"r{i}", prompt, replace(params, n=1, seed=params.seed + i))
    tokens: dict[int, list[int]] = {}
    peak, decode_used = 0, []
    t0 = time.perf_counter()
    while eng.has_unfinished():
        outs = eng.step()
        used = eng.kv.num_used_blocks
        peak = max(peak, used)
        if outs and all(len(o.token_ids) > 1 for o in outs):
            decode_used.append(used)
        for o in outs:
            if o.finished:
                tokens[o.choice_index if group else int(o.request_id[1:])] = o.token_ids
    secs = time.perf_counter() - t0
    if eng.kv.num_used_blocks != 0:
        raise RuntimeError(f"{eng.kv.num_used_blocks} KV blocks left in use after the run")
    eng.kv.pool.evict_all_cached()  # the next run starts cold
    return {
        "peak": peak,
        "mean_decode": statistics.fmean(decode_used) if decode_used else float("nan"),
        "tok_s": sum(len(t) for t in tokens.values()) / secs,
        "tokens": [tokens[i] for i in range(params.n)],
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny(Path(tmp)) if args.model == "tiny" else Path(args.model)
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, seed=args.seed, ignore_eos=True, n=args.n
        )
        print(
            f"parallel sampling: n={args.n}, prompt {args.prompt_tokens} tokens, {args.max_tokens} tokens per "
            f"choice, block {args.block_size}, model {'tiny (random, 4 layers)' if args.model == 'tiny' else path.name}, device {args.device}, "
            f"{torch.get_num_threads()} threads, {args.repeats} repeats (medians)"
        )
        ok = True
        for caching in (True, False):
            cfg = EngineConfig(
                block_size=args.block_size,
                num_kv_blocks=4096,
                enable_prefix_caching=caching,
                device=args.device,
                max_model_len=args.prompt_tokens + args.max_tokens + 8,
            )
            eng = LLMEngine.from_pretrained(path, cfg)
            vocab = eng.model_config.vocab_size
            g = torch.Generator().manual_seed(123)
            prompt = torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist()
            runs: dict[str, list[dict]] = {"group": [], "independent": []}
            run_once(eng, prompt, replace(params, max_tokens=2), True)  # warm-up
            for _ in range(args.repeats):
                for mode in ("group", "independent"):
                    runs[mode].append(run_once(eng, prompt, params, mode == "group"))
            same = all(r["tokens"] == runs["independent"][0]["tokens"] for rs in runs.values() for r in rs)
            med = {
                m: {k: statistics.median(r[k] for r in rs) for k in ("peak", "mean_decode", "tok_s")}
                for m, rs in runs.items()
            }
            gr, ind = med["group"], med["independent"]
            ratio = gr["peak"] / ind["peak"]
            ok = ok and same and ratio <= TARGET
            print(f"\nprefix caching {'on' if caching else 'off'}:")
            print(f"  {'':13s} {'peak blocks':>12s} {'mean decode blocks':>19s} {'tokens/s':>10s}")
            for m in ("group", "independent"):
                r = med[m]
                print(f"  {m:13s} {r['peak']:12.0f} {r['mean_decode']:19.1f} {r['tok_s']:10.1f}")
            print(
                f"  group/independent: peak blocks {ratio:.3f}x (target <= {TARGET}x: "
                f"{'PASS' if ratio <= TARGET else 'FAIL'}), mean decode blocks "
                f"{gr['mean_decode'] / ind['mean_decode']:.3f}x, throughput {gr['tok_s'] / ind['tok_s']:.2f}x; "
                f"choices identical to the independent requests: {'yes' if same else 'NO'}"
            )
            eng.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
