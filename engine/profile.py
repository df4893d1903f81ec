"""A worker's start-up step-time profile: measured once per (model, hardware, engine), then cached.

:func:`load_or_measure` returns the :class:`~engine.profile_fit.StepModel` of an engine: read
from ``<cache dir>/<key>.json`` when a profile of the same :class:`ProfileKey` is there, else
measured (:func:`measure`: a small grid of real engine steps, a few seconds) and written. The
key covers everything that changes step times: the model (resolved path + a hash of its
``config.json``), dtype, tensor-parallel size, device, the hardware (GPU name, or CPU model and
core count), the torch version and :data:`ENGINE_PROFILE_VERSION` (bump it when the engine's
step cost or the way it is measured changes, e.g. a new attention kernel): any change gives another file, so it is
measured again. The cache dir is ``$PDSERVE_PROFILE_DIR`` or ``~/.cache/pdserve/profiles``.
Workers starting together on one host measure one at a time (a lock file next to the profile):
the first measures, the others then read its result. ``PDSERVE_STARTUP_PROFILE=off`` skips the
profile (the worker registers without one; the router predicts with its seed model).

Fitting is pure (:mod:`engine.profile_fit`); this module does the I/O (timing, files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.profile_fit import DecodeSample, PrefillSample, StepModel, fit_step_model

log = logging.getLogger(__name__)

ENGINE_PROFILE_VERSION = "5"
"""Version of the engine's step cost; part of every profile key (bump it to re-measure). 5: decode
attention reads the paged cache in place (engine.attention_native), int8 weights."""

PREFILL_TOKENS = (16, 512, 128, 256, 64)  # the first two always; the rest while the budget lasts
"""Prompt lengths of the measured prefill steps (one request each, nothing cached), each capped
at the engine's ``max_model_len - 16`` (:func:`prefill_grid`). The grid reaches 512 tokens: the
fit is linear, and a grid up to 256 under-predicted prompts of 400-500 tokens by 10-25% on a CPU
(attention grows with the prompt; issue #19), so admitted long prompts missed their SLO."""
DECODE_GRID = ((1, 16), (4, 16), (1, 192), (4, 96))  # likewise
"""(batch, prompt tokens per sequence) of the measured decode steps."""
DECODE_STEPS = 4  # timed decode steps per grid point (the fastest is kept)
REPEATS = 3  # prefill rounds over PREFILL_TOKENS (the fastest of each point is kept)
BUDGET_S = 15.0
"""Soft bound on a measurement: after the first two points of each grid, further points and
rounds are measured only while this many seconds have not passed (a loaded host still starts
its workers in time; a profile with fewer points is coarser, and online correction refines it)."""
# The fastest of several timings, not the median: other load on the host (or a GC pause) only
# ever adds time to a step, so the minimum is the engine's own speed; a profile measured while
# the host was busy would otherwise be pessimistic for as long as it stays cached. On a CPU
# device a step's time is also bounded by the CPU time the process spent on it per engine
# thread (StepTimer): on a host where every repetition waits for a core (load 9-13 on 2 cores,
# #19) the fastest wall time was still 5-7x the engine's speed (512 tokens: 11.1 s vs ~1.6 s).


class StepTimer:
    """Times engine steps: wall time, or on a CPU device ``min(wall, process CPU time /
    threads)`` (``threads``: the engine's compute threads), the time the step would take with
    its cores to itself. A process waiting for a core accrues wall time, not CPU time."""

    def __init__(self, cpu_threads: int | None) -> None:
        self.cpu_threads = cpu_threads  # None: not a CPU device (wall time only)

    @classmethod
    def for_engine(cls, engine) -> StepTimer:
        if not str(engine.config.device).startswith("cpu"):
            return cls(None)
        import torch

        return cls(max(1, torch.get_num_threads()))

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def elapsed(self, t0: tuple[float, float]) -> float:
        wall = time.perf_counter() - t0[0]
        if self.cpu_threads is None:
            return wall
        cpu = (time.process_time() - t0[1]) / self.cpu_threads
        return cpu if 0 < cpu < wall else wall


@dataclass(frozen=True)
class ProfileKey:
    """What a cached profile is valid for (see the module docstring)."""

    model_path: str
    model_config_sha256: str
    dtype: str
    tensor_parallel_size: int
    device: str
    hardware: str
    torch_version: str
    engine_profile_version: str

    def digest(self) -> str:
        """File-name-safe hash of every field."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


def default_cache_dir() -> Path:
    env = os.environ.get("PDSERVE_PROFILE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve" / "profiles"


def hardware_name(device: str) -> str:
    """The GPU's name on CUDA, else the CPU's model name and core count."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        return f"cuda:{torch.cuda.get_device_name(idx)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu:{cpu}:{cores} cores:{torch.get_num_threads()} threads"


def _attention_of(engine) -> str:
    """The decode attention backend ``engine``'s runner resolved (from ``EngineConfig.attention_backend``
    or ``PDSERVE_ATTENTION``); the variable's value for a runner that does not say (a TP group)."""
    b = getattr(engine.runner, "decode_backend", None)
    return str(b.value) if b is not None else os.environ.get("PDSERVE_ATTENTION", "auto")


def _small_pool_grids(engine) -> str:
    """A key suffix naming the grids when the KV pool shortened them (a profile measured on
    shorter prompts is not reused by a worker whose pool measures the full grid); "" otherwise."""
    kv = getattr(engine, "kv", None)
    if kv is None:
        return ""
    full = (prefill_grid(engine.max_model_len), decode_grid(1 << 30, kv.block_size, engine.max_model_len))
    have = _pool_grids(engine)
    return "" if have == full else f"|grids={have}"


def profile_key(engine, model_path: str | Path) -> ProfileKey:
    """The key of ``engine`` (an :class:`~engine.llm_engine.LLMEngine`) loaded from ``model_path``."""
    import torch

    path = Path(model_path).resolve()
    cfg = path / "config.json"
    sha = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else "no-config"
    c = engine.config
    return ProfileKey(
        model_path=str(path),
        model_config_sha256=sha,
        # the activation dtype, the weights' storage and placement and the attention path: each
        # changes step times
        dtype=(
            f"{engine.runner.dtype if hasattr(engine.runner, 'dtype') else c.dtype}"
            f"|weights={c.weight_dtype}|attention={_attention_of(engine)}"
            # offloaded weights change step times: the budget and host tier are part of the key
            + (
                f"|weight_budget={c.weight_memory_budget_bytes}|weight_host={c.weight_host_budget_bytes}"
                if c.weight_memory_budget_bytes is not None
                else ""
            )
            + _small_pool_grids(engine)
        ),
        tensor_parallel_size=c.tensor_parallel_size,
        device=c.device,
        hardware=hardware_name(c.device),
        torch_version=torch.__version__,
        engine_profile_version=ENGINE_PROFILE_VERSION,
    )


STEP_DEADLINE_S = 120.0  # one grid point's requests must have their first token by then


def _run_until_first_token(engine, ids: list[str]) -> None:
    """Step ``engine`` until every request of ``ids`` has a token. ``RuntimeError`` after
    :data:`STEP_DEADLINE_S` (e.g. something else steps the engine and takes the outputs)."""
    pending = set(ids)
    deadline = time.monotonic() + STEP_DEADLINE_S
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"profiling: no first token for {sorted(pending)} within {STEP_DEADLINE_S:.0f} s "
                "(is another thread stepping the engine?)"
            )
        for out in engine.step():
            if out.request_id in pending and out.token_ids:
                pending.discard(out.request_id)


def prefill_grid(max_model_len: int, pool_tokens: int | None = None) -> tuple[int, ...]:
    """:data:`PREFILL_TOKENS` capped at ``max_model_len - 16`` and at ``pool_tokens - 16`` (the
    tokens the engine's KV pool holds; None: no bound) (at least 1), duplicates dropped, in order."""
    cap = max(1, min(max_model_len, pool_tokens if pool_tokens is not None else max_model_len) - 16)
    out: list[int] = []
    for n in PREFILL_TOKENS:
        n = min(n, cap)
        if n not in out:
            out.append(n)
    return tuple(out)


def decode_grid(num_blocks: int, block_size: int, max_model_len: int) -> tuple[tuple[int, int], ...]:
    """:data:`DECODE_GRID` with each point's prompt shortened so that its whole batch, decoding
    ``DECODE_STEPS + 4`` tokens, fits the KV pool (``num_blocks`` x ``block_size``) and the
    context; a point whose batch cannot fit at all is dropped (duplicates too)."""
    out: list[tuple[int, int]] = []
    grow = DECODE_STEPS + 4
    for batch, plen in DECODE_GRID:
        per_seq_tokens = (num_blocks // batch) * block_size
        n = min(plen, per_seq_tokens - grow, max_model_len - grow)
        if n >= 1 and (batch, n) not in out:
            out.append((batch, n))
    return tuple(out)


def _pool_grids(engine) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """The prefill and decode grids shortened to what ``engine``'s KV pool holds (unchecked)."""
    kv = engine.kv
    return (
        prefill_grid(engine.max_model_len, kv.num_blocks * kv.block_size),
        decode_grid(kv.num_blocks, kv.block_size, engine.max_model_len),
    )


def grids_for(engine) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """The prefill and decode grids :func:`measure` runs on ``engine``: the defaults, shortened
    where its KV pool is too small for them (``ValueError``, naming the pool, when it is too
    small to measure two points of each: the fit needs them)."""
    kv = engine.kv
    prefill, decode = _pool_grids(engine)
    if len(prefill) < 2 or len({b for b, _ in decode}) < 2:
        raise ValueError(
            f"the KV pool ({kv.num_blocks} blocks of {kv.block_size} tokens) is too small to measure the "
            "start-up step-time profile (prefills of two lengths, decode batches of 1 and 4): give the "
            "worker more KV blocks (--kv-blocks), or start it with PDSERVE_STARTUP_PROFILE=off"
        )
    return prefill, decode


def measure(engine, budget_s: float | None = None) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Time real engine steps on an idle ``engine``: prefills of :data:`PREFILL_TOKENS` tokens and
    decode steps on the :data:`DECODE_GRID`, within ``budget_s`` (default :data:`BUDGET_S`) after
    the two required points of each. Prompts are random token ids with a fresh cache salt
    (no prefix hit); every request is aborted afterwards (the engine is left idle and empty)."""
    from engine.sampling_params import SamplingParams

    if engine.has_unfinished():
        raise RuntimeError("profile the engine before it serves requests (it has work in flight)")
    # the caller owns the engine: nothing else may step it meanwhile (e.g. a started EngineLoop)
    vocab = engine.model_config.vocab_size
    salt = uuid.uuid4().hex
    rng_state = [12345]

    def prompt(n: int) -> list[int]:
        out = []
        for _ in range(n):
            rng_state[0] = (rng_state[0] * 1103515245 + 12345) % (1 << 31)
            out.append(rng_state[0] % vocab)
        return out

    budget = BUDGET_S if budget_s is None else budget_s
    start = time.perf_counter()

    def over() -> bool:
        return time.perf_counter() - start > budget

    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    timer = StepTimer.for_engine(engine)
    # warm-up: the first forward pass pays for allocations and kernel selection
    _prefill_once(engine, prompt(16), one, salt, timer)
    fastest: dict[int, float] = {}
    grid, dgrid = grids_for(engine)  # what the KV pool holds
    for r in range(REPEATS):
        for k, n in enumerate(grid):
            if (r or k >= 2) and over():
                break
            t = _prefill_once(engine, prompt(n), one, salt, timer)
            fastest[n] = min(t, fastest.get(n, t))
    prefill = [PrefillSample(n, t) for n, t in fastest.items()]
    decode: list[DecodeSample] = []
    long = SamplingParams(max_tokens=DECODE_STEPS + 4, temperature=0.0, ignore_eos=True)
    for k, (batch, plen) in enumerate(dgrid):
        if k >= 2 and over():
            break
        ids = [
            engine.add_request(None, prompt(plen), long, cache_salt=salt + str(time.monotonic_ns()))
            for _ in range(batch)
        ]
        try:
            _run_until_first_token(engine, ids)
            best: tuple[float, int] | None = None
            for i in range(DECODE_STEPS):
                t0 = timer.start()
                engine.step()
                took = timer.elapsed(t0)
                if best is None or took < best[0]:
                    best = (took, batch * (plen + 1 + i))  # KV tokens the step attended over
            assert best is not None
            decode.append(DecodeSample(batch, best[1], best[0]))
        finally:
            for rid in ids:
                if engine.has_request(rid):
                    engine.abort(rid)
    return prefill, decode


def _prefill_once(engine, ids: list[int], params, salt: str, timer: StepTimer | None = None) -> float:
    rid = engine.add_request(None, ids, params, cache_salt=salt + str(time.monotonic_ns()))
    timer = timer or StepTimer(None)
    t0 = timer.start()
    try:
        _run_until_first_token(engine, [rid])
        return timer.elapsed(t0)
    finally:
        if engine.has_request(rid):
            engine.abort(rid)


@dataclass(frozen=True)
class StartupProfile:
    """A worker's step-time model and where it came from (``cached``: read, not measured)."""

    key: ProfileKey
    model: StepModel
    cached: bool
    path: Path


def read_cached(key: ProfileKey, cache_dir: Path) -> StepModel | None:
    """The cached model of ``key`` (None: absent, or unreadable, or of another key)."""
    path = cache_dir / f"{key.digest()}.json"
    try:
        d = json.loads(path.read_text())
        if d.get("key") != asdict(key):
            return None
        return StepModel.from_dict(d["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(key: ProfileKey, model: StepModel, samples: dict, cache_dir: Path) -> Path:
    """Write atomically (a temp file renamed) so a concurrent reader never sees half a file."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key.digest()}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": asdict(key), "model": model.to_dict(), "samples": samples}, indent=1))
    tmp.replace(path)
    return path


def enabled() -> bool:
    """Whether workers profile at start-up (``PDSERVE_STARTUP_PROFILE``: on (default) | off;
    another value raises ``ValueError`` naming it)."""
    v = os.environ.get("PDSERVE_STARTUP_PROFILE", "on").strip().lower()
    if v not in ("on", "off"):
        raise ValueError(f"PDSERVE_STARTUP_PROFILE must be on or off, got {v!r}")
    return v == "on"


def load_or_measure(engine, model_path: str | Path, cache_dir: Path | None = None) -> StartupProfile:
    """The cached profile of ``engine`` when there is one for its key, else measured and cached."""
    key = profile_key(engine, model_path)
    cache_dir = cache_dir or default_cache_dir()
    path = cache_dir / f"{key.digest()}.json"
    model = read_cached(key, cache_dir)
    if model is not None:
        return StartupProfile(key, model, True, path)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / f"{key.digest()}.lock", "w")  # noqa: SIM115 (held across the measure)
    except OSError:
        lock = None
    try:
        if lock is not None:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker of this key may be measuring
            model = read_cached(key, cache_dir)
            if model is not None:
                return StartupProfile(key, model, True, path)
        return _measure_and_cache(engine, key, cache_dir, path)
    finally:
        if lock is not None:
            lock.close()


def _measure_and_cache(engine, key: ProfileKey, cache_dir: Path, path: Path) -> StartupProfile:
    t0 = time.perf_counter()
    prefill, decode = measure(engine)
    model = fit_step_model(prefill, decode)
    samples = {"prefill": [asdict(s) for s in prefill], "decode": [asdict(s) for s in decode]}
    try:
        path = write_cached(key, model, samples, cache_dir)
    except OSError as e:  # a read-only home still serves, measured again next start
        log.warning("could not cache the step-time profile in %s: %s", cache_dir, e)
    log.info("measured the step-time profile in %.1f s: %s", time.perf_counter() - t0, model)
    return StartupProfile(key, model, False, path)
