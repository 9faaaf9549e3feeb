"""Channel-wise distillation for dense prediction (feature maps or dense logits)."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import ShapeMismatchError
from ..registry import LOSSES
from .logit import check_choice, check_temperature, soft_kl

__all__ = ["CWDLoss"]


@LOSSES.register("cwd", "channel_wise")
class CWDLoss(nn.Module):
    """Shu, Liu, Gao, Yan & Shen (ICCV 2021), "Channel-wise Knowledge Distillation for Dense Prediction".

    Each channel of an ``(N, C, H, W)`` map becomes a distribution over its ``H·W`` positions,
    ``φ(y)_{c,i} = exp(y_{c,i} / T) / sum_j exp(y_{c,j} / T)``, and the student's channel
    distributions follow the teacher's::

        L = T² / (N · C) · sum_{n, c} sum_i φ(y_t)_{n,c,i} · log(φ(y_t)_{n,c,i} / φ(y_s)_{n,c,i})

    ``normalize``:

    - ``"channel"`` (default): divide by ``N · C`` as above. This is the paper's ``T²/C`` per image
      averaged over the batch, and what the authors' code and mmrazor's ``ChannelWiseDivergence`` do
      (sum over everything ``· T² / (N · C)``);
    - ``"spatial"``: divide by ``N · C · H · W`` as well, so the value no longer grows with the
      map's size (a smaller scale: raise the loss weight accordingly).

    Any ``(N, C, *spatial)`` map works (all trailing dimensions are the positions). The default
    ``T = 1`` is mmrazor's default; the paper tunes ``T`` and the loss weight per task, so set both in
    the recipe. Student and teacher must have the same shape: add a ``"conv1x1"`` connector when the
    channel counts differ, and a ``"resize"`` connector when the spatial sizes differ.
    """

    NORMALIZATIONS = ("channel", "spatial")

    def __init__(self, temperature: float = 1.0, normalize: str = "channel"):
        super().__init__()
        self.temperature = check_temperature(temperature, "cwd")
        self.normalize = check_choice(normalize, self.NORMALIZATIONS, "cwd", "normalize")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        teacher = teacher.detach()
        self._check_shapes(student, teacher)
        n, c = student.shape[:2]
        s_rows = student.reshape(n * c, -1)
        t_rows = teacher.reshape(n * c, -1)
        loss = soft_kl(s_rows, t_rows, self.temperature).sum() * self.temperature**2 / (n * c)
        if self.normalize == "spatial":
            loss = loss / s_rows.shape[1]
        return loss

    @staticmethod
    def _check_shapes(student: Tensor, teacher: Tensor) -> None:
        if student.dim() < 3:
            raise ShapeMismatchError(
                f"cwd: expects maps of shape (N, C, H, W) (or (N, C, *spatial)); got {tuple(student.shape)}"
            )
        if student.shape == teacher.shape:
            return
        if student.shape[0] != teacher.shape[0]:
            raise ShapeMismatchError(
                f"cwd: batch sizes differ (student {tuple(student.shape)}, teacher {tuple(teacher.shape)}); "
                f"feed the teacher the same inputs as the student"
            )
        fixes = []
        if student.shape[1] != teacher.shape[1]:
            fixes.append(f"a 'conv1x1' connector for the channels ({student.shape[1]} -> {teacher.shape[1]})")
        if student.shape[2:] != teacher.shape[2:]:
            fixes.append(
                f"a 'resize' connector for the spatial size ({tuple(student.shape[2:])} -> "
                f"{tuple(teacher.shape[2:])})"
            )
        raise ShapeMismatchError(
            f"cwd: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
            f"use {' and '.join(fixes)} (or connector 'auto')"
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize!r}"
