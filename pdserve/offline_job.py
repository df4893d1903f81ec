"""``pdserve generate --embedded --prompts-file FILE``: a file of prompts run as one offline job.

Every prompt is queued at once and the engine steps until all are finished (with
``--offline-batch`` the engine's ``max_num_seqs`` is the offload cost model's batch size, see
:func:`batch_line`); a progress bar counts finished prompts on stderr and each result is one JSON
line on stdout, in the file's order: ``{"index", "prompt", "text", "completion_tokens",
"finish_reason"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of ``path``: one per line, blank lines skipped. Raises ValueError naming the
    file when it holds none (an empty job is a mistake, not a success)."""
    prompts = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path}: no prompts (one per line)")
    return prompts


def batch_line(eng: Any) -> str | None:
    """What the offload settings chose for ``eng`` (an ``LLMEngine``), one bracketed line: the
    offline batch size with its predicted step and throughput, the device budget's split, the
    layers whose KV is offloaded; None when none was asked for."""
    parts = []
    split = getattr(eng, "memory_split", None)
    if split is not None:
        parts.append(
            f"device budget split: weights {split.weight_budget_bytes / 2**20:.1f} MiB, KV "
            f"{split.kv_budget_bytes / 2**20:.1f} MiB (predicted step {split.predicted_step_s * 1000:.2f} ms)"
        )
    kvo = getattr(eng, "kv_offload", None)
    if kvo is not None:
        kp = kvo.placement
        parts.append(f"KV offload: {len(kp.offloaded)} of {kp.num_layers} layers' KV in host memory")
    c = getattr(eng, "offline_batch", None)
    if c is not None:
        parts.append(
            f"offline batch: {c.batch_size} sequences (predicted step {c.step_s * 1000:.2f} ms, "
            f"{c.seqs_per_s:.1f} seq/s, {c.seqs_per_s / c.max_seqs_per_s:.0%} of the bound's)"
        )
    return "[" + "; ".join(parts) + "]" if parts else None


def run(
    eng: Any, prompts: list[list[int]], texts: list[str], params: Any, out: TextIO, progress: TextIO | None
) -> int:
    """Queue every prompt (token ids; ``texts`` their text, echoed in the output) on ``eng``, step
    until all finish, write one JSON line per prompt to ``out`` in order. ``progress``: where the
    bar goes (None: no bar). Returns the completion tokens generated."""
    from tqdm import tqdm

    for i, ids in enumerate(prompts):
        eng.add_request(str(i), ids, params)
    done: dict[int, Any] = {}
    with tqdm(total=len(prompts), unit="prompt", file=progress, disable=progress is None) as bar:
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[int(o.request_id)] = o
                    bar.update(1)
    for i, text in enumerate(texts):
        o = done[i]
        rec = {
            "index": i,
            "prompt": text,
            "text": o.text,
            "completion_tokens": len(o.token_ids),
            "finish_reason": None if o.finish_reason is None else str(o.finish_reason.value),
        }
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    out.flush()
    return sum(len(o.token_ids) for o in done.values())
