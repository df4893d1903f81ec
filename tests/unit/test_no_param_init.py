"""engine.models.no_init: the CPU loader builds modules without initialising their parameters.

Checked: the skip holds on the entering thread only (a module built on another thread meanwhile
is initialised as usual), it nests and ends, a model loaded this way equals the checkpoint
tensor for tensor, a checkpoint lacking a weight is still refused, a CPU load no longer
imports torch._dynamo (the start-up time it cost), and the skip survives transformers'
``no_init_weights`` putting torch's own init functions back.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models.loader import load_model
from engine.models.no_init import skip_param_init

ROOT = Path(__file__).resolve().parents[2]


def _sentinel() -> torch.Tensor:
    return torch.full((4, 4), 7.0)


def test_skip_leaves_tensors_and_ends_with_the_block() -> None:
    t = _sentinel()
    with skip_param_init():
        torch.nn.init.normal_(t)
        torch.nn.init.kaiming_uniform_(t)
        with skip_param_init():  # nested
            torch.nn.init.zeros_(t)
        torch.nn.init.ones_(t)  # still inside the outer block
    assert torch.equal(t, _sentinel())
    torch.nn.init.zeros_(t)  # outside: initialised again
    assert torch.equal(t, torch.zeros(4, 4))


def test_skip_is_per_thread() -> None:
    entered, built = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def other() -> None:
        entered.wait(10)
        t = _sentinel()
        torch.nn.init.zeros_(t)  # this thread never entered the block: initialised
        seen["other"] = t
        built.set()

    th = threading.Thread(target=other)
    th.start()
    with skip_param_init():
        entered.set()
        assert built.wait(10)
        mine = _sentinel()
        torch.nn.init.zeros_(mine)
    th.join(10)
    assert torch.equal(seen["other"], torch.zeros(4, 4))
    assert torch.equal(mine, _sentinel())


def test_a_module_built_under_it_is_not_initialised() -> None:
    torch.manual_seed(0)
    with skip_param_init():
        a = torch.nn.Linear(64, 64)
    torch.manual_seed(0)
    b = torch.nn.Linear(64, 64)  # the same seed, initialised: differs from a's raw memory
    torch.manual_seed(0)
    c = torch.nn.Linear(64, 64)
    assert torch.equal(b.weight, c.weight)
    assert not torch.equal(a.weight, b.weight)


@pytest.fixture(scope="module")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


def test_cpu_load_equals_the_checkpoint(llama_dir) -> None:
    model = load_model(llama_dir, torch.float32, torch.device("cpu"), fuse=False)
    params = dict(model.named_parameters())
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    assert ckpt
    for name, t in ckpt.items():
        assert name in params, name
        assert torch.equal(params[name], t), name


def test_a_checkpoint_missing_a_weight_is_refused(llama_dir, tmp_path) -> None:
    d = tmp_path / "partial"
    d.mkdir()
    for f in llama_dir.iterdir():
        if f.suffix == ".json":
            (d / f.name).write_bytes(f.read_bytes())
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    dropped = next(n for n in ckpt if n.endswith("mlp.down_proj.weight"))
    save_file({n: t for n, t in ckpt.items() if n != dropped}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="checkpoint is missing weights"):
        load_model(d, torch.float32, torch.device("cpu"))


def test_a_cpu_load_does_not_import_dynamo(llama_dir) -> None:
    code = (
        "import sys, torch\n"
        "from engine.models.loader import load_model\n"
        f"load_model({str(llama_dir)!r}, torch.float32, torch.device('cpu'))\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


_SWAPPED_OUT = """
import threading, torch
from transformers.initialization import no_init_weights
from engine.models.no_init import skip_param_init

entered, release = threading.Event(), threading.Event()

def other():
    with no_init_weights():  # saves torch's own functions, sets no-ops
        entered.set()
        release.wait(30)

th = threading.Thread(target=other)
th.start()
assert entered.wait(30)
with skip_param_init():  # our first wrap, while transformers' no-ops are in place
    pass
release.set()
th.join(30)  # transformers restores the functions it found: torch's own, our wrappers gone
t = torch.full((4, 4), 7.0)
with skip_param_init():
    torch.nn.init.zeros_(t)
print("skipped" if torch.equal(t, torch.full((4, 4), 7.0)) else "initialised")
torch.nn.init.zeros_(t)
print("outside", "zeros" if torch.equal(t, torch.zeros(4, 4)) else "unchanged")
"""


def test_the_skip_survives_transformers_restoring_the_init_functions() -> None:
    """transformers' ``no_init_weights`` on another thread, entered before our first wrap, puts
    torch's own ``torch.nn.init`` functions back when it exits: the next ``skip_param_init``
    wraps them again (before, the skip silently stopped for the rest of the process). A fresh
    process: the first wrap must happen inside transformers' block."""
    out = subprocess.run(
        [sys.executable, "-c", _SWAPPED_OUT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.split() == ["skipped", "outside", "zeros"], out.stdout + out.stderr


def test_the_cpu_loader_builds_the_model_under_the_skip(llama_dir, monkeypatch) -> None:
    import contextlib

    import engine.models.loader as loader

    entered: list[int] = []
    real = loader.skip_param_init

    @contextlib.contextmanager
    def counted():
        entered.append(1)
        with real():
            yield

    monkeypatch.setattr(loader, "skip_param_init", counted)
    load_model(llama_dir, torch.float32, torch.device("cpu"))
    assert entered == [1]
