"""Mixture-of-experts decode step: the engine vs transformers' forward, and the routing share.

A random-weight tiny MoE model (default Qwen3-MoE-like: 4 layers, hidden 256, 8 / 4 heads, 16
experts of 256, top-4, renormalised; ``--family mixtral`` or ``qwen2_moe`` for the others) is
saved once. For each batch size (1, 8, 32), ``batch`` sequences of ``--context`` random tokens
are prefilled, then decode steps are timed, interleaved so that machine noise hits both alike:

* ours: one engine ``step()`` (schedule, forward over the paged KV cache, greedy sampling);
* transformers: one ``model(next_tokens, past_key_values=cache)`` forward of the same batch at the
  same context (no sampling), after the same prefill.

Timed as this process's CPU time (``time.process_time``) with ``--threads 1`` by default: on a
shared machine, wall time mostly measures the other tenants (``--clock wall`` to use it anyway;
on CUDA the clock is wall time with synchronisation). Printed: the medians and their ratio
(target <= 1.15). Then, in a separate instrumented pass of
our steps (timers around the MoE blocks would perturb the ratio), the share of the step spent in
routing (``SparseMoE.route``: router matmul, softmax, top-k, renormalisation), in the experts'
matmuls (``SparseMoE.run_experts``: grouped matmuls), in Qwen2-MoE's shared expert, and in
grouping tokens by expert and scattering results back (the rest of the block).

Usage: python bench/moe_step.py [--family qwen3_moe] [--batches 1,8,32] [--context 64] [--steps 30]
       [--threads 1] [--clock cpu|wall] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.moe import SparseMoE  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

TARGET = 1.15
VOCAB = 1024


def make_model(root: Path, family: str, max_pos: int) -> Path:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=256, num_local_experts=16, num_experts_per_tok=4)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common,
            intermediate_size=512,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=256,
            shared_expert_intermediate_size=512,
        )
    else:
        cfg = Qwen3MoeConfig(
            **common,
            intermediate_size=512,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=256,
            norm_topk_prob=True,
        )
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # spread the router's choices over the experts
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(root / family, safe_serialization=True)
    return root / family


def _prompts(batch: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for _ in range(batch)]


class Ours:
    """An engine holding ``batch`` sequences that all decode from now on."""

    def __init__(self, path: Path, prompts: list[list[int]], steps: int, device: str) -> None:
        b = len(prompts)
        self.eng = LLMEngine.from_pretrained(
            path,
            EngineConfig(
                num_kv_blocks=b * (len(prompts[0]) + 4 * steps + 64) // 16 + 2 * b,
                max_num_seqs=b,
                max_num_batched_tokens=max(2048, b * len(prompts[0])),
                enable_prefix_caching=False,
                device=device,
            ),
        )
        params = SamplingParams(max_tokens=4 * steps + 32, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            self.eng.add_request(f"r{i}", p, params)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in self.eng.scheduler.requests.values()):
            self.eng.step()
        self.batch = b

    def step(self) -> None:
        out = self.eng.step()
        assert len(out) == self.batch, "a sequence stopped decoding"


class Theirs:
    """transformers' model with a DynamicCache after the same prefill."""

    def __init__(self, path: Path, prompts: list[list[int]], device: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = self.model(ids, use_cache=True)
        self.cache = out.past_key_values
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> None:
        with torch.no_grad():
            out = self.model(self.next, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)


CLOCK: Callable[[], float] = time.process_time


def _timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    t = CLOCK()
    fn()
    sync()
    return CLOCK() - t


def routing_share(
    path: Path, prompts: list[list[int]], steps: int, device: str
) -> tuple[float, float, float]:
    """Shares of our decode step in routing, expert matmuls, and grouping/scatter."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    acc = {"route": 0.0, "experts": 0.0, "shared": 0.0, "block": 0.0}

    def wrap(name: str, fn):
        def inner(*a, **k):
            sync()
            t = CLOCK()
            r = fn(*a, **k)
            sync()
            acc[name] += CLOCK() - t
            return r

        return inner

    ours = Ours(path, prompts, steps, device)
    names = {"route": "route", "experts": "run_experts", "shared": "shared", "block": "forward"}
    originals = {k: getattr(SparseMoE, m) for k, m in names.items()}
    for k, m in names.items():
        setattr(SparseMoE, m, wrap(k, originals[k]))
    try:
        total = sum(_timed(ours.step, sync) for _ in range(steps))
    finally:
        for k, m in names.items():
            setattr(SparseMoE, m, originals[k])
    acc["grouping"] = acc["block"] - acc["route"] - acc["experts"] - acc["shared"]
    return {k: v / total for k, v in acc.items()}


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--family",
        choices=("qwen3_moe", "mixtral", "qwen2_moe"),
        default="qwen3_moe",
        help="MoE architecture",
    )
    ap.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per sequence before decoding")
    ap.add_argument("--steps", type=int, default=30, help="decode steps timed per batch size and side")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both models run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    ap.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time or wall time (CUDA: wall)"
    )
    return cli_help.apply(ap)


def main() -> None:
    global CLOCK
    a = build_parser().parse_args()
    torch.set_num_threads(a.threads)
    if a.clock == "wall" or a.device == "cuda":
        CLOCK = time.perf_counter
    batches = [int(b) for b in a.batches.split(",")]
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(Path(tmp), a.family, a.context + 8 * a.steps + 256)
        print(
            f"model: {a.family}, 4 layers, hidden 256, 16 experts of 256, top-4; context {a.context}; "
            f"{a.device}, float32, {torch.get_num_threads()} threads, "
            f"{'wall' if CLOCK is time.perf_counter else 'process CPU'} time, median of {a.steps} steps"
        )
        for b in batches:
            prompts = _prompts(b, a.context, seed=b)
            ours, theirs = Ours(path, prompts, a.steps, a.device), Theirs(path, prompts, a.device)
            for _ in range(3):  # warm-up
                ours.step()
                theirs.step()
            t_ours, t_hf = [], []
            for _ in range(a.steps):
                t_ours.append(_timed(ours.step, sync))
                t_hf.append(_timed(theirs.step, sync))
            mo, mh = statistics.median(t_ours), statistics.median(t_hf)
            r = mo / mh
            sh = routing_share(path, prompts, a.steps, a.device)
            print(
                f"batch {b:>3}: engine step {mo * 1e3:7.2f} ms, transformers forward {mh * 1e3:7.2f} ms: "
                f"ratio {r:.3f} (target <= {TARGET}) {'PASS' if r <= TARGET else 'FAIL'}; "
                f"share of our step: routing {sh['route']:.1%}, expert matmuls {sh['experts']:.1%}, "
                + (f"shared expert {sh['shared']:.1%}, " if a.family == "qwen2_moe" else "")
                + f"grouping/scatter {sh['grouping']:.1%} (MoE blocks {sh['block']:.1%})"
            )


if __name__ == "__main__":
    main()
