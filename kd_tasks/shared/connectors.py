"""Connectors: small learnable (or fixed) maps that bring a student tensor to the teacher's shape.

Kept apart from the losses (as MMRazor keeps connectors apart from recorders and losses): a loss
compares two tensors of one shape; a connector makes that possible.

Kinds (registered in ``CONNECTORS``):

* ``identity``      -- shapes already match.
* ``linear``        -- ``nn.Linear`` on the last dimension: ``(B, D_s) -> (B, D_t)``, ``(B, L, D_s) -> (B, L, D_t)``.
* ``conv1x1``       -- ``nn.Conv2d(C_s, C_t, 1)`` on ``(B, C, H, W)`` maps (FitNets' regressor, 1x1 form).
* ``conv_bn_relu``  -- ``conv3x3 -> BatchNorm -> ReLU`` (a stronger regressor for dense prediction).
* ``resize``        -- bilinear interpolation of the spatial size, no parameters.
* ``auto``          -- chooses from the shapes: a channel/width map when those differ, followed by a
  resize when the spatial size differs.

``LazyConnector`` builds its connector from the shapes of the first batch, so a recipe need not state
sizes. Its parameters exist only after that first call: build the optimiser afterwards (the
:class:`~kd_tasks.shared.distiller.Distiller` does this dry run in ``prepare``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import KDConfigError, ShapeMismatchError
from .registry import CONNECTORS

Shape = Sequence[int]


@CONNECTORS.register("identity")
class Identity(nn.Identity):
    """No-op connector for tensors whose shapes already match."""

    def __init__(self, student_shape: Shape | None = None, teacher_shape: Shape | None = None):
        super().__init__()


@CONNECTORS.register("linear")
class LinearConnector(nn.Module):
    """``nn.Linear(D_s, D_t)`` applied to the last dimension (token or pooled features)."""

    def __init__(self, student_shape: Shape, teacher_shape: Shape, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(int(student_shape[-1]), int(teacher_shape[-1]), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _channels(shape: Shape, kind: str) -> int:
    if len(shape) != 4:
        raise ShapeMismatchError(
            f"connector {kind!r} needs (B, C, H, W) feature maps, got shape {tuple(shape)}; "
            "use 'linear' for (B, D) or (B, L, D) features"
        )
    return int(shape[1])


@CONNECTORS.register("conv1x1", "conv")
class Conv1x1Connector(nn.Module):
    """1x1 convolution from ``C_s`` to ``C_t`` channels (optionally followed by BatchNorm)."""

    def __init__(self, student_shape: Shape, teacher_shape: Shape, norm: bool = False):
        super().__init__()
        cs, ct = _channels(student_shape, "conv1x1"), _channels(teacher_shape, "conv1x1")
        layers: list[nn.Module] = [nn.Conv2d(cs, ct, 1, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(ct))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@CONNECTORS.register("conv_bn_relu")
class ConvBNReLUConnector(nn.Module):
    """3x3 conv -> BatchNorm -> ReLU, from ``C_s`` to ``C_t`` channels."""

    def __init__(self, student_shape: Shape, teacher_shape: Shape, kernel_size: int = 3):
        super().__init__()
        cs, ct = _channels(student_shape, "conv_bn_relu"), _channels(teacher_shape, "conv_bn_relu")
        self.body = nn.Sequential(
            nn.Conv2d(cs, ct, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(ct),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@CONNECTORS.register("resize")
class ResizeConnector(nn.Module):
    """Bilinear resize of ``(B, C, H, W)`` maps to the teacher's ``(H, W)``; no parameters."""

    def __init__(self, student_shape: Shape | None = None, teacher_shape: Shape | None = None, mode: str = "bilinear"):
        super().__init__()
        if teacher_shape is None or len(teacher_shape) != 4:
            raise ShapeMismatchError(f"'resize' needs a (B, C, H, W) teacher shape, got {teacher_shape}")
        self.size = (int(teacher_shape[2]), int(teacher_shape[3]))
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        kw = {"align_corners": False} if self.mode in ("bilinear", "bicubic") else {}
        return F.interpolate(x, size=self.size, mode=self.mode, **kw)


def auto_connector(student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    """Pick a connector from the shapes (batch dimension ignored)."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s[1:] == t[1:]:
        return Identity()
    if len(s) != len(t):
        raise ShapeMismatchError(
            f"cannot connect student shape {s} to teacher shape {t}: different number of dimensions. "
            "Tap a different module (or a tuple element with 'name:0') or pool/flatten one side first."
        )
    if len(s) == 4:
        parts: list[nn.Module] = []
        if s[1] != t[1]:
            parts.append(Conv1x1Connector(s, t))
        if s[2:] != t[2:]:
            parts.append(ResizeConnector(s, t))
        return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    if s[:-1][1:] == t[:-1][1:]:
        return LinearConnector(s, t)
    raise ShapeMismatchError(
        f"cannot connect student shape {s} to teacher shape {t} automatically: only the last dimension "
        "(linear) or channels/spatial size of (B, C, H, W) maps (conv1x1 + resize) can be matched"
    )


CONNECTORS.register("auto")(auto_connector)


def build_connector(kind: str | dict, student_shape: Shape, teacher_shape: Shape) -> nn.Module:
    """Build connector ``kind`` (a name or ``{"type": name, **options}``) for the given shapes."""
    cfg = {"type": kind} if isinstance(kind, str) else dict(kind)
    return CONNECTORS.build(cfg, student_shape=tuple(student_shape), teacher_shape=tuple(teacher_shape))


class LazyConnector(nn.Module):
    """A connector built from the first batch's shapes: ``forward(x, target_shape)``.

    After the first call it is an ordinary module: its parameters are saved in ``state_dict``.
    Loading a state dict into an unbuilt ``LazyConnector`` needs the shapes; call it once on a batch
    (or use :meth:`materialize`) first.
    """

    def __init__(self, kind: str | dict = "auto"):
        super().__init__()
        name = kind if isinstance(kind, str) else kind.get("type", "")
        if name not in CONNECTORS:
            CONNECTORS.get(name)  # raises a KDConfigError with close matches
        self.kind = kind
        self.inner: nn.Module | None = None

    @property
    def materialized(self) -> bool:
        return self.inner is not None

    def materialize(self, student_shape: Shape, teacher_shape: Shape, like: torch.Tensor | None = None) -> nn.Module:
        if self.inner is None:
            inner = build_connector(self.kind, student_shape, teacher_shape)
            if like is not None:
                inner = inner.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)
            self.inner = inner
        return self.inner

    def forward(self, x: torch.Tensor, target_shape: Shape) -> torch.Tensor:
        inner = self.materialize(tuple(x.shape), tuple(target_shape), like=x)
        if len(target_shape) == 4:  # inputs of varying size: resize to this batch's teacher map
            for m in inner.modules():
                if isinstance(m, ResizeConnector):
                    m.size = (int(target_shape[2]), int(target_shape[3]))
        try:
            return inner(x)
        except RuntimeError as e:  # a connector built for other shapes
            raise ShapeMismatchError(
                f"connector {self.kind!r} built for another shape cannot take input {tuple(x.shape)} "
                f"(target {tuple(target_shape)}): {e}"
            ) from e

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, materialized={self.materialized}"


__all__ = [
    "Identity",
    "LinearConnector",
    "Conv1x1Connector",
    "ConvBNReLUConnector",
    "ResizeConnector",
    "auto_connector",
    "build_connector",
    "LazyConnector",
    "KDConfigError",
]
