"""Atomic training checkpoints and random-number-generator state.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00001200/`` holding

    state.pt        trained modules' state_dict, optimisers, schedulers, AMP scaler, progress
                    (optimiser step, epoch, batch within the epoch), written by the main process
    rng-<rank>.pt   Python, NumPy, torch (and CUDA) generator states of each process

It is written into ``.tmp-step-...`` in the same directory and renamed into place once complete, so
a crash never leaves a half-written checkpoint under a valid name. Everything is stored as tensors,
numbers, strings, lists and dicts, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import KDConfigError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every global generator's state, as tensors and numbers."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class preserved_rng:
    """Context manager: whatever runs inside leaves every global generator as it found it."""

    def __enter__(self):
        self._python, self._numpy, self._torch = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return self

    def __exit__(self, *exc):
        random.setstate(self._python)
        np.random.set_state(self._numpy)
        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        return False


# ---------------------------------------------------------------------------------- directories


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.pt").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    state: Callable[[], dict[str, Any]],
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    keep: int | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write ``step-<step>`` atomically; ``state()`` is called on the main process only.

    Every process writes its own ``rng-<rank>.pt`` (``rng``, or the generators' current state);
    ``barrier`` synchronises the processes (a no-op for one process). Older checkpoints beyond the
    ``keep`` most recent are removed.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng if rng is not None else rng_state(), tmp / f"rng-{rank}.pt")
    if is_main:
        torch.save(state(), tmp / "state.pt")
    barrier()
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(state, rng)`` of a checkpoint; ``rng`` is ``None`` when no file exists for this rank."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise KDConfigError(f"{str(path)!r} is not a checkpoint (no state.pt); give a step-... directory to resume from")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=True) if rng_file.is_file() else None
    return state, rng


__all__ = [
    "rng_state", "set_rng_state", "preserved_rng", "checkpoint_root", "list_checkpoints", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "CHECKPOINT_DIR",
]
