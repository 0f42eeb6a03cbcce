"""Checkpoints that load with ``torch.load(weights_only=True)``, written atomically.

Everything stored is a tensor, a number, a string, ``None`` or a list/dict of those: configs
travel as JSON strings and random-number-generator states as tensors. Nothing is pickled, so
opening a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medgen.errors import InputError

CHECKPOINT_FORMAT = "medgen-checkpoint"
MODEL_FORMAT = "medgen-model"
FORMAT_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain numbers."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(py_version),
        "python_state": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_cached),
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(
        (
            int(state["python_version"]),
            tuple(int(v) for v in state["python_state"].tolist()),
            state["python_gauss"],
        )
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            int(state["numpy_pos"]),
            int(state["numpy_has_gauss"]),
            float(state["numpy_cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda_states])


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` with ``torch.save`` under a temporary name, then rename it into place.

    A crash mid-write leaves the previous checkpoint intact.
    """
    from medgen.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(path, weights_only=True)`` only.

    Raises
    ------
    InputError
        If the file is missing, is not a torch file, or holds anything beyond tensors and
        plain containers (``weights_only`` refuses to unpickle it).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(path, f"not a loadable medgen checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, MODEL_FORMAT):
        raise InputError(path, "not a medgen checkpoint (no 'format' entry)")
    if int(payload.get("version", 0)) > FORMAT_VERSION:
        raise InputError(
            path, f"checkpoint format version {payload.get('version')} is newer than this medgen"
        )
    return payload
