"""Decode step time with and without the fused native small ops, per architecture (issue #17).

For each architecture (``--archs``: llama, qwen3, phi3, gemma2, gemma3) a random-weight checkpoint
with SmolLM2-135M's layer shapes (hidden 576, 9 heads / 3 KV heads of 64, intermediate 1536;
``--layers`` layers, vocabulary ``--vocab``) is written once to ``--dir`` by transformers; each
family keeps its own structure (Qwen3's q/k norms, Phi-3's fused checkpoint tensors, Gemma's
four (1 + w) norms, GELU-tanh, caps and alternating windows). For each weight dtype
(``--weight-dtypes``: float32 with the native linear, int8 with the native int8 linear) and each
``CTXxBATCH`` cell, ``batch`` sequences are imported with random KV at ``ctx`` tokens and decoded;
the model's fused forward is switched on and off every ``--steps`` steps, ``--reps`` times
(interleaved, so a shared host's load hits both alike). Printed per cell: median step ms of the
torch small ops and of the fused ones, and their ratio (torch / fused; > 1: fused faster), with
the load average before and after. The fused path's ``fused_reason`` is printed where it is off.

``--cpu-time``: one thread everywhere (torch, the native linear's pool, OpenMP) and each step timed
by the thread's CPU time (``time.thread_time``), which time spent descheduled does not count: on a
shared, loaded host this compares the two paths' work where wall-clock medians mostly measure the
other tenants.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARCHS = ("llama", "qwen3", "phi3", "gemma2", "gemma3")
SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def hf_config(arch: str, layers: int, vocab: int):
    """A transformers config of ``arch`` with SmolLM2-135M's layer shapes."""
    import transformers as tf

    kw = dict(SHAPE, num_hidden_layers=layers, vocab_size=vocab)
    if arch == "llama":
        return tf.LlamaConfig(**kw)
    if arch == "qwen3":
        return tf.Qwen3Config(**kw, head_dim=64)
    if arch == "phi3":
        return tf.Phi3Config(**kw, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    gemma = dict(head_dim=64, query_pre_attn_scalar=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma2":
        return tf.Gemma2Config(**kw, **gemma, sliding_window=512)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**kw, **gemma, sliding_window=512)
    raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")


def checkpoint(root: Path, arch: str, layers: int, vocab: int) -> Path:
    """The checkpoint folder of ``arch`` (written on first use)."""
    from transformers import AutoModelForCausalLM

    path = root / f"{arch}-{layers}l-{vocab}v"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_config(arch, layers, vocab), dtype=torch.float32)
        model.save_pretrained(path, safe_serialization=True)
    return path


def cell(
    path: Path, weight_dtype: str, context: int, batch: int, steps: int, reps: int, clock=time.perf_counter
) -> tuple:
    """``(torch_ms, fused_ms, reason)``: median decode step with each path on one engine (fused
    None where it cannot run; reason says why)."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    extra = 2 * steps * reps + 8
    cfg = EngineConfig(
        num_kv_blocks=batch * (-(-(context + extra) // 16) + 1) + 8,
        max_num_seqs=batch,
        max_num_batched_tokens=max(2048, context),
        enable_prefix_caching=False,
        weight_dtype=weight_dtype,
        linear="native" if weight_dtype == "float32" else "auto",
    )
    eng = LLMEngine.from_pretrained(path, cfg)
    model = eng.runner.model
    reason = eng.runner.fused_reason
    s = eng.kv_shape
    g = torch.Generator().manual_seed(batch * 7919 + context)
    blocks = torch.randn(
        -(-context // s.block_size), s.num_layers, 2, s.block_size, s.num_kv_heads, s.head_dim, generator=g
    )
    sp = SamplingParams(max_tokens=extra + 4, temperature=0.0, ignore_eos=True)
    vocab = model.config.vocab_size
    for i in range(batch):
        eng.import_kv(f"r{i}", torch.randint(3, vocab, (context,), generator=g).tolist(), 5 + i, blocks, sp)
    for _ in range(2):
        eng.step()
    times: dict[bool, list[float]] = {False: [], True: []}
    modes = (False, True) if reason is None else (False,)
    for _ in range(reps):
        for on in modes:
            model.enable_fused(on)
            for _ in range(steps):
                t = clock()
                eng.step()
                times[on].append(clock() - t)
    eng.close()
    fused = statistics.median(times[True]) * 1e3 if times[True] else None
    return statistics.median(times[False]) * 1e3, fused, reason


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    ap.add_argument("--weight-dtypes", default="float32,int8", help="comma-separated: float32, int8")
    ap.add_argument("--cells", default="256x1,256x8", help="CTXxBATCH,... decode cells")
    ap.add_argument("--layers", type=int, default=12, help="decoder layers of each checkpoint")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of each checkpoint")
    ap.add_argument("--steps", type=int, default=8, help="steps per path per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (paths interleaved)")
    ap.add_argument(
        "--dir", type=Path, default=Path("/tmp/pdserve_fused_models"), help="where checkpoints are written"
    )
    ap.add_argument(
        "--cpu-time", action="store_true", help="1 thread, steps timed by thread CPU time (above)"
    )
    return cli_help.apply(ap)


def main() -> int:
    args = build_parser().parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells.split(",")]
    clock = time.perf_counter
    if args.cpu_time:
        from engine.models import linear_native

        torch.set_num_threads(1)
        if linear_native.kernel() is not None:
            linear_native.configure_pool(1)
        clock = time.thread_time
        print("clock: thread CPU time, 1 thread")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        f"{'arch':8} {'weights':8} {'ctx':>5} {'batch':>5} {'torch ms':>9} {'fused ms':>9} {'torch/fused':>11}"
    )
    for arch in args.archs.split(","):
        path = checkpoint(args.dir, arch, args.layers, args.vocab)
        for wd in args.weight_dtypes.split(","):
            for ctx, batch in cells:
                plain, fused, why = cell(path, wd, ctx, batch, args.steps, args.reps, clock)
                if fused is None:
                    print(f"{arch:8} {wd:8} {ctx:5d} {batch:5d} {plain:9.2f} {'off':>9} ({why})")
                else:
                    print(
                        f"{arch:8} {wd:8} {ctx:5d} {batch:5d} {plain:9.2f} {fused:9.2f} {plain / fused:11.2f}"
                    )
                sys.stdout.flush()
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
