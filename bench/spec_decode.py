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

``--trace`` (the Azure LLM inference trace 2023, code: ``../shared/data/azure_llm_2023/
AzureLLMInferenceTrace_code.csv``, read in place): ``--trace-requests`` requests drawn (seeded)
from the trace keep its context and generated lengths (capped by ``--max-context`` /
``--max-tokens`` for this CPU). The trace holds lengths only, no text: each prompt is a window of
this repository's own Python source of that many tokens (code, as the trace's requests are).
Three engines run the same requests, alternated within each repetition: plain decoding, prompt
lookup, and a draft model (``--draft-layers L``: SmolLM2's first L layers with its final norm
and head, written to a temporary folder; layer-skip self-drafting, the only smaller model of
SmolLM2's tokenizer available offline; ``--draft-model PATH`` for another). Printed per method:
steps per generated token, acceptance, tokens/s and its ratio to plain decoding (medians over
``--reps``), whether every token equals plain decoding's, and the host's load average before
and after (the host is shared: ratios within one run are what counts).

Usage: python bench/spec_decode.py [--k 4] [--max-tokens 64] [--batches 1,4] [--reps 3]
       [--weight-dtypes float32,int8]
       python bench/spec_decode.py --trace [--trace-requests 8] [--draft-layers 6] [--batches 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.spec_decode import DraftAcceptance, SpecMethod, SpeculativeConfig  # noqa: E402

TRACE = ROOT.parent / "shared" / "data" / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"

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
    ap.add_argument("--trace", action="store_true", help="requests from the Azure code trace (see above)")
    ap.add_argument("--trace-file", type=Path, default=TRACE, help="the trace CSV (read in place)")
    ap.add_argument("--trace-requests", type=int, default=8, help="requests drawn from the trace")
    ap.add_argument("--max-context", type=int, default=512, help="cap on a trace request's prompt tokens")
    ap.add_argument(
        "--draft-layers", type=int, default=6, help="layer-skip draft: the target's first L layers"
    )
    ap.add_argument(
        "--draft-model", type=Path, default=None, help="draft model folder (overrides --draft-layers)"
    )
    ap.add_argument(
        "--temperature", type=float, default=0.0, help="trace runs: 0 greedy, else seeded sampling"
    )
    ap.add_argument(
        "--acceptance",
        choices=[a.value for a in DraftAcceptance],
        default=DraftAcceptance.COUPLED.value,
        help="trace runs: the draft model's acceptance rule for sampled requests",
    )
    return cli_help.apply(ap)


def main() -> None:
    args = build_parser().parse_args()
    if args.model is None:
        from pdserve.model_setup import ensure_default_model

        args.model = ensure_default_model(progress=False)
    if args.trace:
        bench_trace(args)
        return
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


# ---------------------------------------------------------------------------- Azure code trace
def layer_skip_draft(model: Path, layers: int, out: Path) -> Path:
    """Write ``model``'s first ``layers`` decoder layers, embeddings, final norm and head (a
    tied head stays tied) as a model folder ``out`` with the same tokenizer; return ``out``."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((model / "config.json").read_text())
    if not 1 <= layers < cfg["num_hidden_layers"]:
        raise SystemExit(f"--draft-layers must be in [1, {cfg['num_hidden_layers'] - 1}], got {layers}")
    out.mkdir(parents=True, exist_ok=True)
    keep = {}
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                continue
            keep[name] = f.get_tensor(name)
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model / name).is_file():
            shutil.copy(model / name, out / name)
    return out


def trace_requests(args: argparse.Namespace, tokenizer) -> list[tuple[list[int], int]]:
    """``--trace-requests`` (prompt ids, output tokens) pairs: lengths from the trace (seeded
    draw, capped), text from this repository's Python source (the trace has no text)."""
    with open(args.trace_file, newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    rng = random.Random(17)
    picked = rng.sample(rows, args.trace_requests)
    source = "\n".join(p.read_text() for p in sorted((ROOT / "engine").rglob("*.py")))
    ids = tokenizer.encode(source, add_special_tokens=False)
    out = []
    for ctx, gen in picked:
        n = max(16, min(ctx, args.max_context))
        start = rng.randrange(0, len(ids) - n)
        out.append((ids[start : start + n], max(2, min(gen, args.max_tokens))))
    return out


def run_trace(
    eng: LLMEngine, reqs: list[tuple[list[int], int]], batch: int, temperature: float
) -> tuple[float, int, int, list]:
    """Run ``reqs`` ``batch`` at a time; (seconds, generated tokens, engine steps, token ids)."""
    toks: list = []
    steps0 = eng.num_steps
    t0 = time.perf_counter()
    for i in range(0, len(reqs), batch):
        ids = []
        for j, (prompt, n) in enumerate(reqs[i : i + batch]):
            p = SamplingParams(max_tokens=n, temperature=temperature, seed=1000 + i + j, ignore_eos=True)
            ids.append(eng.add_request(f"t{i + j}", prompt, p))
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
        toks.extend(done[r] for r in ids)
    return time.perf_counter() - t0, sum(len(t) for t in toks), eng.num_steps - steps0, toks


def bench_trace(args: argparse.Namespace) -> None:
    model = Path(args.model)
    tmp = tempfile.TemporaryDirectory()
    draft = args.draft_model or layer_skip_draft(model, args.draft_layers, Path(tmp.name) / "draft")
    draft_name = (
        str(args.draft_model) if args.draft_model else f"layer-skip draft ({args.draft_layers} layers)"
    )
    k = args.k
    batch_max = max(int(b) for b in args.batches.split(","))
    blocks = (
        batch_max * (-(-(args.max_context + args.max_tokens + k + 1) // 16) + 1) + 16
    )  # what a batch needs
    base = dict(num_kv_blocks=blocks, block_size=16, max_num_batched_tokens=2048, max_model_len=4096)
    engines = {
        "plain": LLMEngine.from_pretrained(model, EngineConfig(**base)),
        "prompt lookup": LLMEngine.from_pretrained(
            model, EngineConfig(**base, speculative=SpeculativeConfig(num_speculative_tokens=k))
        ),
        "draft model": LLMEngine.from_pretrained(
            model,
            EngineConfig(
                **base,
                speculative=SpeculativeConfig(
                    method=SpecMethod.DRAFT_MODEL,
                    num_speculative_tokens=k,
                    draft_model=str(draft),
                    acceptance=DraftAcceptance(args.acceptance),
                ),
            ),
        ),
    }
    reqs = trace_requests(args, engines["plain"].tokenizer)
    for eng in engines.values():  # warm-up (kernel build, caches)
        run_trace(eng, reqs[:1], 1, args.temperature)
    load0 = os.getloadavg()
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seeded, {args.acceptance}"
    print(
        f"Azure code trace ({args.trace_file.name}): {len(reqs)} requests, prompt tokens "
        f"{sum(len(p) for p, _ in reqs)} (cap {args.max_context}), output tokens {sum(n for _, n in reqs)} "
        f"(cap {args.max_tokens}); SmolLM2-135M fp32 CPU, {mode}, k={k}, draft: {draft_name}, reps={args.reps}"
    )
    print(f"host load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} ({os.cpu_count()} CPUs)")
    print(
        f"{'batch':>5} {'method':<14} {'steps/token':>11} {'accept':>7} {'tok/s':>8} {'vs plain':>8} {'identical':>9}"
    )
    for batch in (int(b) for b in args.batches.split(",")):
        tps: dict[str, list[float]] = {m: [] for m in engines}
        ratio: dict[str, list[float]] = {m: [] for m in engines}
        steps: dict[str, int] = dict.fromkeys(engines, 0)
        ntok: dict[str, int] = dict.fromkeys(engines, 0)
        same = dict.fromkeys(engines, True)
        acc0 = {m: (e.spec_draft_tokens, e.spec_accepted_tokens) for m, e in engines.items()}
        for rep in range(args.reps):
            order = list(engines) if rep % 2 == 0 else list(reversed(engines))  # alternate the order
            res = {}
            for m in order:
                res[m] = run_trace(engines[m], reqs, batch, args.temperature)
            for m, (sec, n, st, toks) in res.items():
                tps[m].append(n / sec)
                ratio[m].append((n / sec) / (res["plain"][1] / res["plain"][0]))
                steps[m] += st
                ntok[m] += n
                same[m] &= toks == res["plain"][3]
        for m, e in engines.items():
            d, a = e.spec_draft_tokens - acc0[m][0], e.spec_accepted_tokens - acc0[m][1]
            acc = f"{a / d:.1%}" if d else "-"
            ident = (
                "yes"
                if same[m]
                else ("NO" if args.temperature == 0 or args.acceptance == "coupled" else "n/a")
            )
            print(
                f"{batch:>5} {m:<14} {steps[m] / ntok[m]:>11.3f} {acc:>7} {statistics.median(tps[m]):>8.1f} "
                f"{statistics.median(ratio[m]):>7.2f}x {ident:>9}",
                flush=True,
            )
    load1 = os.getloadavg()
    print(f"host load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    for e in engines.values():
        e.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
