"""Multi-LoRA serving cost (Punica/S-LoRA checks of issue #16), ratios measured in one run.

Eight random rank-``--rank`` PEFT adapters on every projection (q/k/v/o/gate/up/down) of the
model (default: SmolLM2-135M) are written to a temporary folder and served by one engine.

1. Decode step, batch ``--batch`` (32) at context ``--context``: the same batch spread over 8
   adapters (4 requests each) vs all on 1 adapter (Punica: nearly equal; target <= 1.2x) vs the
   base model (its requests on the LoRA engine, and an engine without LoRA: reported). Each
   configuration has its own engine with its batch prefilled; their decode steps are timed
   interleaved (one step of each per round) so machine noise hits them alike; medians.
2. Throughput: 8 adapters x n requests (prompt ``--context`` tokens, ``--gen`` output tokens)
   served together in one engine vs one adapter at a time (each adapter's requests run to
   completion before the next adapter's start: what a server that holds one adapter, or one
   merged model, at a time can do). Target >= 3x. The same two runs on the base model without
   LoRA give the ceiling batching alone reaches on this host (no adapter implementation can beat
   it: the adapters only add work), and the LoRA runs' cost over them. The issue does not fix n;
   Punica's setting is many adapters each with little traffic, so it runs for each n of
   ``--per-adapter`` (default 1,2,4: each n with its own four runs interleaved) and ends with a
   table of one row per n: the ratio, PASS/FAIL against the target, and the host's ceiling.

``--lora-kernel`` picks how the LoRA engines apply the adapters: ``native`` (the C SGMV kernel,
:mod:`engine.lora.sgmv_native`: the engine's default on the CPU in fp32), ``torch`` (torch's
matmuls per adapter segment: the path before it, and the one off the CPU) or ``both`` (default):
every LoRA configuration of both parts runs with each, interleaved in the same run, so the
kernel's gain is measured under the same load.

Timed as this process's CPU time (``time.process_time``) with ``--threads 1`` by default: on a
shared machine wall time mostly measures the other tenants (``--clock wall`` to use it anyway).
``--linear`` sets every engine's projection backend (``torch``, ``native``: the fp32 small-batch
C kernel, ``auto``), the engine without LoRA included, so that the base-model ceiling moves with it.

Usage: python bench/lora_step.py [--model PATH] [--batch 32] [--context 64] [--steps 30]
       [--rank 16] [--per-adapter 1,2,4] [--gen 32] [--repeats 3] [--threads 1] [--clock cpu|wall]
       [--linear torch|native|auto] [--lora-kernel native|torch|both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.lora import AdapterSpec, LoRAConfig  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

TORCH = ", torch LoRA"  # label suffix of a configuration on the torch LoRA path

STEP_TARGET = 1.2
THROUGHPUT_TARGET = 3.0
N_ADAPTERS = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, cfg: ModelConfig, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA adapter (random A and B, std 0.02) on every projection."""
    g = torch.Generator().manual_seed(seed)
    h, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    dims = {
        "self_attn.q_proj": (cfg.hidden_size, h),
        "self_attn.k_proj": (cfg.hidden_size, kv),
        "self_attn.v_proj": (cfg.hidden_size, kv),
        "self_attn.o_proj": (h, cfg.hidden_size),
        "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }
    tensors = {}
    for i in range(cfg.num_hidden_layers):
        for name, (fin, fout) in dims.items():
            key = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=g) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.02
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    conf = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
    }
    (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(n)]


def prefill_batch(eng: LLMEngine, ps: list[list[int]], adapters: list[str], max_tokens: int) -> None:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for p, a in zip(ps, adapters, strict=True):
        eng.add_request(None, p, sp, adapter_id=a)
    while eng.stats().num_waiting or any(not r.is_decoding for r in eng.scheduler.running):
        eng.step()


def make_engine(model: Path, ecfg: EngineConfig, lora: LoRAConfig | None, torch_lora: bool) -> LLMEngine:
    """An engine; ``torch_lora``: its LoRA modules use torch's matmuls, not the native kernel."""
    eng = LLMEngine.from_pretrained(model, ecfg, lora=lora)
    if torch_lora:
        assert eng.lora is not None
        for m in eng.lora.modules.values():
            m.native = False
    return eng


def kernels(choice: str) -> list[bool]:
    """``--lora-kernel`` as the torch_lora flags of the LoRA configurations to run."""
    return {"native": [False], "torch": [True], "both": [False, True]}[choice]


def run_all(eng: LLMEngine, reqs: list[tuple[list[int], str]], gen: int) -> None:
    sp = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    for p, a in reqs:
        eng.add_request(None, p, sp, adapter_id=a)
    while eng.has_unfinished():
        eng.step()


def _counts(text: str) -> tuple[int, ...]:
    """``--per-adapter``: comma-separated request counts per adapter, each >= 1, no repeats."""
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"distinct counts >= 1, got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2-135M)")
    ap.add_argument(
        "--batch", type=int, default=32, help="decode batch (a multiple of 8: 4 requests per adapter)"
    )
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per configuration")
    ap.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    ap.add_argument(
        "--per-adapter",
        type=_counts,
        default="1,2,4",
        help="throughput: requests per adapter, comma-separated (one table row each)",
    )
    ap.add_argument("--gen", type=int, default=32, help="throughput: output tokens per request")
    ap.add_argument(
        "--repeats", type=int, default=3, help="throughput: interleaved runs of each configuration"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time")
    ap.add_argument(
        "--part", choices=("all", "step", "throughput"), default="all", help="which measurement(s) to run"
    )
    ap.add_argument(
        "--linear",
        choices=("torch", "native", "auto"),
        default=None,
        help="EngineConfig.linear of every engine (engine.models.linear_native; default: env "
        "PDSERVE_LINEAR, else the engine's default)",
    )
    ap.add_argument(
        "--lora-kernel",
        choices=("native", "torch", "both"),
        default="both",
        help="how the LoRA engines apply adapters: the native SGMV kernel, torch matmuls per segment, "
        "or each LoRA configuration with both, interleaved",
    )
    return cli_help.apply(ap)


def main() -> None:
    ap = build_parser()
    a = ap.parse_args()
    if a.batch % N_ADAPTERS:
        ap.error(f"--batch must be a multiple of {N_ADAPTERS}")
    torch.set_num_threads(a.threads)
    clock: Callable[[], float] = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.model is None:
        from pdserve.model_setup import ensure_default_model

        model = ensure_default_model(progress=False)
    else:
        model = Path(a.model)
    mcfg = ModelConfig.from_path(model)
    tmp = Path(tempfile.mkdtemp(prefix="lora_bench_"))
    names = [f"lora{i}" for i in range(N_ADAPTERS)]
    specs = tuple(AdapterSpec(n, str(write_adapter(tmp / n, mcfg, a.rank, i))) for i, n in enumerate(names))
    lora = LoRAConfig(specs, max_loras=N_ADAPTERS)
    most = max(a.batch, N_ADAPTERS * max(a.per_adapter))  # throughput: all requests of one run at once
    need = (a.context + a.steps + a.gen + 32) * most // 16 + 64
    ecfg = EngineConfig(num_kv_blocks=need, max_num_seqs=most, max_num_batched_tokens=4096, linear=a.linear)
    linear = a.linear or f"default (PDSERVE_LINEAR={os.environ.get('PDSERVE_LINEAR', 'unset')})"
    print(
        f"model {model.name}, {N_ADAPTERS} adapters of rank {a.rank} on {', '.join(TARGETS)}; "
        f"threads {a.threads}, clock {a.clock}, linear {linear}, LoRA kernel {a.lora_kernel}; "
        f"load {os.getloadavg()[0]:.1f}"
    )

    if a.part in ("all", "step"):
        decode_step(a, model, mcfg, names, lora, ecfg, clock)
    if a.part in ("all", "throughput"):
        throughput(a, model, mcfg, names, lora, ecfg, clock)


def decode_step(
    a: argparse.Namespace,
    model: Path,
    mcfg: ModelConfig,
    names: list[str],
    lora: LoRAConfig,
    ecfg: EngineConfig,
    clock: Callable[[], float],
) -> None:
    """Part 1: decode step of one batch spread over 8 adapters vs 1 adapter vs the base model."""
    ps = prompts(a.batch, a.context, mcfg.vocab_size, 0)
    configs: dict[str, tuple[LoRAConfig | None, list[str], bool]] = {}
    for tl in kernels(a.lora_kernel):
        sfx = TORCH if tl else ""
        configs["8 adapters" + sfx] = (lora, [names[i % N_ADAPTERS] for i in range(a.batch)], tl)
        configs["1 adapter" + sfx] = (lora, [names[0]] * a.batch, tl)
    configs["base on LoRA engine"] = (lora, [""] * a.batch, False)
    configs["engine without LoRA"] = (None, [""] * a.batch, False)
    engines = {}
    for label, (lc, adapters, tl) in configs.items():
        eng = make_engine(model, ecfg, lc, tl)
        prefill_batch(eng, ps, adapters, a.steps + 8)
        engines[label] = eng
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(3):  # warm-up
        for eng in engines.values():
            eng.step()
    for _ in range(a.steps):
        for label, eng in engines.items():
            t0 = clock()
            outs = eng.step()
            times[label].append(clock() - t0)
            assert len(outs) == a.batch, f"{label}: {len(outs)} decodes in the step"
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"\ndecode step, batch {a.batch}, context ~{a.context + 3}..{a.context + 3 + a.steps}, {a.steps} steps (median ms):"
    )
    for k, v in med.items():
        print(f"  {k:34s} {v:8.2f}")
    base = med["engine without LoRA"]
    for tl in kernels(a.lora_kernel):
        sfx = TORCH if tl else ""
        m8, m1 = med["8 adapters" + sfx], med["1 adapter" + sfx]
        r8 = m8 / m1
        print(
            f"  {'torch LoRA' if tl else 'native LoRA'}: 8 adapters / 1 adapter = {r8:.3f}x "
            f"(target <= {STEP_TARGET}) {'MET' if r8 <= STEP_TARGET else 'NOT MET'}; "
            f"8 adapters / engine without LoRA = {m8 / base:.3f}x; 1 adapter / engine without LoRA = {m1 / base:.3f}x"
        )
    if a.lora_kernel == "both":
        print(
            f"  native / torch LoRA: 8 adapters {med['8 adapters'] / med['8 adapters' + TORCH]:.3f}x, "
            f"1 adapter {med['1 adapter'] / med['1 adapter' + TORCH]:.3f}x"
        )
    print(f"  base on LoRA engine / engine without LoRA = {med['base on LoRA engine'] / base:.3f}x")
    for eng in engines.values():
        eng.close()
    del engines


@dataclass(frozen=True)
class ThroughputRow:
    """Part 2's medians (seconds) for one number of requests per adapter. ``together`` and
    ``one_at_a_time`` are on the first LoRA path of ``--lora-kernel`` (``kernel``); ``torch_*``
    on the torch path when ``both`` ran."""

    per_adapter: int
    kernel: str  # "native" or "torch": the LoRA path of together / one_at_a_time
    together: float  # LoRA, 8 adapters in one engine, mixed batches
    one_at_a_time: float  # LoRA, each adapter's requests to completion before the next's
    base_together: float  # the same requests on the base model without LoRA, together
    base_groups: float  # ... and in the same groups, one after another
    torch_together: float | None = None
    torch_one_at_a_time: float | None = None

    @property
    def ratio(self) -> float:
        return self.one_at_a_time / self.together

    @property
    def torch_ratio(self) -> float | None:
        if self.torch_together is None or self.torch_one_at_a_time is None:
            return None
        return self.torch_one_at_a_time / self.torch_together

    @property
    def ceiling(self) -> float:
        return self.base_groups / self.base_together

    @property
    def passed(self) -> bool:
        return self.ratio >= THROUGHPUT_TARGET


def throughput(
    a: argparse.Namespace,
    model: Path,
    mcfg: ModelConfig,
    names: list[str],
    lora: LoRAConfig,
    ecfg: EngineConfig,
    clock: Callable[[], float],
) -> list[ThroughputRow]:
    """Part 2 for every count of ``--per-adapter``, then the table of one row per count."""
    rows = [throughput_one(a, n, model, mcfg, names, lora, ecfg, clock) for n in a.per_adapter]
    print(
        f"\nthroughput table: {N_ADAPTERS} adapters x n requests, together vs one adapter at a time "
        f"(target >= {THROUGHPUT_TARGET}x), {rows[0].kernel} LoRA; ceiling: the same on the base model "
        f"without LoRA; load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"  {'n':>3} {'together s':>11} {'one-at-a-time s':>16} {'ratio':>7} {'result':>6} {'ceiling':>8}"
        f" {'torch LoRA ratio':>17}"
    )
    for r in rows:
        tr = r.torch_ratio
        print(
            f"  {r.per_adapter:>3} {r.together:>11.2f} {r.one_at_a_time:>16.2f} {r.ratio:>6.2f}x "
            f"{'PASS' if r.passed else 'FAIL':>6} {r.ceiling:>7.2f}x {'-' if tr is None else f'{tr:.2f}x':>17}"
        )
    return rows


def throughput_one(
    a: argparse.Namespace,
    n: int,
    model: Path,
    mcfg: ModelConfig,
    names: list[str],
    lora: LoRAConfig,
    ecfg: EngineConfig,
    clock: Callable[[], float],
) -> ThroughputRow:
    """Part 2 with ``n`` requests per adapter: 8 adapters served together vs one adapter at a
    time (on each LoRA path of ``--lora-kernel``); and, as the ceiling any adapter
    implementation can reach on this host, the same requests on the base model without LoRA
    served together vs in the same groups (what batching 8x more requests per step gains)."""
    tp = prompts(N_ADAPTERS * n, a.context, mcfg.vocab_size, 1)
    reqs = [(tp[i], names[i // n]) for i in range(N_ADAPTERS * n)]
    base_reqs = [(p, "") for p, _ in reqs]

    def run(lc: LoRAConfig | None, rs: list[tuple[list[int], str]], grouped: bool, torch_lora: bool) -> float:
        """One timed run on a fresh engine (no prefix cache from another run), after a warm-up."""
        eng = make_engine(model, ecfg, lc, torch_lora)
        run_all(eng, rs[:n], 4)
        t0 = clock()
        if grouped:  # each group (adapter) to completion before the next starts
            for k in range(N_ADAPTERS):
                run_all(eng, rs[k * n : (k + 1) * n], a.gen)
        else:
            run_all(eng, rs, a.gen)
        took = clock() - t0
        eng.close()
        return took

    # the runs interleaved, in a rotating order, ``--repeats`` times: load changes on a shared
    # host then hit them alike; medians
    runs: dict[str, tuple[LoRAConfig | None, list[tuple[list[int], str]], bool, bool]] = {}
    for tl in kernels(a.lora_kernel):
        sfx = TORCH if tl else ""
        runs["together" + sfx] = (lora, reqs, False, tl)
        runs["one at a time" + sfx] = (lora, reqs, True, tl)
    runs["base together"] = (None, base_reqs, False, False)
    runs["base groups"] = (None, base_reqs, True, False)
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    for r in range(a.repeats):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[k].append(run(*runs[k]))
    med = {k: statistics.median(v) for k, v in times.items()}
    first = "" if a.lora_kernel != "torch" else TORCH
    both = a.lora_kernel == "both"
    row = ThroughputRow(
        n,
        "torch" if first else "native",
        med["together" + first],
        med["one at a time" + first],
        med["base together"],
        med["base groups"],
        med["together" + TORCH] if both else None,
        med["one at a time" + TORCH] if both else None,
    )
    toks = N_ADAPTERS * n * a.gen
    print(
        f"\nthroughput, {N_ADAPTERS} adapters x {n} requests, prompt {a.context}, {a.gen} output tokens each "
        f"(median of {a.repeats} interleaved runs; load {os.getloadavg()[0]:.1f}):"
    )
    for tl in kernels(a.lora_kernel):
        sfx = TORCH if tl else ""
        together, one = med["together" + sfx], med["one at a time" + sfx]
        kind = "torch" if tl else "native"
        ratio = one / together
        print(
            f"  {kind} LoRA: together (one engine, mixed batches) {together:7.2f} s {toks / together:8.1f} tok/s"
        )
        print(f"  {kind} LoRA: one adapter at a time               {one:7.2f} s {toks / one:8.1f} tok/s")
        print(
            f"  {kind} LoRA: together / one at a time = {ratio:.2f}x  (target >= {THROUGHPUT_TARGET}) "
            f"{'PASS' if ratio >= THROUGHPUT_TARGET else 'FAIL'}"
        )
        per = ", ".join(
            f"{g / t:.2f}" for g, t in zip(times["one at a time" + sfx], times["together" + sfx], strict=True)
        )
        print(
            f"  {kind} LoRA: per repeat {per}; cost: together {together / row.base_together:.3f}x the base "
            f"model's time, one at a time {one / row.base_groups:.3f}x"
        )
    print(
        f"  ceiling on this host, base model without LoRA, same groups: together {row.base_together:.2f} s, "
        f"groups of {n} {row.base_groups:.2f} s = {row.ceiling:.2f}x"
    )
    base_per = ", ".join(
        f"{g / t:.2f}" for g, t in zip(times["base groups"], times["base together"], strict=True)
    )
    print(f"  per repeat: base {base_per}")
    return row


if __name__ == "__main__":
    main()
