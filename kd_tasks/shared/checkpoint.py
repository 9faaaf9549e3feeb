"""Atomic, verifiable training checkpoints, the run's identity, and random-number-generator state.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00001200/`` holding

    state.pt        trained modules' state_dict, optimisers, schedulers, AMP scaler, progress
                    (optimiser step, epoch, batch within the epoch), written by the main process
    rng-<rank>.pt   Python, NumPy, torch (and CUDA) generator states of each process
    manifest.json   the step, the sha256 and size of every file above, and the run's identity

Saving is atomic: every file is written into ``.tmp-step-...`` and fsynced, the manifest last; the
directory is fsynced, then renamed into place (a checkpoint of the same step already there is first
renamed aside and removed only once the new one is in place; the parent directory is fsynced). A
crash therefore never leaves a half-written checkpoint under a valid name, and never loses the one
that was there.

Loading verifies the manifest's hashes: :func:`load_checkpoint` names the damaged file, and
:func:`load_latest_intact` falls back to the newest intact checkpoint with a warning.

The run's identity (:func:`check_identity`) is a mapping ``part -> fingerprint`` (student
architecture, its initial weights, the teacher's weights, the recipe, the data, the training
settings); resuming a checkpoint whose identity differs is refused, naming the part.

Everything is stored as tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .errors import CheckpointError, KDConfigError, OutputDirInUseError, RunMismatchError

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

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


# ---------------------------------------------------------------------------------- files


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (its entries: created / renamed files); a no-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: temporary file, fsync, rename over, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes_durably(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- directories


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def _recover_replaced(root: Path) -> None:
    """A crash between renaming an old checkpoint aside and renaming its replacement into place leaves
    ``.replaced-step-N-*`` without ``step-N``: put it back."""
    for p in root.glob(".replaced-step-*"):
        m = re.match(r"^\.replaced-(step-\d+)-\d+$", p.name)
        if m and not (root / m.group(1)).exists():
            try:
                os.replace(p, root / m.group(1))
                logger.warning("restored checkpoint %s (a save of the same step was interrupted)", root / m.group(1))
            except OSError:
                pass


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first (not verified: see :func:`verify_checkpoint`)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    _recover_replaced(root)
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
    identity: Mapping[str, str] | None = None,
) -> Path:
    """Write ``step-<step>`` atomically; ``state()`` is called on the main process only.

    Every process writes its own ``rng-<rank>.pt`` (``rng``, or the generators' current state);
    ``barrier`` synchronises the processes (a no-op for one process). The main process writes
    ``manifest.json`` (hashes of every file, ``identity``) last. Older checkpoints beyond the
    ``keep`` most recent are removed once the new one is in place.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a temporary directory of an earlier, interrupted save
        tmp.mkdir()
    barrier()
    write_bytes_durably(tmp / f"rng-{rank}.pt", _torch_bytes(rng if rng is not None else rng_state()))
    if is_main:
        write_bytes_durably(tmp / "state.pt", _torch_bytes(state()))
    barrier()
    if is_main:
        files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": files, "identity": dict(identity or {})}
        write_bytes_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        aside = None
        if final.exists():
            aside = root / f".replaced-{final.name}-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(root)
    barrier()
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's manifest, ``None`` for a checkpoint written before manifests existed."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("not a manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(file)!r} is damaged ({e})") from None
    return manifest


def verify_checkpoint(path: str | os.PathLike, rank: int | None = None) -> dict[str, Any] | None:
    """Check every file against the manifest; raise :class:`CheckpointError` naming the first damaged one.

    Returns the manifest (``None`` for an old checkpoint without one, whose files cannot be checked).
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        return None
    for name, info in manifest["files"].items():
        if rank is not None and name.startswith("rng-") and name != f"rng-{rank}.pt":
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
        if file.stat().st_size != info.get("size") or sha256_file(file) != info.get("sha256"):
            raise CheckpointError(f"checkpoint file {str(file)!r} is damaged (its content hash does not match "
                                  f"{MANIFEST})")
    return manifest


def _load_file(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated zip, garbage bytes, pickle refused: all damage
        raise CheckpointError(f"checkpoint file {str(file)!r} is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None


def load_checkpoint(path: str | os.PathLike, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(state, rng)`` of a checkpoint; ``rng`` is ``None`` when no file exists for this rank.

    The files are verified against the manifest first; a damaged one raises :class:`CheckpointError`
    naming it.
    """
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise KDConfigError(f"{str(path)!r} is not a checkpoint (no state.pt)",
                            hint="give a checkpoints/step-... directory to resume from")
    verify_checkpoint(path, rank)
    state = _load_file(path / "state.pt")
    if not isinstance(state, dict) or "progress" not in state:
        raise CheckpointError(f"checkpoint file {str(path / 'state.pt')!r} is damaged (no training progress in it)")
    rng_file = path / f"rng-{rank}.pt"
    rng = _load_file(rng_file) if rng_file.is_file() else None
    if rng is not None and not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= set(rng)):
        raise CheckpointError(f"checkpoint file {str(rng_file)!r} is damaged (not a generator state)")
    return state, rng


def load_latest_intact(output_dir: str | os.PathLike, rank: int) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
    """``(path, state, rng)`` of the newest intact checkpoint under ``output_dir`` (``None`` if there is none).

    A damaged newer checkpoint is skipped with a warning naming the damaged file; if every
    checkpoint is damaged, :class:`CheckpointError` lists them.
    """
    found = list_checkpoints(output_dir)
    damaged = []
    for path in reversed(found):
        try:
            state, rng = load_checkpoint(path, rank)
        except CheckpointError as e:
            damaged.append(str(e))
            logger.warning("%s; falling back to an earlier checkpoint", e)
            continue
        if damaged:
            logger.warning("resuming from %s, the newest intact checkpoint (skipped: %s)", path, "; ".join(damaged))
        return path, state, rng
    if damaged:
        raise CheckpointError("every checkpoint in " + repr(str(checkpoint_root(output_dir))) + " is damaged: "
                              + "; ".join(damaged),
                              hint="start again with --overwrite (or overwrite=True), or restore the files")
    return None


# ---------------------------------------------------------------------------------- the run's identity

IDENTITY_LABELS = {
    "student_architecture": "student architecture",
    "student_init": "student initial weights",
    "teacher": "teacher weights",
    "recipe": "recipe",
    "data": "training data",
    "settings": "training settings",
    "processes": "number of processes",
}


def digest(value: Any) -> str:
    """A short sha256 of a JSON-able value (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_digest(state: Mapping[str, torch.Tensor], with_values: bool = True) -> str:
    """sha256 of a state_dict: names, dtypes, shapes (and the bytes of every tensor with ``with_values``)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}|{t!r}|".encode())
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if with_values:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_identity(saved: Mapping[str, Any] | None, now: Mapping[str, Any], path: str | os.PathLike,
                   details: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`RunMismatchError` naming every part of ``now`` that differs from ``saved``.

    A part missing on either side is not compared (older checkpoints record fewer parts).
    ``details[part]`` may say in words what differs (e.g. the changed settings).
    """
    if not saved:
        logger.warning("checkpoint %s records no run identity (written by an older version); it is not checked", path)
        return
    differ = [part for part in now if part in saved and saved[part] != now[part]]
    if not differ:
        return
    parts = []
    for part in differ:
        label = IDENTITY_LABELS.get(part, part)
        extra = (details or {}).get(part)
        parts.append(f"{label} ({extra})" if extra else f"{label} (checkpoint {saved[part]}, now {now[part]})")
    raise RunMismatchError(
        f"checkpoint {str(path)!r} belongs to another run: " + "; ".join(parts) + " differ",
        hint="resume with the same models, recipe, data and settings, or start a new run with --overwrite "
             "(API: overwrite=True) or another output directory",
    )


# ---------------------------------------------------------------------------------- output directories

RUN_OUTPUTS = (CHECKPOINT_DIR, "log.jsonl", "tensorboard", "export")


def run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """What of a training run is present in ``output_dir`` (checkpoints, log, TensorBoard, export)."""
    out = Path(output_dir)
    found = []
    steps = list_checkpoints(out)
    if steps:
        found.append(f"checkpoints up to {steps[-1].name}")
    for name in RUN_OUTPUTS[1:]:
        if (out / name).exists():
            found.append(name)
    return found


def check_writable_dir(path: str | os.PathLike, flag: str = "output_dir") -> Path:
    """Create ``path`` if needed and make sure files can be written there; errors name ``flag``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KDConfigError(f"{flag} {str(path)!r} is a file, not a directory",
                            hint="choose a directory path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise KDConfigError(f"{flag} {str(path)!r} is not writable ({e.strerror or e})",
                            hint="choose a directory you can write to") from None
    return path


def prepare_output_dir(output_dir: str | os.PathLike, resume: Any, overwrite: bool, flag: str = "output_dir",
                       remove: bool = True) -> None:
    """Refuse an ``output_dir`` holding another run unless ``resume`` or ``overwrite``.

    With ``overwrite`` (and ``remove``) the run's own outputs (``checkpoints/``, ``log.jsonl``,
    ``tensorboard/``, ``export/``) are removed; nothing else in the directory is touched.
    """
    out = check_writable_dir(output_dir, flag)
    used = run_outputs(out)
    if not used or resume:
        return
    if not overwrite:
        raise OutputDirInUseError(
            f"{flag} {str(out)!r} already holds a run ({', '.join(used)})",
            hint="pass --resume to continue it, --overwrite to replace it (API: resume=True / overwrite=True), "
                 "or choose another directory",
        )
    if remove:
        for name in RUN_OUTPUTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        fsync_dir(out)


__all__ = [
    "rng_state", "set_rng_state", "preserved_rng", "checkpoint_root", "list_checkpoints", "latest_checkpoint",
    "save_checkpoint", "load_checkpoint", "load_latest_intact", "verify_checkpoint", "read_manifest",
    "check_identity", "digest", "state_digest", "prepare_output_dir", "check_writable_dir", "run_outputs",
    "atomic_write_bytes", "fsync_dir", "CHECKPOINT_DIR", "MANIFEST",
]
