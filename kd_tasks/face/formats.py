"""insightface's data formats, read without mxnet: ``train.rec`` + ``train.idx`` and verification ``.bin`` sets.

**RecordIO** (dmlc-core, as written by mxnet's ``MXIndexedRecordIO``). ``train.idx`` holds lines
``key<TAB>byte offset``; at each offset of ``train.rec`` a record is ``uint32 magic 0xced7230a``,
``uint32 lrec`` (upper 3 bits: continuation flag ``cflag``, lower 29: length), the payload, and
zero padding to 4 bytes. A payload split into parts (``cflag`` 1 = first, 2 = middle, 3 = last)
was split where it held the magic number, which is put back between the parts. A payload is an
``IRHeader`` (``<IfQQ``: ``flag``, ``label``, ``id``, ``id2``; 24 bytes), then ``flag`` float32
labels when ``flag > 0``, then the encoded image (JPEG/PNG). insightface's training sets keep in
record 0 a header whose labels ``(a, b)`` say that records ``1 .. a-1`` are the images; without it
every key is an image. The identity is the (first) label.

**Verification sets** (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``): a pickle of
``(bins, issame_list)``, ``2N`` encoded images (pairs ``2i``, ``2i+1``) and ``N`` booleans. They
are unpickled with a restricted unpickler that admits only lists, tuples, bytes, booleans and
numbers (a ``.bin`` cannot run code). :func:`evaluate_bin` reports insightface's protocol:
embeddings of each image and its horizontal flip summed, 10-fold accuracy (folds in pair order),
plus AUC and TAR@FAR.

Unreadable images are reported (``bad`` attributes, a warning) and skipped: a bad training image
is left out; a bad verification image removes its pair.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from kd_tasks.shared.errors import KDConfigError

from .data import FaceTransform

__all__ = ["RecordIOReader", "RecordFaceDataset", "write_recordio", "load_bin", "write_bin", "evaluate_bin",
           "pack_record", "unpack_record"]

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


def pack_record(label: float | Sequence[float], image: bytes, index: int = 0) -> bytes:
    """An IRHeader payload: a scalar label (``flag = 0``) or a label vector (``flag = len``)."""
    if np.isscalar(label):
        return _HEADER.pack(0, float(label), int(index), 0) + image
    labels = np.asarray(label, dtype=np.float32)
    return _HEADER.pack(len(labels), 0.0, int(index), 0) + labels.tobytes() + image


def unpack_record(payload: bytes) -> tuple[np.ndarray | float, int, bytes]:
    """``(label, id, image bytes)`` of an IRHeader payload (label a vector when ``flag > 0``)."""
    if len(payload) < _HEADER.size:
        raise KDConfigError(f"RecordIO payload of {len(payload)} bytes is shorter than its 24-byte header")
    flag, label, rid, _ = _HEADER.unpack_from(payload)
    rest = payload[_HEADER.size:]
    if flag > 0:
        labels = np.frombuffer(rest[: 4 * flag], dtype=np.float32).copy()
        return labels, rid, rest[4 * flag:]
    return label, rid, rest


class RecordIOReader:
    """Random access to ``train.rec`` through ``train.idx`` (no mxnet)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for p, what in ((self.rec_path, "RecordIO file"), (self.idx_path, "RecordIO index")):
            if not p.is_file():
                raise FileNotFoundError(f"{what} {str(p)!r} not found (insightface sets ship train.rec + train.idx)")
        self.offsets: dict[int, int] = {}
        for n, line in enumerate(self.idx_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise KDConfigError(f"{str(self.idx_path)!r} line {n}: expected 'key<TAB>offset', got {line[:60]!r}")
            self.offsets[int(parts[0])] = int(parts[1])
        self.keys = sorted(self.offsets)
        self._file = open(self.rec_path, "rb")  # noqa: SIM115 -- kept open for random access

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` (multi-part records joined)."""
        if key not in self.offsets:
            raise KDConfigError(f"record {key} is not in {str(self.idx_path)!r}")
        f = self._file
        f.seek(self.offsets[key])
        parts = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise KDConfigError(f"{str(self.rec_path)!r}: record {key} is truncated")
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise KDConfigError(f"{str(self.rec_path)!r}: no RecordIO record at offset {self.offsets[key]} "
                                    f"(magic {magic:#x}); is {str(self.idx_path)!r} the index of this file?")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            parts.append(f.read(length))
            f.read((4 - length % 4) % 4)
            if cflag in (0, 3):
                break
        return _MAGIC_BYTES.join(parts)

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):  # DataLoader workers reopen the file
        state = dict(self.__dict__)
        state.pop("_file", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file = open(self.rec_path, "rb")  # noqa: SIM115


def write_recordio(rec_path: str | os.PathLike, records: Iterable[bytes],
                   idx_path: str | os.PathLike | None = None) -> Path:
    """Write payloads as an indexed RecordIO pair (keys 0, 1, ...). A payload that holds the magic number is
    written in parts (``cflag`` 1/2/3) split there, the magic dropped, as dmlc-core does."""
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path else rec_path.with_suffix(".idx")
    lines = []
    with open(rec_path, "wb") as f:
        for key, payload in enumerate(records):
            lines.append(f"{key}\t{f.tell()}")
            pieces = payload.split(_MAGIC_BYTES)
            for k, piece in enumerate(pieces):
                cflag = 0 if len(pieces) == 1 else (1 if k == 0 else (3 if k == len(pieces) - 1 else 2))
                f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(piece)))
                f.write(piece + b"\0" * ((4 - len(piece) % 4) % 4))
    idx_path.write_text("\n".join(lines) + "\n")
    return rec_path


def _decode(image: bytes, transform: FaceTransform) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as img:
        img = transform.resize(img.convert("RGB"))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return x.div_(127.5).sub_(1.0)


class RecordFaceDataset(torch.utils.data.Dataset):
    """``(image (3, H, W) in [-1, 1], identity)`` samples of an insightface ``train.rec`` (+ ``train.idx``).

    Args:
        rec_path: ``train.rec``; ``idx_path`` defaults to the same name with ``.idx``.
        image_size: output side (insightface sets are 112x112 already aligned).
        check: decode every image once now; unreadable ones are reported (``bad``) and left out.
            Without it a bad image fails when read, naming its record.
    """

    def __init__(self, rec_path: str | os.PathLike, image_size: int = 112, idx_path: str | os.PathLike | None = None,
                 check: bool = True, flip: bool = False):
        self.reader = RecordIOReader(rec_path, idx_path)
        self.transform = FaceTransform(image_size, flip)
        label0, _, _ = unpack_record(self.reader.read(self.reader.keys[0]))
        if isinstance(label0, np.ndarray) and len(label0) >= 2 and self.reader.keys[0] == 0:
            keys = list(range(1, int(label0[0])))
        else:
            keys = list(self.reader.keys)
        labels = []
        for key in keys:
            label, _, _ = unpack_record(self.reader.read(key))
            labels.append(int(label[0] if isinstance(label, np.ndarray) else label))
        self.bad: list[tuple[int, str]] = []
        if check:
            good = []
            for key, label in zip(keys, labels):
                try:
                    _decode(unpack_record(self.reader.read(key))[2], self.transform)
                    good.append((key, label))
                except Exception as e:  # noqa: BLE001 -- any decoding failure marks the image bad
                    self.bad.append((key, f"{type(e).__name__}: {e}"))
            if self.bad:
                warnings.warn(f"{len(self.bad)} unreadable images in {str(self.reader.rec_path)!r} were skipped "
                              f"(records {[k for k, _ in self.bad[:10]]})", stacklevel=2)
            keys, labels = [k for k, _ in good], [y for _, y in good]
        if not keys:
            raise KDConfigError(f"{str(self.reader.rec_path)!r} holds no readable image")
        self.keys = keys
        self.labels = torch.tensor(labels, dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.keys[index]
        try:
            x = _decode(unpack_record(self.reader.read(key))[2], self.transform)
        except KDConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise KDConfigError(f"record {key} of {str(self.reader.rec_path)!r} is not a readable image "
                                f"({type(e).__name__}: {e})", hint="build the dataset with check=True to skip it") from None
        if self.transform.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[index])


class _BinUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in ("list", "tuple", "bytes", "bytearray", "bool", "int", "float"):
            return super().find_class(module, name)
        raise KDConfigError(f"a verification .bin holds only images and booleans; it references {module}.{name}")


def load_bin(path: str | os.PathLike, image_size: int = 112) -> tuple[torch.Tensor, np.ndarray, list[int]]:
    """``(images (2N', 3, H, W), issame (N',), bad pair indices)`` of an insightface verification ``.bin``.

    A pair with an unreadable image is reported (warning) and left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {str(path)!r} not found")
    try:
        with open(path, "rb") as f:
            bins, issame = _BinUnpickler(f, encoding="bytes").load()
    except KDConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise KDConfigError(f"{str(path)!r} is not an insightface verification .bin ({type(e).__name__}: {e})") from None
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * len(issame):
        raise KDConfigError(f"{str(path)!r}: {len(bins)} images for {len(issame)} pairs (expected 2 per pair)")
    transform = FaceTransform(image_size)
    images, keep, bad = [], [], []
    for p in range(len(issame)):
        try:
            pair = [_decode(bytes(bins[2 * p + k]), transform) for k in (0, 1)]
        except Exception:  # noqa: BLE001
            bad.append(p)
            continue
        images += pair
        keep.append(p)
    if bad:
        warnings.warn(f"{str(path)!r}: {len(bad)} pairs with unreadable images skipped (pairs {bad[:10]})", stacklevel=2)
    if not keep:
        raise KDConfigError(f"{str(path)!r} holds no readable pair")
    return torch.stack(images), issame[keep], bad


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> Path:
    """Write a verification ``.bin`` (for tests and small custom sets)."""
    with open(path, "wb") as f:
        pickle.dump((list(images), list(map(bool, issame))), f, protocol=pickle.HIGHEST_PROTOCOL)
    return Path(path)


def evaluate_bin(model: torch.nn.Module, path: str | os.PathLike, image_size: int = 112, folds: int = 10,
                 far_targets: Sequence[float] = (1e-3, 1e-2)) -> dict[str, float]:
    """insightface's verification of a ``.bin``: flip-summed embeddings, ``folds``-fold accuracy (folds in pair
    order, threshold chosen on the other folds), AUC and TAR@FAR on all pairs."""
    from .verify import embed_with_flip, pair_scores, verification_metrics

    images, issame, bad = load_bin(path, image_size)
    emb = embed_with_flip(model, images)
    pairs = np.stack([np.arange(0, len(emb), 2), np.arange(1, len(emb), 2)], axis=1)
    out = verification_metrics(pair_scores(emb, pairs), issame, folds=folds, far_targets=far_targets, shuffle=False)
    out["skipped_pairs"] = float(len(bad))
    return out
