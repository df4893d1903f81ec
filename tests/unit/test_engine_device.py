"""engine.device.checked_device: a device this process cannot use is refused before the model
loads, naming it (`pdserve generate --embedded --device cuda` on a CPU-only torch died in
Module.to with torch's AssertionError traceback)."""

from __future__ import annotations

import pytest
import torch

from engine.device import checked_device
from pdserve.errors import InvalidRequestError


def test_cpu_is_a_device() -> None:
    assert checked_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    "name, says",
    [("bogus", "is not a torch device"), ("mps", "runs on cpu or cuda, not mps"), ("meta", "not meta")],
)
def test_not_an_engine_device(name, says) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        checked_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_refused_by_name() -> None:
    with pytest.raises(InvalidRequestError, match="device 'cuda:1'") as e:
        checked_device("cuda:1")
    assert "--device cpu" in str(e.value)


def test_generate_embedded_on_a_device_it_cannot_use_is_one_error_line(capsys, smollm_path) -> None:
    from pdserve.cli import main

    rc = main(["generate", "--embedded", "--model", str(smollm_path), "--device", "mps", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and "device 'mps': the engine runs on cpu or cuda" in err and "Traceback" not in err, err
