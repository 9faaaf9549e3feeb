"""Face images by identity folder, and verification pairs.

Layout: ``root/<identity>/<image>`` with images ``.png``, ``.pgm``, ``.jpg``, ``.jpeg``, ``.bmp``
(e.g. the AT&T/ORL database: ``s1/1.pgm ... s40/10.pgm``). Identities and images are sorted by
name (numbers in names compare as numbers: ``s2`` before ``s10``), so sample indices are stable.

Every image is read, converted to RGB (grayscale is repeated over three channels), resized to
``image_size x image_size`` (bilinear) and scaled to ``[-1, 1]`` (``(x - 0.5) / 0.5``), giving a
``(3, H, W)`` float tensor. This transform is deterministic, so teacher outputs can be cached on
it; ``flip=True`` adds a random horizontal flip for training (then build a teacher cache on the
deterministic view, see :mod:`kd_tasks.shared.cache`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kd_tasks.shared.errors import KDConfigError

__all__ = ["FaceTransform", "IdentityFolder", "split_identities", "verification_pairs", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".pgm", ".jpg", ".jpeg", ".bmp", ".ppm")


def natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers (``s2`` < ``s10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class FaceTransform:
    """Image file -> ``(3, size, size)`` float tensor in ``[-1, 1]``; optional random horizontal flip."""

    def __init__(self, image_size: int = 112, flip: bool = False):
        self.image_size = int(image_size)
        self.flip = bool(flip)

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """The resized RGB image as ``uint8`` ``(H, W, 3)`` (before scaling)."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8).copy()
        except (OSError, SyntaxError, ValueError) as e:  # not an image, truncated, unsupported mode
            if isinstance(e, FileNotFoundError):
                raise
            raise KDConfigError(f"face image {str(path)!r} cannot be read ({type(e).__name__}: {e})",
                                hint="remove the file or replace it with a valid image") from None

    def __call__(self, path: str | os.PathLike) -> torch.Tensor:
        x = torch.from_numpy(self.load(path)).permute(2, 0, 1).float().div_(255.0).sub_(0.5).div_(0.5)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"FaceTransform(image_size={self.image_size}, flip={self.flip}, rgb, bilinear, (x-0.5)/0.5)"


class IdentityFolder(torch.utils.data.Dataset):
    """``(image (3, H, W), label)`` samples of ``root/<identity>/<image>``.

    Args:
        root: the folder of identity folders.
        image_size: side of the square output.
        identities: keep only these identity folder names (in the given order of labels);
            default: all, sorted.
        flip: random horizontal flip (training augmentation).

    Attributes: ``identities`` (label -> folder name), ``samples`` (list of ``(path, label)``),
    ``labels`` (``(N,)`` long tensor), ``transform``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 112, identities: Sequence[str] | None = None,
                 flip: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"face data folder {str(self.root)!r} not found (expected root/<identity>/<images>)")
        found = sorted((d.name for d in self.root.iterdir() if d.is_dir()), key=natural_key)
        if identities is None:
            identities = found
        missing = [i for i in identities if i not in found]
        if missing:
            raise KDConfigError(f"identities {missing[:5]} are not folders of {str(self.root)!r}")
        self.identities = list(identities)
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.identities):
            files = sorted((f for f in (self.root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS),
                           key=lambda f: natural_key(f.name))
            self.samples += [(f, label) for f in files]
        if not self.samples:
            raise KDConfigError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the identity folders of {str(self.root)!r}; "
                "expected root/<identity>/<image>"
            )
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.transform = FaceTransform(image_size, flip)

    @property
    def num_classes(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(path), label

    def deterministic(self) -> "IdentityFolder":
        """The same samples with the evaluation transform (no flip)."""
        if not self.transform.flip:
            return self
        return IdentityFolder(self.root, self.transform.image_size, self.identities, flip=False)


def split_identities(root: str | os.PathLike, num_test: int | None = None, test_fraction: float = 0.25,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """Split the identity folders of ``root`` into disjoint (train, test) lists.

    ``num_test`` identities (or ``round(test_fraction · n)``, at least 2) are drawn with a seeded
    permutation for testing; both lists keep the natural name order.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"face data folder {str(root)!r} not found")
    names = sorted((d.name for d in root.iterdir() if d.is_dir()), key=natural_key)
    k = int(num_test) if num_test is not None else max(2, int(round(test_fraction * len(names))))
    if len(names) - k < 2 or k < 2:
        raise KDConfigError(
            f"{str(root)!r} has {len(names)} identities: cannot hold out {k} for verification and keep at least "
            "2 for training (and at least 2 are needed for verification); give --val-data or more identities"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    test = set(order[:k].tolist())
    return ([n for i, n in enumerate(names) if i not in test], [n for i, n in enumerate(names) if i in test])


def verification_pairs(labels: Sequence[int] | torch.Tensor, max_pairs: int | None = None,
                       seed: int = 0) -> np.ndarray:
    """Balanced verification pairs ``(P, 3)`` rows ``(i, j, same)`` over samples with ``labels``.

    Every same-identity pair ``i < j`` is a positive (a seeded random subset of ``max_pairs // 2``
    when there are more); as many different-identity pairs are drawn at random without repetition
    (all of them when fewer exist). Rows are shuffled with the same seed.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    i, j = np.triu_indices(len(y), k=1)
    same = y[i] == y[j]
    pos = np.flatnonzero(same)
    neg = np.flatnonzero(~same)
    if len(pos) == 0 or len(neg) == 0:
        raise KDConfigError("verification pairs need at least two identities and one identity with two images")
    rng = np.random.default_rng(seed)
    n_pos = len(pos) if max_pairs is None else min(len(pos), max_pairs // 2)
    pos = rng.choice(pos, n_pos, replace=False) if n_pos < len(pos) else pos
    neg = rng.choice(neg, min(len(neg), n_pos), replace=False)
    chosen = np.concatenate([pos, neg])
    pairs = np.stack([i[chosen], j[chosen], same[chosen].astype(np.int64)], axis=1)
    return pairs[rng.permutation(len(pairs))]
