"""bench/llama_cpp_peer.py, the cached bench step that makes bench/engine_bound.py's llama.cpp peer:
its cache paths, the "already built" check, the refusals naming what is missing or failed, the
atomic build (a failed one leaves nothing that looks built), and the fp32 GGUF writer (same
de-quantised values, metadata kept) with its check against pdserve's weights. Nothing is
downloaded: pip and cmake are replaced by fakes."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench import llama_cpp_peer as peer


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PDSERVE_LLAMA_CPP", raising=False)
    return tmp_path / "cache"


def _fake_built(src: Path, stamp: dict | None = None) -> None:
    libs = peer.lib_dir(src)
    libs.mkdir(parents=True, exist_ok=True)
    for name in peer.LIBS:
        (libs / name).write_bytes(b"")
    if stamp is not None:
        (src / peer.STAMP).write_text(json.dumps(stamp))


def _exe(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _no_subprocess(*a, **k):
    raise AssertionError(f"unexpected subprocess: {a}")


def test_paths_follow_pdserve_cache(cache, monkeypatch):
    assert peer.peer_root() == cache / "llama_cpp"
    assert peer.default_src() == cache / "llama_cpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    assert peer.default_gguf() == cache / "llama_cpp" / "smollm2-135m-f32.gguf"
    assert peer.lib_dir(peer.default_src()) == peer.default_src() / "build" / "bin"
    monkeypatch.setenv("PDSERVE_LLAMA_CPP", "/elsewhere/llama.cpp")
    assert peer.default_src() == Path("/elsewhere/llama.cpp")


def test_engine_bound_defaults_and_no_peer_flag(cache):
    from bench import engine_bound

    a = engine_bound.build_parser().parse_args([])
    assert a.llama_cpp == peer.default_src() and a.gguf == peer.default_gguf()
    assert a.no_peer is False
    assert engine_bound.build_parser().parse_args(["--no-peer"]).no_peer is True


def test_library_missing_names_what_is_missing(cache):
    src = peer.default_src()
    assert "libllama.so does not exist" in peer.library_missing(src)
    _fake_built(src)
    (peer.lib_dir(src) / "libggml-base.so").unlink()
    assert "libggml-base.so does not exist" in peer.library_missing(src, require_stamp=False)
    _fake_built(src)
    # a hand-made build (no stamp) is accepted only when the stamp is not required
    assert peer.library_missing(src, require_stamp=False) is None
    assert "not built by this module" in peer.library_missing(src)
    _fake_built(src, {"version": peer.VERSION, "cpu": "some other CPU"})
    assert "another CPU" in peer.library_missing(src)
    _fake_built(src, {"version": "0.3.1", "cpu": peer._cpu_key()})
    assert "0.3.1" in peer.library_missing(src)
    _fake_built(src, {"version": peer.VERSION, "cpu": peer._cpu_key()})
    assert peer.library_missing(src) is None


def test_already_built_runs_nothing(cache, monkeypatch):
    src = peer.default_src()
    _fake_built(src, {"version": peer.VERSION, "cpu": peer._cpu_key()})
    peer.default_gguf().write_bytes(b"GGUF")
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setenv("PATH", "")  # no tools needed either
    assert peer.ensure_peer() == (src, peer.default_gguf())


def test_missing_cmake_is_named_before_any_download(cache, tmp_path, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    with pytest.raises(peer.PeerBuildError, match="no cmake") as e:
        peer.ensure_peer()
    assert "C compiler" in str(e.value) and "--no-peer" in str(e.value)
    assert not list(peer.peer_root().glob(f"{peer.SDIST_DIR}*"))


def test_missing_compiler_is_named(cache, tmp_path, monkeypatch):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _exe(bin_ / "cmake", "exit 0")
    _exe(bin_ / "make", "exit 0")
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(peer.PeerBuildError) as e:
        peer.check_build_tools()
    msg = str(e.value)
    assert "no C compiler" in msg and "C++ compiler" in msg and "cmake (" not in msg


def _fake_tools(bin_: Path) -> None:
    bin_.mkdir(exist_ok=True)
    for name in ("cc", "c++", "make"):
        _exe(bin_ / name, "exit 0")


def test_download_failure_is_named_and_leaves_nothing(cache, tmp_path, monkeypatch):
    _fake_tools(tmp_path / "bin")
    _exe(tmp_path / "bin" / "cmake", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(peer.PeerBuildError, match="pip download llama-cpp-python==0.3.36") as e:
        peer.ensure_peer()
    assert "No matching distribution" in str(e.value)
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "--no-binary" in calls[0]
    left = {p.name for p in peer.peer_root().iterdir()}
    assert left <= {".lock"}, left  # no tarball, no temporary download folder, nothing built


def _fake_sdist(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / f"{peer.SDIST_DIR}.tar.gz", "w:gz") as tf:
        data = b"cmake_minimum_required(VERSION 3.14)\n"
        info = tarfile.TarInfo(f"{peer.SDIST_DIR}/vendor/llama.cpp/CMakeLists.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def test_failed_build_leaves_no_half_built_cache(cache, tmp_path, monkeypatch):
    _fake_tools(tmp_path / "bin")
    # configure succeeds; the compile writes one library and then fails
    _exe(
        tmp_path / "bin" / "cmake",
        'if [ "$1" = "--build" ]; then mkdir -p "$2/bin" && : > "$2/bin/libllama.so"; '
        'echo "error: boom in ggml.c"; exit 2; fi; exit 0',
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _fake_sdist(peer.peer_root())
    with pytest.raises(peer.PeerBuildError, match="compiling llama.cpp failed") as e:
        peer.ensure_peer()
    assert "boom in ggml.c" in str(e.value)
    assert (peer.peer_root() / "build.log").is_file()  # the log outlives the staging folder
    assert peer.library_missing(peer.default_src()) is not None
    assert not (peer.peer_root() / peer.SDIST_DIR).exists()
    assert not list(peer.peer_root().glob(".stage-*"))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to make a loadable stand-in library")
def test_successful_build_is_renamed_into_place_stamped_and_loaded(cache, tmp_path, monkeypatch):
    gcc = shutil.which("gcc")
    _fake_tools(tmp_path / "bin")
    # the fake build makes real (empty) shared libraries, so the post-build load check runs for real
    libs = " ".join(peer.LIBS)
    _exe(
        tmp_path / "bin" / "cmake",
        f'if [ "$1" = "--build" ]; then mkdir -p "$2/bin" && for l in {libs}; do '
        f'echo "int x;" | {gcc} -shared -fPIC -x c - -o "$2/bin/$l" || exit 1; done; fi; exit 0',
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
    _fake_sdist(peer.peer_root())
    src = peer.build_library(peer.peer_root(), jobs=1)
    assert src == peer.default_src()
    assert peer.library_missing(src) is None  # stamped for this version and CPU
    assert json.loads((src / peer.STAMP).read_text())["version"] == peer.VERSION
    assert not list(peer.peer_root().glob(".stage-*"))
    log = (peer.peer_root() / "build.log").read_text()
    assert "-DBUILD_SHARED_LIBS=ON" in log and "-DLLAMA_BUILD_TESTS=OFF" in log and "--target llama" in log


def _small_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf
    from gguf import quants

    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    n = rng.standard_normal(64).astype(np.float32)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_block_count(1)
    w.add_token_list(["<s>", "a", "b"])
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_tensor("blk.0.attn_v.weight", quants.quantize(q, gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    w.add_tensor("blk.0.attn_norm.weight", n)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"q": q, "n": n}


def test_fp32_gguf_has_the_dequantised_values_and_the_metadata(tmp_path):
    import gguf

    src, out = tmp_path / "q8.gguf", tmp_path / "f32.gguf"
    orig = _small_gguf(src)
    peer.write_fp32_gguf(src, out)
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert [t.name for t in r_out.tensors] == [t.name for t in r_src.tensors]
    for a, b in zip(r_src.tensors, r_out.tensors, strict=True):
        assert b.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(b.shape) == list(a.shape)
        np.testing.assert_array_equal(
            np.asarray(b.data).reshape(-1), gguf.dequantize(a.data, a.tensor_type).reshape(-1)
        )
    v = gguf.dequantize(r_src.tensors[0].data, r_src.tensors[0].tensor_type)
    assert 0 < np.abs(v - orig["q"]).max() < 0.05  # it was quantised: the copy keeps the quantised values
    assert r_out.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert r_out.fields["general.architecture"].contents() == "llama"
    assert r_out.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "b"]
    assert r_out.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert r_out.fields["llama.block_count"].contents() == 1


def test_fp32_gguf_failure_leaves_no_file(tmp_path, monkeypatch):
    import gguf

    src, out = tmp_path / "q8.gguf", tmp_path / "f32.gguf"
    _small_gguf(src)

    def broken(data, qtype):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf, "dequantize", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        peer.write_fp32_gguf(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]


def test_permute_is_the_inverse_of_transformers_gguf_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    for heads in (1, 2, 3, 6):
        assert not np.array_equal(peer._permute(w, heads), w) or heads == 6
        np.testing.assert_array_equal(undo(peer._permute(w, heads), heads, heads), w)


def _model_and_gguf(tmp_path: Path, heads: int = 2, kv_heads: int = 1) -> tuple[Path, Path]:
    import gguf
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    hid, hd = 8, 4
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((10, hid)),
        "model.norm.weight": rng.standard_normal(hid),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((heads * hd, hid)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * hd, hid)),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hid),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    model = tmp_path / "model"
    model.mkdir()
    save_file(hf, str(model / "model.safetensors"))
    (model / "config.json").write_text(
        json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    )
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    w.add_tensor("blk.0.attn_q.weight", peer._permute(hf["model.layers.0.self_attn.q_proj.weight"], heads))
    w.add_tensor("blk.0.attn_k.weight", peer._permute(hf["model.layers.0.self_attn.k_proj.weight"], kv_heads))
    w.add_tensor("blk.0.attn_norm.weight", hf["model.layers.0.input_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, path


def test_compare_with_model_accepts_equal_weights_and_names_a_difference(tmp_path):
    from safetensors.numpy import load_file, save_file

    model, g = _model_and_gguf(tmp_path)
    assert peer.compare_with_model(g, model) == 5
    hf = load_file(str(model / "model.safetensors"))
    hf["model.layers.0.self_attn.k_proj.weight"][3, 2] += 1e-6
    save_file(hf, str(model / "model.safetensors"))
    with pytest.raises(peer.PeerBuildError, match=r"blk\.0\.attn_k\.weight differs"):
        peer.compare_with_model(g, model)


def test_compare_with_model_catches_an_unpermuted_projection(tmp_path):
    # the same values in HF row order (no rotary permutation) are not pdserve's weights to llama.cpp
    model, g = _model_and_gguf(tmp_path, heads=2, kv_heads=2)
    from safetensors.numpy import load_file, save_file

    hf = load_file(str(model / "model.safetensors"))
    hf["model.layers.0.self_attn.q_proj.weight"] = peer._permute(
        hf["model.layers.0.self_attn.q_proj.weight"], 2
    )
    save_file(hf, str(model / "model.safetensors"))
    with pytest.raises(peer.PeerBuildError, match=r"attn_q\.weight differs"):
        peer.compare_with_model(g, model)
