"""Shared fixtures: the real default model and tiny random-weight HF models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gRPC's fork support (on by default in grpcio) runs a post-fork handler in every forked child that
# aborts in about one fork in ten while an aio channel is live; Ray forks its gcs_server and raylets
# from the test process with a preexec_fn, and lost them so (tests/unit/test_grpc_fork_safety.py).
# Set before anything imports grpc.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
# The tests' processes (in-process servers and channels, and the subprocesses they start) serve
# plaintext on 127.0.0.1, chosen explicitly: pdserve never falls back to plaintext by itself
# (pdserve/security.py). Tests of TLS pass their certificates as flags or explicit configs.
os.environ["PDSERVE_TLS"] = "off"
# Workers launched by tests skip the start-up step-time profile (engine/profile.py: up to ~15 s per
# worker and per model folder, and most tests' tiny models live in fresh temporary folders); its
# tests (tests/unit/test_startup_profile.py, test_policy_worker_profile.py) turn it on themselves.
os.environ.setdefault("PDSERVE_STARTUP_PROFILE", "off")

SHARED_DATA = Path(
    os.environ.get("PDSERVE_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for it in items:
        if "gpu" in it.keywords:
            it.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    from pdserve.model_setup import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight Llama / Qwen2 (QKV bias) / Mistral / Llama-3-rope models saved as HF folders."""
    from tests.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny"))
