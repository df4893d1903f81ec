"""Where the shared data sets live: ``$PDSERVE_DATA`` or ``<repo>/../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

_DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def data_dir() -> Path:
    """Root of the data sets (``mooncake/``, ``azure_llm_2023/``, ``vidur/``, ``distserve/``)."""
    env = os.environ.get("PDSERVE_DATA")
    return Path(env) if env else _DEFAULT.resolve()


def data_path(*parts: str) -> Path:
    """Path of a file under :func:`data_dir`; raises ``FileNotFoundError`` naming the override."""
    p = data_dir().joinpath(*parts)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found (set PDSERVE_DATA to the shared data directory)")
    return p
