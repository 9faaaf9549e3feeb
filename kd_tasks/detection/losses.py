"""A detection-only term: feature imitation split into object and background regions by the boxes.

It is the shared :class:`~kd_tasks.shared.losses.feature.FeatureLoss` (same metrics, same masked
mean) with a mask made from the ground-truth boxes at each feature map's own resolution, so one term
config serves every FPN level.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.losses.dense import boxes_to_mask
from kd_tasks.shared.losses.feature import (FeatureLoss, as_target, masked_mean, per_sample_l2_normalize,
                                            shape_mismatch)
from kd_tasks.shared.registry import LOSSES

__all__ = ["ForegroundFeatureLoss", "boxes_to_mask"]


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
