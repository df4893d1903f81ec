"""``pdserve`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from engine.scheduler import SchedulingPolicy
from pdserve import cli_help, mlfq_knobs, offload_knobs
from pdserve.arg_types import non_negative_gib, port_number, positive_int, positive_seconds
from pdserve.errors import PdserveError, UnavailableError
from pdserve.security import add_client_tls_args, client_tls_kwargs


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="--embedded: HF Llama-family folder (default: bundled SmolLM2-135M-Instruct); a router's "
        "served model is --model-id",
    )
    p.add_argument("--device", default="cpu", help="--embedded: torch device (cpu, cuda, cuda:N)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="--embedded: weight and KV dtype (auto: float32 on CPU, the checkpoint's on CUDA)",
    )
    p.add_argument(
        "--kv-blocks",
        type=positive_int,
        default=None,
        help="--embedded: KV pool size in blocks (default: as many as the KV memory budget holds)",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="--embedded: tensor-parallel size (processes the model is split over)",
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--no-chat", action="store_true", help="send the prompt raw, without the chat template")


def _cmd_generate_embedded(a: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from pdserve import offline_job
    from pdserve.model_setup import resolve_model_path

    path = resolve_model_path(a.model)
    lora = _lora_config(a.lora)
    if a.adapter and lora is None:
        print("pdserve generate --embedded --adapter NAME needs --lora NAME=PATH", file=sys.stderr)
        return 2
    bad = offload_knobs.flag_errors(a, None, a.tp)
    if not bad and lora is not None and (a.weight_budget_gib is not None or a.device_budget_gib is not None):
        bad = ["--lora is not supported with weight offloading (--weight-budget-gib / --device-budget-gib)"]
    if bad:
        print(f"pdserve generate: {bad[0]}", file=sys.stderr)
        return 2
    try:
        prompts = offline_job.read_prompts(a.prompts_file) if a.prompts_file else [a.prompt]
        cfg = EngineConfig(
            device=a.device,
            dtype=a.dtype,
            num_kv_blocks=a.kv_blocks,
            tensor_parallel_size=a.tp,
            weight_memory_budget_bytes=None
            if a.weight_budget_gib is None
            else int(a.weight_budget_gib * offload_knobs.GIB),
            **offload_knobs.engine_kwargs(offload_knobs.flag_values(a)),
        )
        eng = LLMEngine.from_pretrained(path, cfg, lora=lora)
    except (OSError, ValueError) as e:  # a bad prompts file; a budget the engine refuses (naming it)
        print(f"pdserve generate: {e}", file=sys.stderr)
        return 2
    chosen = offline_job.batch_line(eng)
    if chosen:
        print(chosen, file=sys.stderr)
    params = SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed
    )

    def encode(text: str) -> list[int]:
        if a.no_chat or eng.tokenizer is None or not eng.tokenizer.chat_template:
            return eng.tokenize(text)
        return eng.tokenizer.encode_chat([{"role": "user", "content": text}])

    if a.prompts_file:
        t0 = time.monotonic()
        n = offline_job.run(
            eng,
            [encode(p) for p in prompts],
            prompts,
            params,
            sys.stdout,
            None if a.no_progress else sys.stderr,
        )
        total = time.monotonic() - t0
        print(f"[{path.name}: {len(prompts)} prompts, {n} tokens, {n / total:.1f} tok/s]", file=sys.stderr)
        eng.close()
        return 0
    ids = encode(a.prompt)
    t0 = time.monotonic()
    eng.add_request("cli", ids, params, adapter_id=a.adapter)
    first = None
    n = 0
    while eng.has_unfinished():
        for o in eng.step():
            if first is None:
                first = time.monotonic() - t0
            n += len(o.new_token_ids)
            sys.stdout.write(o.text_delta)
            sys.stdout.flush()
    total = time.monotonic() - t0
    sys.stdout.write("\n")
    print(
        f"[{path.name}: {n} tokens, TTFT {first * 1000:.0f} ms, {n / total:.1f} tok/s]",
        file=sys.stderr,
    )
    eng.close()
    return 0


DEFAULT_ADDRESS = "127.0.0.1:50051"


def _lora_specs(values: list[str]) -> list[str]:
    """``--lora NAME=PATH`` values with PATH made absolute (workers run in other directories);
    raises ValueError naming a malformed one, or one whose PATH is not a folder."""
    from pathlib import Path

    from engine.lora import AdapterSpec

    specs = [AdapterSpec.parse(v) for v in values]
    for s in specs:  # checked here, not by each worker after the store and router have started
        if not Path(s.path).is_dir():
            raise ValueError(f"--lora {s.name}={s.path}: no adapter folder at {s.path!r}")
    return [f"{s.name}={Path(s.path).resolve()}" for s in specs]


def _lora_config(values: list[str]):
    """The embedded engine's LoRA config from ``--lora`` flags (None without any)."""
    from engine.lora import AdapterSpec, LoRAConfig

    return LoRAConfig(tuple(AdapterSpec.parse(v) for v in _lora_specs(values))) if values else None


def _key_store_arg(store: str) -> str:
    """A key file made absolute (the router runs in another working directory); URLs as given."""
    from pathlib import Path

    return store if "://" in store else str(Path(store).resolve())


class _Terminated(BaseException):
    """SIGTERM while ``pdserve serve`` starts its cluster (a BaseException, as KeyboardInterrupt)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _cmd_serve(a: argparse.Namespace) -> int:
    import signal
    import threading

    from pdserve.launcher import ClusterSpec, launch
    from pdserve.model_setup import resolve_model_path

    paths = [resolve_model_path(m) for m in (a.model or [None])]
    path = paths[0]
    host, _, port = a.address.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        print("pdserve serve binds 127.0.0.1 only; use `pdserve up` for a cluster", file=sys.stderr)
        return 2
    try:
        prefill = _per_model_counts(a.prefill, len(paths), "--prefill")
        decode = _per_model_counts(a.decode, len(paths), "--decode")
        pools = _model_pools(paths, prefill, decode)
    except ValueError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    if a.routers < 1:
        print(f"pdserve serve: --routers must be >= 1, got {a.routers}", file=sys.stderr)
        return 2
    no_prefill = [p.model_id for p in pools if p.num_prefill == 0]
    if no_prefill and (a.policy or "goodput") != "colocated":
        # every request would fail UNAVAILABLE "no prefill worker is registered": only the
        # colocated policy places requests on decode workers alone
        print(
            f"pdserve serve: --prefill 0 leaves {', '.join(no_prefill)} without a prefill worker, and the "
            f"{a.policy or 'goodput'} policy needs one: give --prefill >= 1, or --policy colocated "
            "(decode workers prefill their own requests)",
            file=sys.stderr,
        )
        return 2
    bad = mlfq_knobs.flag_errors(a, a.scheduling_policy) + offload_knobs.flag_errors(a, a.scheduling_policy)
    if bad:
        print(f"pdserve serve: {bad[0]}", file=sys.stderr)
        return 2
    if a.tls not in ("on", "off"):
        print(
            "pdserve serve: choose the transport: --tls on (TLS, mutual TLS and a cluster token; "
            "certificates from --pki-dir, else a throw-away development CA) or --tls off (plaintext "
            "on 127.0.0.1, development only); or set PDSERVE_TLS=on|off",
            file=sys.stderr,
        )
        return 2
    print(
        "pdserve: starting "
        + "; ".join(
            f"{p.model_id}: store, {p.num_prefill} prefill and {p.num_decode} decode worker(s)" for p in pools
        )
        + f"; {a.routers} router(s) ...",
        file=sys.stderr,
    )
    try:
        loras = _lora_specs(a.lora)
        if loras and len(pools) > 1:
            raise ValueError(
                "--lora serves an adapter on every worker, and an adapter fits one base model: with "
                "several --model, load it into its model's workers once serving with `pdserve adapters "
                "load NAME=PATH --router ADDR --model-id MODEL`"
            )
    except ValueError as e:
        print(f"pdserve serve: {e}", file=sys.stderr)
        return 2
    # SIGTERM while the cluster starts (it takes a while) stops what already started: without
    # this the default action ended this process and left the store, router and workers running,
    # orphaned (launch stops every process it started when interrupted)
    before = signal.signal(signal.SIGTERM, _terminated)
    try:
        cl = launch(
            ClusterSpec(
                model_path=str(path) if len(pools) == 1 else "",
                models=pools if len(pools) > 1 else (),
                worker_args=(
                    *(x for spec in loras for x in ("--lora", spec)),
                    *(("--swap-space", str(a.swap_space)) if a.swap_space else ()),
                    *(("--swap-disk", str(a.swap_disk)) if a.swap_disk else ()),
                    *(("--swap-disk-dir", a.swap_disk_dir) if a.swap_disk_dir else ()),
                    *(("--scheduling-policy", a.scheduling_policy) if a.scheduling_policy else ()),
                    *mlfq_knobs.as_flags(a),
                    *(
                        ("--weight-budget-gib", str(a.weight_budget_gib))
                        if a.weight_budget_gib is not None
                        else ()
                    ),
                    *offload_knobs.as_flags(a),
                ),
                num_prefill=prefill[0],
                num_decode=decode[0],
                router_port=int(port),
                worker_kv_blocks=a.kv_blocks,
                router_args=(
                    *(("--policy", a.policy) if a.policy else ()),
                    *(("--kv-stream", a.kv_stream) if a.kv_stream != "off" else ()),
                    *(("--api-keys", _key_store_arg(a.api_keys)) if a.api_keys else ()),
                ),
                index_url=a.index,
                tls=a.tls == "on",
                pki_dir=a.pki_dir,
                num_routers=a.routers,
                openai_port=a.openai_port,
                openai_args=("--api-keys", _key_store_arg(a.api_keys)) if a.api_keys else (),
                direct_streams=a.direct_streams,
            )
        )
    except _Terminated:
        print("pdserve: stopped (SIGTERM) while starting; nothing is left running", file=sys.stderr)
        return 143
    finally:  # the caller's handler back however the launch ended (the serving one is set below)
        signal.signal(signal.SIGTERM, before)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    served = ", ".join(p.model_id for p in pools)
    print(f"pdserve: serving {served} on {','.join(cl.router_addresses)} (Ctrl-C to stop)", file=sys.stderr)
    for name, addr in sorted(cl.workers.items()):
        print(f"  {name:<12} {addr}", file=sys.stderr)
    for model, addr in cl.model_stores.items():
        print(f"  {'store':<12} {addr}" + (f" ({model})" if len(pools) > 1 else ""), file=sys.stderr)
    if cl.openai_url:
        print(f"  {'openai':<12} {cl.openai_url}/v1", file=sys.stderr)
    if cl.pki is not None:
        print(
            f"pdserve: TLS + mTLS + cluster token on; connect with: pdserve generate --address "
            f"{cl.router_address} --tls-ca {cl.pki.ca} PROMPT",
            file=sys.stderr,
        )
    try:
        while not stop.wait(1.0):
            dead = cl.dead()  # a router that exited is being restarted: not dead
            if dead:
                print(f"pdserve: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
    finally:
        cl.stop()
    return 0


def _per_model_counts(value: str, models: int, flag: str) -> list[int]:
    """``--prefill`` / ``--decode``: one count for every model, or one per ``--model`` in order
    (``1,2``); ``ValueError`` names the flag."""
    try:
        counts = [int(x) for x in value.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes a count or one count per --model (e.g. 1,2), got {value!r}") from None
    if len(counts) == 1:
        counts *= models
    if len(counts) != models:
        raise ValueError(
            f"{flag} gives {len(counts)} counts for {models} --model: give one, or one per --model"
        )
    return counts


def _model_pools(paths, prefill: list[int], decode: list[int]) -> tuple:
    """The :class:`pdserve.launcher.ModelPool` of each served model."""
    from pdserve.launcher import ModelPool

    return tuple(ModelPool(str(p), n_p, n_d) for p, n_p, n_d in zip(paths, prefill, decode, strict=True))


def _engine_flags_given(a: argparse.Namespace) -> list[str]:
    """The engine flags of ``pdserve generate`` (``_engine_args``, ``--lora``) given a value other
    than their default: only ``--embedded`` reads them."""
    given = [
        ("--model", a.model is not None),
        ("--device", a.device != "cpu"),
        ("--dtype", a.dtype != "auto"),
        ("--kv-blocks", a.kv_blocks is not None),
        ("--tp", a.tp != 1),
        ("--lora", bool(a.lora)),
    ]
    return [flag for flag, on in given if on]


def _client_flags_given(a: argparse.Namespace) -> list[str]:
    """The request flags of ``pdserve generate`` given a value other than their default: only a
    request to a router reads them (not ``--embedded``)."""
    given = [
        ("--model-id", bool(a.model_id)),
        ("--address", a.address != DEFAULT_ADDRESS),
        ("--timeout", a.timeout is not None),
    ]
    return [flag for flag, on in given if on]


def _cmd_generate(a: argparse.Namespace) -> int:
    if (a.prompt is None) == (a.prompts_file is None):
        print("pdserve generate: give a PROMPT or --prompts-file FILE (one of them)", file=sys.stderr)
        return 2
    if not a.embedded:
        local = (
            (["--prompts-file"] if a.prompts_file is not None else [])
            + _engine_flags_given(a)
            + offload_knobs.given_flags(a)
        )
        if local:
            print(
                f"pdserve generate: {local[0]} sets up the engine in this process: it needs --embedded "
                "(a cluster's workers take it from `pdserve serve` / worker flags; the served model "
                "to ask a router for is --model-id)",
                file=sys.stderr,
            )
            return 2
    else:
        remote = _client_flags_given(a)
        if remote:
            print(
                f"pdserve generate: {remote[0]} is for a request to a router; --embedded runs the engine "
                "in this process (its model: --model): drop one of them",
                file=sys.stderr,
            )
            return 2
    if a.no_progress and a.prompts_file is None:
        print("pdserve generate: --no-progress needs --prompts-file FILE", file=sys.stderr)
        return 2
    if a.prompts_file is not None and a.adapter:
        print("pdserve generate: --adapter is not supported with --prompts-file", file=sys.stderr)
        return 2
    if a.embedded:
        return _cmd_generate_embedded(a)
    from pdserve.client import Client

    prompt = a.prompt if a.no_chat else [{"role": "user", "content": a.prompt}]
    with Client(a.address, timeout=a.timeout, api_key=a.api_key or None, **client_tls_kwargs(a)) as c:
        fin = None
        for ch in c.generate(
            prompt,
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            seed=a.seed,
            adapter=a.adapter,
            model=a.model_id,
        ):
            sys.stdout.write(ch.text)
            sys.stdout.flush()
            fin = ch.finish or fin
    sys.stdout.write("\n")
    if fin is not None:
        print(
            f"[{fin.completion_tokens} tokens, TTFT {fin.ttft_s * 1000:.0f} ms, e2e {fin.e2e_s:.2f} s, "
            f"cached prompt tokens {fin.cached_prompt_tokens}, finish {fin.reason}]",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for a prompt")
    g.add_argument(
        "prompt", nargs="?", default=None, help="the prompt (sent through the chat template unless --no-chat)"
    )
    g.add_argument("--embedded", action="store_true", help="run the engine in this process (no server)")
    og = g.add_argument_group("offline jobs and offloading (with --embedded)")
    og.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="with --embedded, instead of PROMPT: run every line of FILE (blank lines skipped) as one "
        "offline job, a progress bar on stderr and one JSON line per prompt on stdout, in order",
    )
    og.add_argument("--no-progress", action="store_true", help="with --prompts-file: no progress bar")
    og.add_argument(
        "--weight-budget-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="with --embedded: device memory the weights may use (weight offloading: layers beyond it "
        "are kept in host memory and copied in ahead of use) (default: all weights resident)",
    )
    offload_knobs.add_flags(og, "with --embedded: ")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="router address (see `pdserve serve`)")
    g.add_argument(
        "--timeout", type=positive_seconds, default=None, help="deadline in seconds (default: none)"
    )
    g.add_argument(
        "--model-id",
        default="",
        help="the served model to ask for (its id, e.g. a folder name; a router serving several base "
        "models needs it) (default: the router's only model)",
    )
    g.add_argument(
        "--adapter",
        default="",
        help="LoRA adapter to generate with (a name the cluster serves: `pdserve serve --lora NAME=PATH`; "
        "with --embedded, give --lora NAME=PATH too) (default: the base model)",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="with --embedded: serve this PEFT LoRA adapter folder under NAME (repeatable)",
    )
    _engine_args(g)
    _sampling_args(g)
    add_client_tls_args(g)
    g.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY", ""),
        help="API key for a router started with --api-keys (sent as `authorization: Bearer KEY`) "
        "(default: $PDSERVE_API_KEY, else none)",
    )
    g.set_defaults(func=_cmd_generate)

    sv = sub.add_parser(
        "serve", help="run router + prefill + decode + KV store on 127.0.0.1 (embedded default)"
    )
    sv.add_argument(
        "--model",
        default=None,
        action="append",
        help="HF Llama-family folder (default: bundled SmolLM2-135M-Instruct); repeat to serve several "
        "base models (each with its own workers and store node; requests name the model by its folder name)",
    )
    sv.add_argument("--address", default=DEFAULT_ADDRESS, help="router listen address (127.0.0.1:PORT)")
    sv.add_argument(
        "--prefill", default="1", help="prefill workers per model, or one count per --model (e.g. 1,2)"
    )
    sv.add_argument(
        "--decode", default="1", help="decode workers per model, or one count per --model (e.g. 1,2)"
    )
    sv.add_argument(
        "--routers",
        type=int,
        default=1,
        help="routers (the first on --address, the others on free ports); workers register with all, "
        "a router that exits is restarted",
    )
    sv.add_argument("--kv-blocks", type=positive_int, default=2048, help="KV pool size per worker, in blocks")
    sv.add_argument(
        "--swap-space",
        type=non_negative_gib,
        default=0.0,
        metavar="GIB",
        help="host-memory KV pool per worker in GiB: preempted requests are swapped out and back when "
        "cheaper than recomputing (0: always recompute)",
    )
    sv.add_argument(
        "--swap-disk",
        type=non_negative_gib,
        default=0.0,
        metavar="GIB",
        help="local-disk KV tier per worker in GiB behind the host pool (needs --swap-space): the "
        "swapped-out KV of the coldest requests spills to checksummed segment files when the host "
        "pool is full (0: off)",
    )
    sv.add_argument(
        "--swap-disk-dir",
        default=None,
        metavar="DIR",
        help="folder of the --swap-disk segment files (default: the system's temp folder)",
    )
    sv.add_argument(
        "--scheduling-policy",
        choices=[p.value for p in SchedulingPolicy],
        default=None,
        help="engine queue order on every worker: priority (then arrival), fcfs, or mlfq (FastServe's "
        "skip-join multi-level feedback queue) (default: the workers' default, priority)",
    )
    mlfq_knobs.add_flags(sv, "the workers' default")  # forwarded to every worker
    sv.add_argument(
        "--weight-budget-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory each worker's weights may use (weight offloading: layers beyond it are kept "
        "in host memory and copied in ahead of use) (default: all weights resident)",
    )
    offload_knobs.add_flags(sv, "every worker: ")  # forwarded to every worker
    sv.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve the PEFT LoRA adapter folder PATH under NAME on every worker (repeatable); "
        "requests name it as their adapter (OpenAI: model field)",
    )
    sv.add_argument(
        "--policy",
        default="",
        help="router placement: goodput (default) | least_loaded | random | round_robin | cache_aware | colocated",
    )
    sv.add_argument(
        "--kv-stream",
        choices=("off", "grpc", "store"),
        default="off",
        help="the routers' chunk-wise KV streaming from prefill to decode (python -m router --kv-stream)",
    )
    sv.add_argument(
        "--direct-streams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decode workers stream tokens straight to SDK and OpenAI-server clients, the routers out "
        "of the token path (default: on; a cluster of several models relays); --no-direct-streams: "
        "every token relayed by a router",
    )
    sv.add_argument("--index", default="memory", help="KV index: memory | redis://127.0.0.1:PORT/0")
    sv.add_argument(
        "--tls",
        nargs="?",
        const="on",
        choices=["on", "off"],
        default=os.environ.get("PDSERVE_TLS") or None,
        help="required choice: on (or a bare --tls): every process with TLS, mutual TLS between them "
        "and a cluster token; certificates from --pki-dir, else a development CA made in a "
        "temporary folder. off: plaintext on 127.0.0.1 (development only) (env PDSERVE_TLS) "
        "(default: %(default)s)",
    )
    sv.add_argument(
        "--pki-dir",
        default="",
        help="with --tls: a `pdserve certs` folder to use (default: %(default)r: a fresh dev CA)",
    )
    sv.add_argument(
        "--api-keys",
        default="",
        help="API key store for the router (a `pdserve keys` YAML/JSON file or redis:// URL); clients "
        "then need `authorization: Bearer KEY` (default: %(default)r: loopback dev mode, no keys)",
    )
    sv.add_argument(
        "--openai-port",
        type=port_number,
        default=None,
        help="also serve the OpenAI HTTP API on this port (0: any free): HTTPS with the cluster's "
        "certificate under --tls on, plain HTTP on 127.0.0.1 under --tls off (default: %(default)s: no)",
    )
    sv.set_defaults(func=_cmd_serve)

    s = sub.add_parser("setup", help="convert the bundled default model once (into the cache)")
    s.set_defaults(
        func=lambda a: (print(__import__("pdserve.model_setup").model_setup.ensure_default_model()), 0)[1]
    )

    from pdserve import bench_cli, certs, ray_cli
    from pdserve.openai_api import cli as openai_cli

    certs.register(sub)
    ray_cli.register(sub)
    bench_cli.register(sub)
    openai_cli.register(sub)
    from pdserve import keys_cli  # `pdserve keys`: API keys and tenant limits

    keys_cli.register(sub)
    from pdserve import drain_cli  # `pdserve drain WORKER`: live-migrate a worker's requests off it

    drain_cli.register(sub)
    from pdserve import adapters_cli  # `pdserve adapters load NAME=PATH`: LoRA adapters at run time

    adapters_cli.register(sub)
    try:
        from simulator import cli as sim_cli
    except ImportError:
        sim_cli = None
    if sim_cli is not None and hasattr(sim_cli, "register"):
        sim_cli.register(sub)
    return cli_help.apply(ap)


def nobody_there_hint(a: argparse.Namespace, e: PdserveError) -> str:
    """What to do when no router listens where a command sent its request (a new user's first
    `pdserve generate`): start a cluster, or point --address at one; `generate` can also run the
    engine in this process. Empty for any other error."""
    if not isinstance(e, UnavailableError) or "failed to connect" not in str(e).lower():
        return ""
    where = getattr(a, "address", "") or "that address"
    hint = f"is a cluster running at {where}? start one with `pdserve serve`, or give its router's --address"
    cmd = getattr(a, "command", "")
    if cmd == "generate":
        hint += "; or run the engine in this process: `pdserve generate --embedded PROMPT`"
    elif cmd == "bench":
        hint += "; or launch a cluster for the run: `pdserve bench --embedded`"
    return hint


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except PdserveError as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        hint = nobody_there_hint(a, e)
        if hint:
            print(f"pdserve: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
