"""Face-recognition teachers: modules that map a batch of face images to embeddings.

All teachers take the dataset's images -- ``(B, 3, H, W)`` float RGB in ``[-1, 1]`` (see
:mod:`kd_tasks.face.data`) -- and return ``(B, D)`` float32 embeddings on the input's device.
Each has ``fingerprint()``, the teacher part of a teacher-output cache key
(:mod:`kd_tasks.shared.cache`), and ``embedding_dim`` once known.

- :class:`TorchTeacher`: any ``nn.Module`` (or a TorchScript file, ``torch.jit.load``);
- :class:`ONNXTeacher`: an ``.onnx`` file run by onnxruntime's ``InferenceSession``;
- :class:`DlibTeacher`: dlib's ``face_recognition_resnet_model_v1`` (128-d), optional: dlib is
  imported only when one is built.

:func:`load_teacher` builds one from a command-line spec: ``teacher.onnx``, ``teacher.pt``
(TorchScript) or ``dlib:<path to dlib_face_recognition_resnet_model_v1.dat>``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_tasks.shared.cache import file_fingerprint, teacher_fingerprint
from kd_tasks.shared.errors import KDConfigError

__all__ = ["TorchTeacher", "ONNXTeacher", "DlibTeacher", "load_teacher", "resize_batch", "check_teacher", "SCALINGS"]


def resize_batch(x: Tensor, size: int | tuple[int, int] | None) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` (no-op when ``None`` or already that size)."""
    if size is None:
        return x
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    return path


class TorchTeacher(nn.Module):
    """A PyTorch embedding network as a teacher (inputs resized to ``input_size`` when given)."""

    def __init__(self, model: nn.Module, input_size: int | None = None):
        super().__init__()
        self.model = model
        self.input_size = input_size

    @classmethod
    def from_file(cls, path: str | os.PathLike, input_size: int | None = None) -> "TorchTeacher":
        """Load a TorchScript file (``torch.jit.save`` / ``torch.jit.script(...).save``)."""
        path = _require_file(path, "torch teacher file")
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as e:
            raise KDConfigError(
                f"{str(path)!r} is not a TorchScript model ({e.__class__.__name__}); save the teacher with "
                "torch.jit.script(model).save(path) or export it to ONNX"
            ) from e
        teacher = cls(model, input_size)
        teacher._file = path
        return teacher

    def forward(self, x: Tensor) -> Tensor:
        return self.model(resize_batch(x, self.input_size)).float()

    def fingerprint(self) -> str:
        path = getattr(self, "_file", None)
        return f"torch:{file_fingerprint(path)}:{self.input_size}" if path else f"torch:{teacher_fingerprint(self.model)}:{self.input_size}"


SCALINGS = {
    # name -> (mean, std) applied to 0..255 pixels: input = (x - mean) / std
    "insightface": (127.5, 127.5),  # insightface recognition packs (ArcFaceONNX): (x - 127.5) / 127.5
    "unit": (0.0, 255.0),           # x / 255
    "raw": (0.0, 1.0),              # 0..255 as is (e.g. mxnet-converted models that normalise inside)
}
LAYOUTS = ("auto", "nchw", "nhwc")
CHANNEL_ORDERS = ("rgb", "bgr")


class ONNXTeacher(nn.Module):
    """An ONNX embedding model run with onnxruntime, with its input convention declared.

    The dataset's images (RGB, ``(x - 127.5) / 127.5``, NCHW) are converted to what the model
    expects: ``input_size`` (default: the graph's fixed height and width), ``scaling`` (a name of
    ``SCALINGS`` -- insightface's recognition packs use ``"insightface"``, 112x112 -- or a
    ``(mean, std)`` pair on 0..255 pixels), ``channels`` (``"rgb"`` or ``"bgr"``) and ``layout``
    (``"nchw"``, ``"nhwc"`` or ``"auto"``: NHWC when the graph's last dimension is 1 or 3 and its
    second is not). A graph with a fixed batch dimension is run in chunks of that size (the last
    chunk padded by repeating its last image; the padding's outputs are dropped). The first graph
    output is the embedding.
    """

    def __init__(self, path: str | os.PathLike, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 input_size: int | tuple[int, int] | None = None, scaling: str | tuple[float, float] = "insightface",
                 channels: str = "rgb", layout: str = "auto"):
        super().__init__()
        self.path = _require_file(path, "ONNX teacher file")
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - the face extra installs it
            raise ImportError("the ONNX teacher needs onnxruntime: pip install 'kd-tasks[face]'") from e
        if isinstance(scaling, str):
            if scaling not in SCALINGS:
                raise KDConfigError(f"ONNX teacher: scaling must be one of {', '.join(SCALINGS)} or (mean, std), "
                                    f"got {scaling!r}")
            self.mean, self.std = SCALINGS[scaling]
        else:
            self.mean, self.std = (float(v) for v in scaling)
        if channels not in CHANNEL_ORDERS or layout not in LAYOUTS:
            raise KDConfigError(f"ONNX teacher: channels must be rgb or bgr and layout auto, nchw or nhwc; got "
                                f"{channels!r}, {layout!r}")
        self.scaling, self.channels = scaling, channels
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4:
            raise KDConfigError(f"ONNX teacher {str(self.path)!r}: input {inp.name!r} has shape {shape}; "
                                "an image model takes a 4-d (N, C, H, W) or (N, H, W, C) input")
        if layout == "auto":
            layout = "nhwc" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "nchw"
        self.layout = layout
        hw = shape[1:3] if layout == "nhwc" else shape[2:4]
        if input_size is None and all(isinstance(v, int) for v in hw):
            input_size = (hw[0], hw[1])
        self.input_size = input_size
        self.batch_size = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_shape = self.session.get_outputs()[0].shape
        self.embedding_dim = out_shape[-1] if out_shape and isinstance(out_shape[-1], int) else None

    def prepare(self, x: Tensor) -> np.ndarray:
        """Dataset images -> the model's input array (size, scaling, channel order, layout)."""
        x = resize_batch(x.detach().float().cpu(), self.input_size)
        pixels = x * 127.5 + 127.5  # the dataset convention back to 0..255 pixels
        if self.channels == "bgr":
            pixels = pixels.flip(1)
        out = (pixels - self.mean) / self.std
        if self.layout == "nhwc":
            out = out.permute(0, 2, 3, 1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def forward(self, x: Tensor) -> Tensor:
        batch = self.prepare(x)
        n = len(batch)
        chunk = self.batch_size or max(n, 1)
        outs = []
        for start in range(0, n, chunk):
            part = batch[start:start + chunk]
            real = len(part)
            if self.batch_size and real < chunk:
                part = np.concatenate([part, np.repeat(part[-1:], chunk - real, axis=0)])
            out = self.session.run(None, {self.input_name: part})[0]
            outs.append(np.asarray(out, dtype=np.float32).reshape(len(part), -1)[:real])
        return torch.from_numpy(np.concatenate(outs)).to(x.device)

    def fingerprint(self) -> str:
        return (f"onnx:{file_fingerprint(self.path)}:{self.input_size}:{self.mean},{self.std}:{self.channels}:"
                f"{self.layout}")


class DlibTeacher(nn.Module):
    """dlib's ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1.dat``, 128-d).

    dlib computes descriptors of 150x150 aligned face chips. With ``shape_predictor`` (a
    ``shape_predictor_5_face_landmarks.dat`` path), each image is upsampled ``upsample`` times for
    dlib's HOG face detector, the largest face is aligned with the 5 landmarks and cut by
    ``dlib.get_face_chip``; an image where no face is found (and every image without a shape
    predictor) is resized whole to 150x150 -- right for images that are already face crops. The
    counts of aligned and whole-image chips are kept in ``stats``.

    dlib runs on the CPU, image by image: cache its outputs (``TeacherCache``). dlib is not a
    dependency of kd-tasks; install it separately (e.g. the prebuilt ``dlib-bin`` wheel).
    """

    CHIP = 150

    def __init__(self, model_path: str | os.PathLike, shape_predictor: str | os.PathLike | None = None,
                 upsample: int = 1, num_jitters: int = 0):
        super().__init__()
        self.model_path = _require_file(model_path, "dlib face-recognition model")
        self.shape_predictor_path = _require_file(shape_predictor, "dlib shape predictor") if shape_predictor else None
        try:
            import dlib
        except ImportError as e:
            raise ImportError(
                "the dlib teacher needs the dlib package, which kd-tasks does not install: "
                "pip install dlib-bin (prebuilt) or pip install dlib (compiles)"
            ) from e
        self._dlib = dlib
        self.encoder = dlib.face_recognition_model_v1(str(self.model_path))
        self.detector = dlib.get_frontal_face_detector() if self.shape_predictor_path else None
        self.predictor = dlib.shape_predictor(str(self.shape_predictor_path)) if self.shape_predictor_path else None
        self.upsample = int(upsample)
        self.num_jitters = int(num_jitters)
        self.embedding_dim = 128
        self.stats = {"aligned": 0, "whole_image": 0}

    def chip(self, image: np.ndarray) -> np.ndarray:
        """The 150x150 RGB ``uint8`` chip of one ``(H, W, 3)`` ``uint8`` image."""
        if self.detector is not None:
            faces = self.detector(image, self.upsample)
            if len(faces):
                face = max(faces, key=lambda r: r.width() * r.height())
                self.stats["aligned"] += 1
                return np.asarray(self._dlib.get_face_chip(image, self.predictor(image, face), size=self.CHIP))
        self.stats["whole_image"] += 1
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((self.CHIP, self.CHIP), Image.BILINEAR))

    def forward(self, x: Tensor) -> Tensor:
        images = ((x.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1) * 255.0).round().to(torch.uint8)
        chips = [np.ascontiguousarray(self.chip(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))) for img in images]
        out = [np.asarray(self.encoder.compute_face_descriptor(c, self.num_jitters), dtype=np.float32) for c in chips]
        return torch.from_numpy(np.stack(out)).to(x.device)

    def fingerprint(self) -> str:
        parts = [file_fingerprint(self.model_path)]
        if self.shape_predictor_path:
            parts.append(file_fingerprint(self.shape_predictor_path))
        settings = f"upsample={self.upsample},jitters={self.num_jitters}"
        return "dlib:" + hashlib.sha256(("|".join(parts) + settings).encode()).hexdigest()


def load_teacher(spec: str, shape_predictor: str | None = None, input_size: int | None = None,
                 **onnx_options: Any) -> nn.Module:
    """A teacher from ``path.onnx``, ``path.pt``/``.pth``/``.ts`` (TorchScript) or ``dlib:<path.dat>``;
    ``onnx_options`` (``scaling``, ``channels``, ``layout``) declare an ONNX model's input convention."""
    if spec.startswith("dlib:"):
        return DlibTeacher(spec[len("dlib:"):], shape_predictor=shape_predictor)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher {spec!r} not found: give an .onnx file, a TorchScript .pt file or dlib:<path to .dat>"
        )
    if path.suffix.lower() == ".onnx":
        return ONNXTeacher(path, input_size=input_size, **onnx_options)
    if path.suffix.lower() in (".pt", ".pth", ".ts", ".jit"):
        return TorchTeacher.from_file(path, input_size=input_size)
    raise KDConfigError(f"teacher {spec!r}: unknown format {path.suffix!r}; use .onnx, .pt (TorchScript) or dlib:<path>")


def check_teacher(metrics: dict, min_auc: float = 0.6) -> None:
    """Refuse a teacher whose own verification AUC on the validation pairs is near chance (0.5).

    A teacher that cannot verify faces teaches nothing; the usual cause is a wrong input convention
    (size, scaling, channel order, layout) or a model that is not a face-embedding model.
    """
    auc = float(metrics.get("auc", float("nan")))
    if not auc >= min_auc:
        raise KDConfigError(
            f"the teacher verifies the validation pairs at AUC {auc:.3f} (chance is 0.5, required >= {min_auc}): "
            "it would teach nothing",
            hint="check the teacher's input convention (--teacher-scaling, --teacher-channels, --teacher-layout, "
                 "--teacher-input-size) and that it is a face-embedding model; --min-teacher-auc 0 skips this check",
        )
