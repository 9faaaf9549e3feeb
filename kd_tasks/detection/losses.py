"""A detection-only term: feature imitation split into object and background regions by the boxes.

It is the shared :class:`~kd_tasks.shared.losses.feature.FeatureLoss` (same metrics, same masked
mean) with a mask made from the ground-truth boxes at each feature map's own resolution, so one term
config serves every FPN level.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.losses.feature import (FeatureLoss, as_target, masked_mean, per_sample_l2_normalize,
                                            shape_mismatch)
from kd_tasks.shared.registry import LOSSES

__all__ = ["ForegroundFeatureLoss", "boxes_to_mask"]


def boxes_to_mask(boxes: Sequence[Tensor], feature_shape: Sequence[int], input_shape: Sequence[int]) -> Tensor:
    """``(B, 1, h, w)`` float mask: 1 where a feature cell overlaps a box, else 0.

    ``boxes[b]`` is an ``(n, 4)`` tensor of ``(x1, y1, x2, y2)`` in the pixels of the padded input of
    size ``input_shape = (H, W)``; a map of ``(h, w)`` cells has strides ``H / h`` and ``W / w``, and
    cell ``(i, j)`` spans ``[j·sx, (j+1)·sx) × [i·sy, (i+1)·sy)``. A cell belongs to the foreground when
    that span overlaps a box by a positive area, so every box covers at least one cell on every level.
    """
    b, h, w = int(feature_shape[0]), int(feature_shape[-2]), int(feature_shape[-1])
    if len(boxes) != b:
        raise KDConfigError(f"fg_feature: {len(boxes)} box lists for a batch of {b}")
    height, width = float(input_shape[0]), float(input_shape[1])
    sy, sx = height / h, width / w
    device = boxes[0].device if b else torch.device("cpu")
    left = torch.arange(w, device=device, dtype=torch.float32) * sx
    top = torch.arange(h, device=device, dtype=torch.float32) * sy
    mask = torch.zeros(b, 1, h, w, device=device)
    for i, img_boxes in enumerate(boxes):
        if img_boxes.numel() == 0:
            continue
        bx = img_boxes.to(device=device, dtype=torch.float32)
        cols = (left[None, :] < bx[:, 2:3]) & (left[None, :] + sx > bx[:, 0:1])  # (n, w)
        rows = (top[None, :] < bx[:, 3:4]) & (top[None, :] + sy > bx[:, 1:2])  # (n, h)
        mask[i, 0] = (rows[:, :, None] & cols[:, None, :]).any(dim=0).float()
    return mask


@LOSSES.register("fg_feature", "decoupled_feature")
class ForegroundFeatureLoss(FeatureLoss):
    """Feature imitation weighted separately inside and outside the ground-truth boxes.

    Guo, Han, Wang, Xu, Xu & Xu (CVPR 2021), "Distilling Object Detectors via Decoupled Features"
    (DeFeat): object and background regions of the FPN features carry different knowledge and are
    imitated with separate weights. With ``M`` the box mask of :func:`boxes_to_mask` at the map's
    resolution (broadcast over channels) and ``ℓ`` the element-wise metric of :class:`FeatureLoss`
    (``mse`` by default)::

        L = fg_weight · Σ M·ℓ / Σ M  +  bg_weight · Σ (1 - M)·ℓ / Σ (1 - M)

    (sums over batch, channels and positions; a part with no cells is 0). DeFeat normalises each part
    by its number of pixels and includes a factor 1/2 and a sum over channels; those are constant
    factors, absorbed here by the two weights. ``bg_weight=0`` gives imitation of object regions
    only, in the spirit of Wang et al. (CVPR 2019, "Distilling Object Detectors with Fine-grained
    Feature Imitation"), with ground-truth boxes instead of anchor-matched regions.

    Needs ``gt_boxes`` (one ``(n, 4)`` tensor per image, input pixels) and ``input_shape`` (padded
    batch ``(H, W)``); :class:`~kd_tasks.detection.distiller.DetectionDistiller` passes both.
    """

    def __init__(self, metric: str = "mse", fg_weight: float = 1.0, bg_weight: float = 0.0, normalize: bool = False):
        super().__init__(metric=metric, normalize=normalize)
        if fg_weight < 0 or bg_weight < 0:
            raise KDConfigError(f"fg_feature: weights must be >= 0, got fg_weight={fg_weight}, bg_weight={bg_weight}")
        self.fg_weight, self.bg_weight = float(fg_weight), float(bg_weight)

    def forward(self, student: Tensor, teacher: Tensor, gt_boxes: Sequence[Tensor] | None = None,
                input_shape: Sequence[int] | None = None) -> Tensor:
        teacher = as_target(teacher, student)
        if student.shape != teacher.shape:
            raise shape_mismatch("fg_feature", student.shape, teacher.shape)
        if student.dim() != 4:
            raise shape_mismatch("fg_feature", student.shape, teacher.shape, "needs (B, C, H, W) feature maps")
        if gt_boxes is None or input_shape is None:
            raise KDConfigError("fg_feature needs gt_boxes= and input_shape= (DetectionDistiller passes them)")
        mask = boxes_to_mask(gt_boxes, student.shape, input_shape).to(student.device)
        if self.normalize:
            student, teacher = per_sample_l2_normalize(student), per_sample_l2_normalize(teacher)
        values = self.elementwise(student, teacher)
        loss = student.new_zeros(())
        if self.fg_weight:
            loss = loss + self.fg_weight * masked_mean(values, mask, "fg_feature")
        if self.bg_weight:
            loss = loss + self.bg_weight * masked_mean(values, 1.0 - mask, "fg_feature")
        return loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fg_weight={self.fg_weight}, bg_weight={self.bg_weight}"
