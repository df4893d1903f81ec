"""A model that cannot be loaded fails at once, with the loader's message: ``python -m
prefill_worker|decode_worker`` exits non-zero, the launcher (``pdserve serve``) raises as soon as a
worker exits before its ready line instead of waiting out the start-up timeout.

Bad models: a missing folder, a config.json of an unsupported ``model_type``, and a folder whose
config and tokenizer are fine (so the store and router start) but whose weights are not a
safetensors file (so only the workers fail, after the other processes are up).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.errors import InvalidRequestError, ModelNotFoundError, UnavailableError
from pdserve.launcher import ClusterSpec, launch

ROOT = Path(__file__).resolve().parents[2]
# far above how long a failing start takes: a test that waited for it would show in the elapsed time
STARTUP_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def unsupported_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return d


@pytest.fixture(scope="module")
def corrupt_weights(smollm_path, tmp_path_factory) -> Path:
    """The bundled model's config, tokenizer and chat template, with garbage for weights."""
    d = tmp_path_factory.mktemp("corrupt")
    for f in smollm_path.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, d / f.name)
    (d / "model.safetensors").write_bytes(b"\xff" * 4096)
    return d


def _worker(module: str, model: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, "--worker-id", "w0", "--model", str(model), "--store", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )


def test_prefill_worker_with_a_missing_model_exits_nonzero_naming_it(tmp_path):
    missing = tmp_path / "missing"
    r = _worker("prefill_worker", missing)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"python -m prefill_worker: error: cannot load model '{missing}': no config.json" in r.stderr
    assert "Traceback" not in r.stderr  # one message, not a stack dump
    assert r.stdout == ""  # no ready line


def test_decode_worker_with_an_unsupported_model_type_exits_nonzero_naming_it(unsupported_model):
    r = _worker("decode_worker", unsupported_model)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "python -m decode_worker: error: cannot load model" in r.stderr
    assert "model_type 'gpt2' is not supported" in r.stderr
    assert r.stdout == ""


def test_worker_with_corrupt_weights_exits_nonzero_with_the_loaders_message(corrupt_weights):
    r = _worker("prefill_worker", corrupt_weights)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "python -m prefill_worker: error: cannot load model" in r.stderr
    assert "SafetensorError" in r.stderr


def test_launch_refuses_missing_and_unsupported_models_before_starting_anything(tmp_path, unsupported_model):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        launch(ClusterSpec(model_path=str(tmp_path / "missing"), startup_timeout_s=STARTUP_TIMEOUT_S))
    with pytest.raises(InvalidRequestError, match="model_type 'gpt2' is not supported"):
        launch(ClusterSpec(model_path=str(unsupported_model), startup_timeout_s=STARTUP_TIMEOUT_S))


def test_launch_fails_as_soon_as_a_worker_dies_before_its_ready_line(corrupt_weights):
    """Store and router start (config and tokenizer are fine); the workers die loading the weights:
    launch raises at once, naming the first worker seen exiting (prefill-0 and decode-0 start side
    by side), its exit status and the loader's message."""
    spec = ClusterSpec(
        model_path=str(corrupt_weights),
        store_capacity_blocks=16,
        worker_kv_blocks=16,
        startup_timeout_s=STARTUP_TIMEOUT_S,
    )
    t0 = time.monotonic()
    with pytest.raises(UnavailableError) as ei:
        launch(spec)
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert re.search(r"(prefill|decode)-0 exited with status 1 before it was ready", msg), msg
    assert "cannot load model" in msg and "SafetensorError" in msg
    assert "did not start within" not in msg
    assert elapsed < STARTUP_TIMEOUT_S / 4, elapsed  # not the timeout


def test_pdserve_serve_with_corrupt_weights_exits_with_the_loaders_message(corrupt_weights):
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "serve",
            "--model",
            str(corrupt_weights),
            "--address",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        cwd=ROOT,
        check=False,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    first_error = next(line for line in r.stderr.splitlines() if line.startswith("pdserve: error:"))
    assert re.search(r"(prefill|decode)-0 exited with status 1 before it was ready", first_error), first_error
    assert "cannot load model" in first_error and "SafetensorError" in first_error
    assert elapsed < STARTUP_TIMEOUT_S / 4, elapsed


@pytest.mark.slow
def test_pdserve_up_fails_at_once_when_a_worker_actor_cannot_load_the_model(corrupt_weights, tmp_path):
    """``pdserve up`` (the CLI, its own Ray driver) on a model whose weights cannot be loaded:
    stores and router start, the worker actors' construction fails, and ``up`` reports the
    loader's message at once (Ray does not restart an actor whose ``__init__`` raised) instead of
    waiting out ``startup_timeout_s``; it leaves no controller behind."""
    import yaml

    from pdserve import ray_cluster
    from tests.ray_harness import run_cli, two_node_cluster

    ns = "pdserve-fail-fast"
    cfg = {
        "model": str(corrupt_weights),
        "host": "127.0.0.1",
        "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
        "namespace": ns,
        "prefill": {"count": 1, "num_cpus": 1, "kv_blocks": 16},
        "decode": {"count": 1, "num_cpus": 1, "kv_blocks": 16},
        "store": {"capacity_blocks": 16},
        "startup_timeout_s": STARTUP_TIMEOUT_S,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with two_node_cluster(ns) as (c, env):
        t0 = time.monotonic()
        r = run_cli(["up", "--config", str(path), "--address", c.address], env, timeout=STARTUP_TIMEOUT_S)
        elapsed = time.monotonic() - t0
        assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
        err = next(line for line in r.stderr.splitlines() if line.startswith("pdserve: error:"))
        assert (
            "prefill-0 failed to start: prefill-0 cannot load model" in err
            or "decode-0 failed to start: decode-0 cannot load model" in err
        ), err
        assert "SafetensorError" in err and "pdserve.errors" not in err, err
        assert elapsed < STARTUP_TIMEOUT_S / 4, elapsed
        assert ray_cluster.controller(ns) is None
