"""Teacher-output cache: run the teacher once over a dataset, reuse its outputs from disk.

Later epochs and later runs look the outputs up by sample index instead of running the teacher
(the student step alone costs about half a KD step on CPU). Layout of a cache directory::

    <dir>/meta.json     format, fingerprint (its parts and digest), sample count, arrays
    <dir>/out0.npy ...  one NumPy array per stored output, shape (num_samples, ...), memory-mapped
    <dir>/ids.npy       (num_samples, 16) uint8: which sample each row belongs to (see below)

Stored outputs: ``"output"`` -- the teacher's prediction (its logits or embedding, found like the
Distiller finds logits) -- and any tapped features (``taps=["layer3", ...]``, stored under their
tap names). ``TeacherCache.lookup(index)`` returns exactly the ``teacher_outputs=`` mapping that
:class:`~kd_tasks.shared.distiller.Distiller` accepts; :class:`CachedTeacher` wraps a cache as a
teacher module for the other schemes.

Fingerprint. A cache is keyed by the sha256 of four parts: the teacher's weights (names, dtypes,
shapes and bytes of its ``state_dict``), the dataset (its length and every sample's content, or a
caller-given id), the preprocessing (a description string; by default ``repr(dataset.transform)``)
and what is stored (output names, dtype). Opening a cache whose parts differ raises
:class:`StaleCacheError` naming each changed part; rebuild with ``rebuild=True`` (CLI:
``--rebuild-cache``) or use another directory. Builds are atomic: written to a temporary directory,
then renamed.

Rows are bound to samples. Each row records its sample's id: the digest of the sample's source
(``path`` and label of ``dataset.samples[i]``, as in torchvision's ``ImageFolder`` and the face
``IdentityFolder``; through ``Subset``), or else of the sample's content. The training loop checks
the training set against these ids (:meth:`TeacherCache.check_samples`), so a reordered or
different training set is refused even when it has the same length, while an augmented view of the
same files (other image size, random flips) is accepted.

Damage. A missing or unreadable ``meta.json`` or array file, or an array of the wrong shape, is
refused naming the file, with the rebuild hint.

When a cache is invalid. The cache holds the teacher's outputs for *one fixed view* of each sample.
With random augmentation the student sees a new view every epoch while the cached teacher output
belongs to another (un-augmented) view, so the KD target no longer matches the student's input; this
is a different (weaker) loss than online KD. ``build`` refuses a dataset that returns different
values for the same index: every sample read by the teacher pass is compared with the read made for
the fingerprint (or, with a caller-given ``dataset_id``, every sample of the first chunk is read
twice), and a dataset whose declared transform is random (``Random...``, ``ColorJitter``,
``...Augment``, ``flip=True``) is refused up front. The deterministic view: build the cache on
the dataset with its evaluation transform (no random augmentation) and either train without
augmentation, or accept the mismatch knowingly by training on the augmented dataset with the
un-augmented cache (same indices). Feature taps of spatial maps are only valid for the exact
geometry they were computed on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import sha256_file
from .distiller import call_model, default_logits, freeze
from .errors import KDConfigError
from .taps import FeatureTaps
from .topk import compress_topk, expand_topk

TOPK_PARTS = ("output.topk_values", "output.topk_indices", "output.tail_logit")

FORMAT_VERSION = 2
META = "meta.json"
IDS = "ids.npy"
DTYPES = {"float32": np.float32, "float16": np.float16}
REBUILD_HINT = "rebuild it with rebuild=True (CLI: --rebuild-cache) or choose another cache directory"
RANDOM_MARKERS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "flip=True")
CHUNK = 64  # samples read twice to detect random augmentation when the dataset is not fingerprinted in full


class StaleCacheError(KDConfigError):
    """A cache exists for other teacher weights, data, preprocessing or outputs."""


# ---------------------------------------------------------------------------------- fingerprints


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over the ``state_dict``: each entry's name, dtype, shape and bytes, in name order."""
    state = model.state_dict()
    if not state:
        raise KDConfigError(
            f"{type(model).__name__} has no parameters or buffers to fingerprint; pass teacher_id= "
            "(e.g. file_fingerprint(path_of_its_weights))"
        )
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (for teachers whose weights live in a file, e.g. dlib models)."""
    return sha256_file(path, chunk)


def _hash_value(h: "hashlib._Hash", value: Any) -> None:
    """Feed a sample (tensors, arrays, numbers, strings, PIL images, nested containers) to ``h``."""
    if isinstance(value, torch.Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        h.update(_tensor_bytes(value))
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            h.update(f"K{k}".encode())
            _hash_value(h, value[k])
    elif isinstance(value, (tuple, list)):
        h.update(f"L{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    elif hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # PIL image
        h.update(f"I{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(f"V{value!r}".encode())


def sample_fingerprint(sample: Any) -> str:
    h = hashlib.sha256()
    _hash_value(h, sample)
    return h.hexdigest()


def _source_ids(dataset: Any) -> list[str] | None:
    """Per-sample source ids (``path|label`` of ``dataset.samples``, through ``Subset``), or ``None``."""
    if isinstance(dataset, torch.utils.data.Subset):
        base = _source_ids(dataset.dataset)
        return None if base is None else [base[int(i)] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, (list, tuple)) and len(samples) == len(dataset):
        return ["|".join(map(str, s)) if isinstance(s, (tuple, list)) else str(s) for s in samples]
    return None


def _id_bytes(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], dtype=np.uint8)


def sample_ids(dataset: Any, content: Sequence[str] | None = None) -> np.ndarray:
    """``(N, 16)`` uint8: each sample's id -- its source (``dataset.samples``) where the dataset says
    it, else its content's fingerprint (``content``, or each sample read once)."""
    source = _source_ids(dataset)
    if source is None:
        source = list(content) if content is not None else [sample_fingerprint(dataset[i]) for i in range(len(dataset))]
    if not source:
        return np.zeros((0, 16), dtype=np.uint8)
    return np.stack([_id_bytes(s) for s in source])


def declared_random(dataset: Any) -> str | None:
    """The random transform a dataset declares (its ``transform``'s repr names one), else ``None``."""
    text = describe_preprocessing(dataset)
    for marker in RANDOM_MARKERS:
        if marker in text:
            return marker
    return None


def _sample_fingerprints(dataset: Any) -> list[str]:
    return [sample_fingerprint(dataset[i]) for i in range(len(dataset))]


def _digest_of(fingerprints: Sequence[str], n: int) -> str:
    h = hashlib.sha256(f"len={n}".encode())
    for f in fingerprints:
        h.update(f.encode())
    return h.hexdigest()


def dataset_fingerprint(dataset: Any, max_samples: int | None = None) -> str:
    """sha256 over the dataset's length and samples (all, or ``max_samples`` evenly spaced ones).

    Hashing every sample costs one pass over the data without the teacher. For large datasets pass
    ``max_samples`` (weaker: edits between the sampled indices go unnoticed) or give the cache a
    ``dataset_id`` you control (e.g. a file digest or a dataset version).
    """
    n = len(dataset)
    indices: Iterable[int] = range(n)
    if max_samples is not None and max_samples < n:
        indices = np.linspace(0, n - 1, max_samples).round().astype(int).tolist()
    h = hashlib.sha256(f"len={n}".encode())
    for i in indices:
        h.update(sample_fingerprint(dataset[i]).encode())
    return h.hexdigest()


def describe_preprocessing(dataset: Any) -> str:
    """``repr`` of the dataset's ``transform`` (torchvision style) or its type name."""
    transform = getattr(dataset, "transform", None)
    return repr(transform) if transform is not None else f"{type(dataset).__name__} (no transform attribute)"


@dataclass(frozen=True)
class CacheKey:
    """The four parts a cache is keyed by; ``digest`` is the sha256 of all of them."""

    teacher: str
    dataset: str
    preprocessing: str
    outputs: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def differences(self, other: "CacheKey") -> list[str]:
        """Human-readable list of the parts that differ from ``other`` (the cached key)."""
        out = []
        labels = {"teacher": "teacher weights", "dataset": "dataset", "preprocessing": "preprocessing",
                  "outputs": "stored outputs"}
        for part, label in labels.items():
            old, new = getattr(other, part), getattr(self, part)
            if old != new:
                out.append(f"{label} changed (cached: {_short(old)}, now: {_short(new)})")
        return out


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------- the cache


def default_split(batch: Any) -> Any:
    """The model inputs of a batch: element 0 of a tuple/list, ``batch["inputs"]`` of a dict, else the batch."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, Mapping) and "inputs" in batch:
        return batch["inputs"]
    return batch


class TeacherCache:
    """Memory-mapped teacher outputs for every sample index of one dataset."""

    def __init__(self, directory: Path, meta: dict):
        self.directory = Path(directory)
        self.meta = meta
        self.key = CacheKey(**meta["key"])
        self.arrays = {name: self._array(info["file"], info.get("shape")) for name, info in meta["arrays"].items()}
        self.ids = self._array(meta["ids"], [int(meta["count"]), 16]) if meta.get("ids") else None

    def _array(self, name: str, shape: Sequence[int] | None) -> np.ndarray:
        file = self.directory / name
        if not file.is_file():
            raise StaleCacheError(f"teacher cache file {str(file)!r} is missing", hint=REBUILD_HINT)
        try:
            arr = np.load(file, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 -- truncated or garbage .npy
            raise StaleCacheError(f"teacher cache file {str(file)!r} is damaged ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]})", hint=REBUILD_HINT) from None
        if shape is not None and list(arr.shape) != list(shape):
            raise StaleCacheError(f"teacher cache file {str(file)!r} is damaged (shape {list(arr.shape)}, "
                                  f"{META} says {list(shape)})", hint=REBUILD_HINT)
        return arr

    def check_samples(self, dataset: Any, what: str = "the training set") -> None:
        """Refuse ``dataset`` unless its sample ``i`` is the one row ``i`` was computed for, for every ``i``."""
        if len(dataset) != len(self):
            raise KDConfigError(f"teacher cache {str(self.directory)!r} holds {len(self)} samples, {what} {len(dataset)}",
                                hint="build the cache on this data set (its deterministic view)")
        if self.ids is None:
            return
        now = sample_ids(dataset)
        bad = np.flatnonzero((now != np.asarray(self.ids)).any(axis=1))
        if bad.size:
            raise StaleCacheError(
                f"teacher cache {str(self.directory)!r} does not belong to {what}: {bad.size} of {len(self)} rows were "
                f"computed for other samples (first: index {int(bad[0])}); the data set was reordered or changed",
                hint=REBUILD_HINT)

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def names(self) -> list[str]:
        """The outputs a lookup returns (``output`` also when it is stored as top-k logits)."""
        names = [n for n in self.arrays if n not in TOPK_PARTS]
        return (["output"] if TOPK_PARTS[0] in self.arrays else []) + names

    def lookup(
        self,
        index: torch.Tensor | Sequence[int],
        device: torch.device | str | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` rows (float32) for the given sample indices; all outputs or ``names``."""
        idx = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise KDConfigError(f"teacher cache holds {len(self)} samples; index {int(idx.max())} is out of range")
        out = {
            name: torch.from_numpy(np.asarray(arr[idx], dtype=np.float32)).to(device or "cpu")
            for name, arr in self.arrays.items()
            if name not in TOPK_PARTS and (names is None or name in names)
        }
        if TOPK_PARTS[0] in self.arrays and (names is None or "output" in names):
            values, indices, tail = (torch.from_numpy(np.asarray(self.arrays[p][idx])) for p in TOPK_PARTS)
            classes = self.meta["arrays"][TOPK_PARTS[0]]["topk"]["classes"]
            out["output"] = expand_topk(values, indices, tail, classes).to(device or "cpu")
        return out

    # -- opening and building -------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike, key: CacheKey | None = None) -> "TeacherCache":
        """Open an existing cache; with ``key``, refuse it (:class:`StaleCacheError`) if it differs."""
        directory = Path(directory)
        meta_path = directory / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no teacher cache at {str(directory)!r} (missing {META}); build it first")
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a mapping")
            if meta.get("format") == FORMAT_VERSION:
                CacheKey(**meta["key"])
                int(meta["count"])
                if not isinstance(meta["arrays"], dict):
                    raise ValueError("'arrays' is not a mapping")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise StaleCacheError(f"teacher cache file {str(meta_path)!r} is damaged ({type(e).__name__}: {e})",
                                  hint=REBUILD_HINT) from None
        if meta.get("format") != FORMAT_VERSION:
            raise StaleCacheError(
                f"teacher cache {str(directory)!r} has format {meta.get('format')}, this version reads "
                f"{FORMAT_VERSION}; rebuild it (rebuild=True, CLI: --rebuild-cache)"
            )
        if key is not None:
            cached = CacheKey(**meta["key"])
            if cached != key:
                raise StaleCacheError(
                    f"teacher cache {str(directory)!r} is stale: " + "; ".join(key.differences(cached))
                    + ". Rebuild it with rebuild=True (CLI: --rebuild-cache) or choose another cache directory."
                )
        return cls(directory, meta)

    @classmethod
    def load_or_build(
        cls,
        teacher: nn.Module,
        dataset: Any,
        directory: str | os.PathLike,
        *,
        taps: Sequence[str] = (),
        store_output: bool = True,
        teacher_id: str | None = None,
        dataset_id: str | None = None,
        preprocessing: str | None = None,
        dtype: str = "float32",
        top_k: int | None = None,
        rebuild: bool = False,
        **build_kwargs: Any,
    ) -> "TeacherCache":
        """Open the cache if its fingerprint matches (a hit), build it if absent (a miss).

        A cache present with another fingerprint raises :class:`StaleCacheError` unless
        ``rebuild=True``. ``build_kwargs`` go to :meth:`build` (batch size, device, collate ...).
        ``status`` on the result is ``"hit"``, ``"built"`` or ``"rebuilt"``.
        """
        marker = declared_random(dataset) if build_kwargs.get("check_deterministic", True) else None
        if marker:
            raise _augmentation_error(f"its transform is random ({marker} in {describe_preprocessing(dataset)[:120]})")
        content = None if dataset_id else _sample_fingerprints(dataset)
        key = make_key(teacher, dataset, taps=taps, store_output=store_output, teacher_id=teacher_id,
                       dataset_id=dataset_id or _digest_of(content, len(dataset)), preprocessing=preprocessing,
                       dtype=dtype, top_k=top_k)
        directory = Path(directory)
        exists = (directory / META).is_file()
        if exists and not rebuild:
            cache = cls.open(directory, key)
            cache.status = "hit"
            return cache
        cache = cls.build(teacher, dataset, directory, key, taps=taps, store_output=store_output, dtype=dtype,
                          expected=content, top_k=top_k, **build_kwargs)
        cache.status = "rebuilt" if exists else "built"
        return cache

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        dataset: Any,
        directory: str | os.PathLike,
        key: CacheKey,
        *,
        taps: Sequence[str] = (),
        store_output: bool = True,
        dtype: str = "float32",
        batch_size: int = 64,
        collate_fn: Callable | None = None,
        split_batch: Callable[[Any], Any] = default_split,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        logits_fn: Callable[[Any], torch.Tensor] = default_logits,
        check_deterministic: bool = True,
        progress: bool = False,
        expected: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> "TeacherCache":
        """Run ``teacher`` over ``dataset`` in order and write its outputs (replacing any old cache).

        ``top_k``: store the ``output`` logits as their top ``k`` values, class indices and the tail mass
        (:mod:`kd_tasks.shared.topk`): ``k + k + 1`` numbers per row instead of one per class; lookups
        return dense logits whose softmax keeps the teacher's top-k probabilities exactly.

        ``expected``: each sample's fingerprint from an earlier read (:meth:`load_or_build` passes the
        fingerprint pass's); every sample the teacher reads is compared with it (random augmentation
        is refused). Without it, every sample of the first chunk is read twice.
        """
        if not taps and not store_output:
            raise KDConfigError("teacher cache: nothing to store; keep store_output=True or give taps")
        if dtype not in DTYPES:
            raise KDConfigError(f"teacher cache: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if check_deterministic:
            marker = declared_random(dataset)
            if marker:
                raise _augmentation_error(f"its transform is random ({marker} in "
                                          f"{describe_preprocessing(dataset)[:120]})")
            if expected is None:
                check_deterministic_dataset(dataset)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            if top_k is not None and (not store_output or int(top_k) < 1):
                raise KDConfigError(f"teacher cache: top_k needs store_output=True and k >= 1, got top_k={top_k!r}")
            arrays, fingerprints = _run_teacher(teacher, dataset, tmp, taps, store_output, DTYPES[dtype], batch_size,
                                                collate_fn, split_batch, num_workers, device, logits_fn, progress,
                                                top_k)
            if check_deterministic and expected is not None:
                differ = [i for i, (a, b) in enumerate(zip(expected, fingerprints)) if a != b]
                if differ:
                    raise _augmentation_error(f"{len(differ)} of {len(dataset)} samples differ between two reads "
                                              f"(first: dataset[{differ[0]}])")
            np.save(tmp / IDS, sample_ids(dataset, fingerprints))
            meta = {"format": FORMAT_VERSION, "key": asdict(key), "digest": key.digest, "count": len(dataset),
                    "arrays": arrays, "ids": IDS}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(directory, meta)


def make_key(
    teacher: nn.Module,
    dataset: Any,
    *,
    taps: Sequence[str] = (),
    store_output: bool = True,
    teacher_id: str | None = None,
    dataset_id: str | None = None,
    preprocessing: str | None = None,
    dtype: str = "float32",
    top_k: int | None = None,
) -> CacheKey:
    """The :class:`CacheKey` of a teacher/dataset pair (computing the fingerprints not given)."""
    outputs = {"output": bool(store_output), "taps": list(taps), "dtype": dtype}
    if top_k is not None:
        outputs["top_k"] = int(top_k)
    outputs = json.dumps(outputs)
    return CacheKey(
        teacher=teacher_id or teacher_fingerprint(teacher),
        dataset=dataset_id or dataset_fingerprint(dataset),
        preprocessing=preprocessing if preprocessing is not None else describe_preprocessing(dataset),
        outputs=outputs,
    )


def _augmentation_error(why: str) -> KDConfigError:
    return KDConfigError(
        f"teacher cache: the dataset applies random augmentation ({why}), and a cached teacher output would "
        "belong to another view than the student's",
        hint="build the cache on the deterministic view (the same data with the evaluation transform, no random "
             "augmentation); see kd_tasks.shared.cache for when training on an augmented view is acceptable")


def check_deterministic_dataset(dataset: Any, probes: int = CHUNK) -> None:
    """Raise :class:`KDConfigError` if a sample of the first chunk (``probes`` samples, each read twice)
    differs between two reads, or the dataset declares a random transform. A random flip applied to
    20 % of the samples escapes a 64-sample chunk with probability 0.8^64, about 1e-6."""
    n = len(dataset)
    if n == 0:
        raise KDConfigError("teacher cache: the dataset is empty")
    marker = declared_random(dataset)
    if marker:
        raise _augmentation_error(f"its transform is random ({marker})")
    for i in range(min(n, probes)):
        if sample_fingerprint(dataset[i]) != sample_fingerprint(dataset[i]):
            raise _augmentation_error(f"dataset[{i}] differs between two reads")


class _Fingerprinted(torch.utils.data.Dataset):
    """``(sample, sha256 of the sample as 32 uint8)``: fingerprints computed where the sample is read."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        digest = hashlib.sha256()
        _hash_value(digest, sample)
        return sample, torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


class _SplitCollate:
    def __init__(self, collate_fn: Callable | None):
        from torch.utils.data import default_collate

        self.collate_fn = collate_fn or default_collate

    def __call__(self, items):
        return self.collate_fn([s for s, _ in items]), torch.stack([f for _, f in items])


def _fsync_tree(directory: Path) -> None:
    from .checkpoint import fsync_dir

    for p in directory.iterdir():
        if p.is_file():
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def _run_teacher(teacher, dataset, tmp, taps, store_output, np_dtype, batch_size, collate_fn, split_batch,
                 num_workers, device, logits_fn, progress, top_k=None) -> dict:
    from torch.utils.data import DataLoader

    freeze(teacher)
    if device is not None:
        teacher.to(device)
    else:
        device = next(iter(teacher.parameters()), torch.empty(0)).device
    loader = DataLoader(_Fingerprinted(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_SplitCollate(collate_fn))
    fingerprints: list[str] = []
    tapper = FeatureTaps(teacher, {t: t for t in taps}, detach=True, stop_after_last=not store_output) if taps else None
    topk = store_output and top_k is not None  # the output is stored as its top-k parts
    names = (list(TOPK_PARTS) if topk else ["output"] if store_output else []) + list(taps)
    files = {name: f"out{i}.npy" for i, name in enumerate(names)}
    arrays: dict[str, np.memmap] = {}
    row = 0
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="teacher cache")
    with torch.no_grad():
        for batch, digests in loader:
            fingerprints.extend(bytes(d.tolist()).hex() for d in digests)
            inputs = _to(split_batch(batch), device)
            if tapper is not None:
                raw = tapper.run(lambda: call_model(teacher, inputs))
                outs = dict(tapper.outputs)
                missing = tapper.missing()
                if missing:
                    raise KDConfigError(f"teacher cache: taps {missing} did not fire during the teacher forward")
            else:
                raw, outs = call_model(teacher, inputs), {}
            if store_output:
                outs["output"] = logits_fn(raw)
                if topk:
                    classes = outs["output"].shape[1]
                    values, indices, tail = compress_topk(outs["output"], min(int(top_k), classes))
                    topk_meta = {"k": int(values.shape[1]), "classes": int(classes)}
                    outs.update({TOPK_PARTS[0]: values, TOPK_PARTS[1]: indices, TOPK_PARTS[2]: tail})
            for name in names:
                value = outs[name].cpu().numpy() if name == TOPK_PARTS[1] else outs[name].float().cpu().numpy()
                if name not in arrays:
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / files[name], mode="w+", dtype=np.int64 if name == TOPK_PARTS[1] else np_dtype,
                        shape=(len(dataset),) + value.shape[1:]
                    )
                arrays[name][row: row + len(value)] = value
            row += len(value)
    if row != len(dataset):
        raise KDConfigError(f"teacher cache: the loader gave {row} samples for a dataset of {len(dataset)}")
    info = {}
    for name, arr in arrays.items():
        arr.flush()
        info[name] = {"file": files[name], "shape": list(arr.shape), "dtype": str(arr.dtype)}
        if name == TOPK_PARTS[0]:
            info[name]["topk"] = topk_meta
    return info, fingerprints


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target`` by rename; an existing ``target`` is moved aside, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class CachedTeacher(nn.Module):
    """A teacher module answering from a :class:`TeacherCache` by sample index.

    ``forward(inputs, index=...)`` returns the cached ``"output"`` rows (or the ``output`` named at
    construction) on the inputs' device; the inputs themselves are not read. The schemes pass
    ``index=`` to teachers whose ``needs_index`` is true.
    """

    needs_index = True

    def __init__(self, cache: TeacherCache, output: str = "output"):
        super().__init__()
        if output not in cache.names:
            raise KDConfigError(f"cached teacher: the cache holds {cache.names}, not {output!r}")
        self.cache = cache
        self.output = output

    def forward(self, inputs: Any = None, index: torch.Tensor | None = None) -> torch.Tensor:
        if index is None:
            raise KDConfigError("cached teacher: call it with index= (the batch's sample indices)")
        return self.cache.lookup(index, device=_device_of(inputs), names=[self.output])[self.output]


def _device_of(value: Any) -> torch.device:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                return v.device
    return torch.device("cpu")


__all__ = [
    "TeacherCache", "CachedTeacher", "CacheKey", "StaleCacheError", "make_key", "teacher_fingerprint",
    "dataset_fingerprint", "file_fingerprint", "describe_preprocessing", "check_deterministic_dataset",
    "sample_ids", "declared_random",
]
