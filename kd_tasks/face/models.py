"""Compact face-embedding students, built by name from ``STUDENTS``.

- ``mobilefacenet``: Chen, Liu, Gao & Han (CCBR 2018), "MobileFaceNets: Efficient CNNs for Accurate
  Real-Time Face Verification on Mobile Devices" -- inverted-residual bottlenecks (depthwise
  separable), a global depthwise convolution (GDC) head instead of global average pooling, a
  linear 1x1 convolution to the embedding; about 1 M parameters at 112x112 with a 128-d output.
- ``mobilefacenet_s``: the same design at half width and fewer blocks (about 0.2 M parameters).
- ``resnet_face``: a small ResNet in the style of ArcFace's IResNet (Deng et al. 2019):
  BN-conv-BN-PReLU-conv-BN residual blocks, a BN-dropout-FC-BN output layer.

Every student maps ``(B, 3, H, W)`` images (``H = W = input_size``) to ``(B, embedding_dim)``
embeddings (not normalised). ``model.spec`` is the dict that rebuilds it
(``build_student(**spec)``); :func:`save_student` / :func:`load_student` write and read a
student as ``model.safetensors`` + ``student.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.registry import Registry

__all__ = ["STUDENTS", "MobileFaceNet", "FaceResNet", "build_student", "save_student", "load_student",
           "MOBILEFACENET_SETTING"]

STUDENTS = Registry("student")

# (expansion t, output channels c, repeats n, first stride s), as in the MobileFaceNets paper, table 1
MOBILEFACENET_SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
SMALL_SETTING = ((2, 64, 2, 2), (4, 128, 1, 2), (2, 128, 2, 1), (4, 128, 1, 2))


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Convolution + BatchNorm (+ PReLU when ``act``); padding keeps the size at stride 1."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


def _out_size(size: int, stride: int, kernel: int = 3) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand (PReLU), 3x3 depthwise (PReLU), linear 1x1 project; residual at stride 1."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, act=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


def _scaled(channels: int, width_mult: float) -> int:
    return max(8, int(round(channels * width_mult / 8)) * 8)


@STUDENTS.register("mobilefacenet")
class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018); see the module docstring.

    Args:
        embedding_dim: output width (128 in the paper; 512 to match ArcFace-style teachers).
        input_size: square input side (112 in the paper); the GDC kernel equals the final map size.
        width_mult: channel multiplier (rounded to multiples of 8).
        setting: bottleneck stages ``(expansion, channels, repeats, stride)``.
    """

    def __init__(self, embedding_dim: int = 128, input_size: int = 112, width_mult: float = 1.0,
                 setting: Sequence[Sequence[int]] = MOBILEFACENET_SETTING):
        super().__init__()
        stem = _scaled(64, width_mult)
        size = _out_size(int(input_size), 2)
        layers: list[nn.Module] = [conv_bn(3, stem, 3, 2), conv_bn(stem, stem, 3, 1, groups=stem)]
        cin = stem
        for t, c, n, s in setting:
            cout = _scaled(c, width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                layers.append(Bottleneck(cin, cout, stride, t))
                size = _out_size(size, stride)
                cin = cout
        head = _scaled(512, width_mult)
        layers.append(conv_bn(cin, head))
        self.features = nn.Sequential(*layers)
        # global depthwise convolution over the whole final map, then the linear embedding
        self.gdc = conv_bn(head, head, size, 1, groups=head, act=False)
        self.gdc[0].padding = (0, 0)
        self.embedding = nn.Sequential(nn.Conv2d(head, embedding_dim, 1, bias=False), nn.BatchNorm2d(embedding_dim),
                                       nn.Flatten())
        self.spec = {"name": "mobilefacenet", "embedding_dim": int(embedding_dim), "input_size": int(input_size),
                     "width_mult": float(width_mult), "setting": [list(map(int, s)) for s in setting]}
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.gdc(self.features(x)))


@STUDENTS.register("mobilefacenet_s")
def mobilefacenet_s(embedding_dim: int = 128, input_size: int = 112, width_mult: float = 0.5) -> MobileFaceNet:
    """A smaller MobileFaceNet: half width, 6 bottlenecks (about 0.2 M parameters at 128-d)."""
    return MobileFaceNet(embedding_dim, input_size, width_mult, SMALL_SETTING)


class IBasicBlock(nn.Module):
    """ArcFace IResNet block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + self.shortcut(x)


@STUDENTS.register("resnet_face")
class FaceResNet(nn.Module):
    """Small IResNet-style embedding network (four stride-2 stages).

    Args:
        embedding_dim: output width.
        input_size: square input side.
        layers: blocks per stage.
        widths: channels per stage.
        dropout: before the final FC layer.
    """

    def __init__(self, embedding_dim: int = 128, input_size: int = 112, layers: Sequence[int] = (1, 1, 1, 1),
                 widths: Sequence[int] = (32, 64, 128, 256), dropout: float = 0.0):
        super().__init__()
        if len(layers) != len(widths):
            raise KDConfigError(f"resnet_face: layers {list(layers)} and widths {list(widths)} differ in length")
        stem = int(widths[0])
        blocks: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem)]
        cin, size = stem, int(input_size)
        for n, c in zip(layers, widths):
            for i in range(int(n)):
                stride = 2 if i == 0 else 1
                blocks.append(IBasicBlock(cin, int(c), stride))
                size = _out_size(size, stride)
                cin = int(c)
        self.features = nn.Sequential(*blocks)
        self.output = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(dropout), nn.Flatten(),
                                    nn.Linear(cin * size * size, embedding_dim), nn.BatchNorm1d(embedding_dim))
        self.spec = {"name": "resnet_face", "embedding_dim": int(embedding_dim), "input_size": int(input_size),
                     "layers": [int(n) for n in layers], "widths": [int(c) for c in widths], "dropout": float(dropout)}
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.features(x))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_student(name: str = "mobilefacenet", **kwargs: Any) -> nn.Module:
    """A student by registry name (``STUDENTS.names()``), e.g. ``build_student("mobilefacenet", embedding_dim=512)``."""
    return STUDENTS.build({"type": name, **kwargs})


def save_student(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``student.json`` (the ``spec``) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    write_spec(model, directory)
    return directory


def write_spec(model: nn.Module, directory: str | os.PathLike) -> None:
    spec = getattr(model, "spec", None)
    if spec is None:
        raise KDConfigError(f"{type(model).__name__} has no .spec; build it with build_student()")
    (Path(directory) / "student.json").write_text(json.dumps(spec, indent=1))


def load_student(directory: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Rebuild a student from ``student.json`` and load ``model.safetensors`` (in eval mode)."""
    from safetensors.torch import load_model

    directory = Path(directory)
    for name in ("student.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{str(directory / name)!r} not found: a saved student has student.json and "
                                    "model.safetensors")
    spec = json.loads((directory / "student.json").read_text())
    model = build_student(spec.pop("name"), **spec)
    load_model(model, str(directory / "model.safetensors"), device=map_location)
    return model.eval()
