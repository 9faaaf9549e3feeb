"""Five-landmark face alignment to insightface's 112x112 template (``norm_crop``).

insightface aligns a face by the similarity transform (rotation, uniform scale, translation;
Umeyama's least-squares estimate, scikit-image's ``SimilarityTransform``) that maps its five
landmarks -- left eye, right eye, nose tip, left and right mouth corners, in image pixels ``(x, y)``
-- onto the ArcFace template ``ARCFACE_DST`` (for 112x112; scaled by ``size / 112`` for multiples
of 112, and by ``size / 128`` plus an 8-pixel x shift for multiples of 128), then warps with
OpenCV's ``warpAffine`` (bilinear, black border). This module re-implements
``insightface.utils.face_align.estimate_norm`` / ``norm_crop`` with the same conventions, so the
chips match those insightface's recognition models were trained on, without installing insightface.

Landmarks come from the caller (a dict of ``relative path -> (5, 2)``) or from MTCNN
(``facenet-pytorch``, optional: imported only when detection is asked for). :func:`align_folder`
writes aligned chips of an identity folder; images that cannot be read or where no face is found
are reported and skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from kd_tasks.shared.errors import KDConfigError

__all__ = ["ARCFACE_DST", "estimate_norm", "norm_crop", "mtcnn_landmarks", "align_folder"]

ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def estimate_norm(landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """The 2x3 similarity transform taking five landmarks ``(5, 2)`` onto the ArcFace template."""
    from skimage.transform import SimilarityTransform

    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.shape != (5, 2):
        raise KDConfigError(f"alignment needs 5 landmarks (x, y), got an array of shape {lmk.shape}")
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio, diff_x = image_size / 128.0, 8.0 * image_size / 128.0
    else:
        raise KDConfigError(f"insightface alignment sizes are multiples of 112 or 128, got {image_size}")
    dst = ARCFACE_DST.astype(np.float64) * ratio
    dst[:, 0] += diff_x
    if hasattr(SimilarityTransform, "from_estimate"):
        tform = SimilarityTransform.from_estimate(lmk, dst)
        if not tform:
            raise KDConfigError(f"landmarks {lmk.tolist()} do not determine a similarity transform")
    else:  # scikit-image < 0.26
        tform = SimilarityTransform()
        if not tform.estimate(lmk, dst):
            raise KDConfigError(f"landmarks {lmk.tolist()} do not determine a similarity transform")
    return np.asarray(tform.params[0:2, :], dtype=np.float64)


def norm_crop(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """``(image_size, image_size, C)`` aligned chip of an ``(H, W[, C])`` ``uint8`` image (cv2.warpAffine)."""
    import cv2

    m = estimate_norm(landmarks, image_size)
    return cv2.warpAffine(np.asarray(image), m, (image_size, image_size), borderValue=0.0)


def mtcnn_landmarks(device: str = "cpu") -> Callable[[np.ndarray], np.ndarray | None]:
    """A function ``RGB uint8 image -> (5, 2) landmarks of the most confident face, or None`` (facenet-pytorch's
    MTCNN, whose weights ship in its wheel)."""
    try:
        from facenet_pytorch import MTCNN
    except ImportError as e:
        raise ImportError("landmark detection needs facenet-pytorch (pip install --no-deps facenet-pytorch); "
                          "or give the landmarks") from e
    detector = MTCNN(keep_all=True, device=device)

    def detect(image: np.ndarray) -> np.ndarray | None:
        from PIL import Image

        boxes, probs, points = detector.detect(Image.fromarray(image), landmarks=True)
        if boxes is None or not len(boxes):
            return None
        return np.asarray(points[int(np.argmax(probs))], dtype=np.float64)

    return detect


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, image_size: int = 112,
                 landmarks: Mapping[str, np.ndarray] | None = None,
                 detector: Callable[[np.ndarray], np.ndarray | None] | None = None) -> dict[str, list]:
    """Align every image of ``src/<identity>/<image>`` into ``dst/<identity>/<image stem>.png``.

    Landmarks: ``landmarks["<identity>/<file>"]`` when given, else ``detector(image)`` (e.g.
    :func:`mtcnn_landmarks`). Returns ``{"aligned": [...], "skipped": [(path, reason), ...]}``;
    skipped images (unreadable, no landmarks, no face) are also printed.
    """
    from PIL import Image

    from .data import IMAGE_EXTENSIONS, natural_key

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"face folder {str(src)!r} not found")
    if landmarks is None and detector is None:
        raise KDConfigError("align_folder needs landmarks or a detector (e.g. mtcnn_landmarks())")
    report: dict[str, list] = {"aligned": [], "skipped": []}
    for folder in sorted((d for d in src.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
        for f in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = f"{folder.name}/{f.name}"
            try:
                with Image.open(f) as img:
                    image = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
            except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped and reported
                report["skipped"].append((rel, f"unreadable ({type(e).__name__})"))
                continue
            lmk = landmarks.get(rel) if landmarks is not None else None
            if lmk is None and detector is not None:
                lmk = detector(image)
            if lmk is None:
                report["skipped"].append((rel, "no face / no landmarks"))
                continue
            out = dst / folder.name / (f.stem + ".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(norm_crop(image, lmk, image_size)).save(out)
            report["aligned"].append(rel)
    for rel, why in report["skipped"]:
        print(f"align: skipped {rel}: {why}")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m kd_tasks.face.align SRC DST [--landmarks L.json] [--size 112]``: align an identity folder.

    ``L.json`` maps ``"<identity>/<file>"`` to five ``[x, y]`` points; without it faces are detected with
    MTCNN (facenet-pytorch). Skipped images are listed; the exit code is 0 when at least one image was aligned.
    """
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m kd_tasks.face.align", description=main.__doc__)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--landmarks", help="JSON {\"<identity>/<file>\": [[x, y] x 5]}")
    p.add_argument("--size", type=int, default=112)
    a = p.parse_args(argv)
    try:
        landmarks = None
        if a.landmarks:
            landmarks = {k: np.asarray(v, dtype=np.float64) for k, v in json.loads(Path(a.landmarks).read_text()).items()}
        report = align_folder(a.src, a.dst, a.size, landmarks=landmarks,
                              detector=None if landmarks is not None else mtcnn_landmarks())
    except (KDConfigError, FileNotFoundError, ImportError, ValueError) as e:
        print(f"align: error: {e}", file=__import__("sys").stderr)
        return 2
    print(f"aligned {len(report['aligned'])} images into {a.dst}; skipped {len(report['skipped'])}")
    return 0 if report["aligned"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
