"""Face images by identity folder, and verification pairs.

Layout: ``root/<identity>/<image>`` with images ``.png``, ``.pgm``, ``.jpg``, ``.jpeg``, ``.bmp``
(e.g. the AT&T/ORL database: ``s1/1.pgm ... s40/10.pgm``). Identities and images are sorted by
name (numbers in names compare as numbers: ``s2`` before ``s10``), so sample indices are stable.

Every image is read, converted to RGB (grayscale is repeated over three channels), fitted into
``image_size x image_size`` -- by default keeping its aspect ratio (``fit="pad"``: the longer side is
resized to ``image_size`` and the image centred on black, as insightface pads; ``fit="stretch"``
resizes to the square, distorting e.g. ORL's 92x112 faces) -- with bilinear interpolation, and scaled
to ``[-1, 1]`` (``(x - 127.5) / 127.5``, insightface's recognition input), giving a
``(3, H, W)`` float tensor. Files can be left out by pattern (``exclude``, e.g. a mislabelled
``s10/target.jpg``). This transform is deterministic, so teacher outputs can be cached on
it; ``flip=True`` adds a random horizontal flip for training (then build a teacher cache on the
deterministic view, see :mod:`kd_tasks.shared.cache`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kd_tasks.shared.errors import KDConfigError

__all__ = ["FaceTransform", "IdentityFolder", "ImageFolder", "LabelledWithUnlabelled", "UNLABELLED",
           "split_identities", "verification_pairs", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".pgm", ".jpg", ".jpeg", ".bmp", ".ppm")


def natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers (``s2`` < ``s10``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class FaceTransform:
    """Image file -> ``(3, size, size)`` float tensor in ``[-1, 1]``; optional random horizontal flip."""

    FITS = ("pad", "stretch")

    def __init__(self, image_size: int = 112, flip: bool = False, fit: str = "pad"):
        self.image_size = int(image_size)
        self.flip = bool(flip)
        if fit not in self.FITS:
            raise KDConfigError(f"image fit must be one of {', '.join(self.FITS)}, got {fit!r}")
        self.fit = fit

    def resize(self, img):
        """A PIL image fitted into the square (aspect kept and padded, or stretched)."""
        from PIL import Image

        size = self.image_size
        if self.fit == "stretch" or img.size[0] == img.size[1]:
            return img.resize((size, size), Image.BILINEAR)
        w, h = img.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new(img.mode, (size, size))
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), ((size - nw) // 2, (size - nh) // 2))
        return canvas

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """The resized RGB image as ``uint8`` ``(H, W, 3)`` (before scaling)."""
        from PIL import Image

        try:
            with Image.open(path) as img:
                img = self.resize(img.convert("RGB"))
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
        return (f"FaceTransform(image_size={self.image_size}, flip={self.flip}, fit={self.fit!r}, rgb, bilinear, "
                "(x-127.5)/127.5)")


class IdentityFolder(torch.utils.data.Dataset):
    """``(image (3, H, W), label)`` samples of ``root/<identity>/<image>``.

    Args:
        root: the folder of identity folders.
        image_size: side of the square output.
        identities: keep only these identity folder names (in the given order of labels);
            default: all, sorted.
        flip: random horizontal flip (training augmentation).
        fit: ``"pad"`` (keep the aspect ratio, default) or ``"stretch"``.
        exclude: ``fnmatch`` patterns of paths relative to ``root`` to leave out
            (e.g. ``["s10/target.jpg"]``); each pattern must match a file (a typo is an error).

    Attributes: ``identities`` (label -> folder name), ``samples`` (list of ``(path, label)``),
    ``labels`` (``(N,)`` long tensor), ``transform``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 112, identities: Sequence[str] | None = None,
                 flip: bool = False, fit: str = "pad", exclude: Sequence[str] = ()):
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
        self.exclude = [str(e) for e in (exclude or ())]
        if self.exclude:
            every = {f"{p.parent.name}/{p.name}" for d in self.root.iterdir() if d.is_dir() for p in d.iterdir()}
            unused = [e for e in self.exclude if not fnmatch.filter(every, e)]
            if unused:
                raise KDConfigError(f"exclude patterns {unused} match no file of {str(self.root)!r}",
                                    hint="give paths as <identity>/<file>, e.g. s10/target.jpg")
            self.samples = [(p, y) for p, y in self.samples
                            if not any(fnmatch.fnmatch(f"{p.parent.name}/{p.name}", e) for e in self.exclude)]
        if not self.samples:
            raise KDConfigError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the identity folders of {str(self.root)!r}; "
                "expected root/<identity>/<image>"
            )
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.transform = FaceTransform(image_size, flip, fit)

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
        return IdentityFolder(self.root, self.transform.image_size, self.identities, flip=False,
                              fit=self.transform.fit, exclude=self.exclude)


class ImageFolder(IdentityFolder):
    """Face images without identities: every image under ``root`` (any depth), sorted by path, label 0.

    For training from a teacher's embeddings alone (``kd-tasks face --unlabelled``): the labels are
    placeholders that no loss may read. ``exclude`` patterns match paths relative to ``root``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 112, flip: bool = False, fit: str = "pad",
                 exclude: Sequence[str] = ()):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"face image folder {str(self.root)!r} not found")
        files = sorted((f for f in self.root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda f: natural_key(str(f.relative_to(self.root))))
        self.exclude = [str(e) for e in (exclude or ())]
        rel = [str(f.relative_to(self.root).as_posix()) for f in files]
        unused = [e for e in self.exclude if not fnmatch.filter(rel, e)]
        if unused:
            raise KDConfigError(f"exclude patterns {unused} match no file of {str(self.root)!r}")
        self.samples = [(f, 0) for f, r in zip(files, rel) if not any(fnmatch.fnmatch(r, e) for e in self.exclude)]
        if not self.samples:
            raise KDConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {str(self.root)!r}")
        self.identities = []
        self.labels = torch.zeros(len(self.samples), dtype=torch.long)
        self.transform = FaceTransform(image_size, flip, fit)

    @property
    def num_classes(self) -> int:
        return 0

    def deterministic(self) -> "ImageFolder":
        if not self.transform.flip:
            return self
        return ImageFolder(self.root, self.transform.image_size, fit=self.transform.fit, exclude=self.exclude)


UNLABELLED = -1  # the label of an image without identity in a :class:`LabelledWithUnlabelled` set


class LabelledWithUnlabelled(IdentityFolder):
    """Labelled identity folders plus face images without identities, as one training set.

    ``samples`` are the labelled folder's ``(path, label)`` followed by ``(path, UNLABELLED)`` for every
    image of the unlabelled folder (``-1``: losses that need identities must skip those rows, e.g. the
    margin loss of ``kd-tasks face --unlabelled-data``); ``identities`` and ``num_classes`` are the
    labelled folder's. Both parts use the labelled folder's transform (size, flip, fit). ``repeat`` lists
    every labelled image that many times (oversampling a few labelled images beside many unlabelled ones).
    """

    def __init__(self, labelled: IdentityFolder, unlabelled: ImageFolder, repeat: int = 1):
        if int(repeat) < 1:
            raise KDConfigError(f"labelled images must be listed at least once, got repeat {repeat!r}")
        self.labelled, self.unlabelled, self.repeat = labelled, unlabelled, int(repeat)
        self.root = labelled.root
        self.unlabelled_root = unlabelled.root
        self.identities = list(labelled.identities)
        self.exclude = labelled.exclude
        self.samples = list(labelled.samples) * self.repeat + [(path, UNLABELLED) for path, _ in unlabelled.samples]
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.long)
        self.transform = labelled.transform

    @property
    def num_labelled(self) -> int:
        """Labelled rows (``repeat`` x the labelled images)."""
        return len(self.labelled) * self.repeat

    def deterministic(self) -> "LabelledWithUnlabelled":
        if not self.transform.flip:
            return self
        return LabelledWithUnlabelled(self.labelled.deterministic(), self.unlabelled.deterministic(), self.repeat)

    def sample_names(self) -> list[str]:
        """Each sample's path relative to its folder, the unlabelled ones prefixed ``unlabelled:``."""
        return ([str(p.relative_to(self.root)) for p, _ in self.labelled.samples] * self.repeat +
                [f"unlabelled:{p.relative_to(self.unlabelled_root)}" for p, _ in self.unlabelled.samples])


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
