"""CrossKD on GFL: GFL R101 teacher (2x, multi-scale) -> GFL R50 student (1x), both heads 4 convs x 256.

Wang, Chen, Zheng, Li, Cheng & Hou (CVPR 2024), "CrossKD: Cross-Head Knowledge Distillation for Object
Detection". The student's head features after its 3rd class / box conv run through the teacher's 4th conv
and final conv (``reused_index=3``, the authors' ``reused_teacher_head_idx=3``), and those cross-head
predictions mimic the teacher's: class scores by binary KD, box distributions by LD (KL over the 17 bins of
each side, ``reg_max=16``, T = 1). Published (authors' config
``configs/crosskd/crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py``, COCO val): GFL R50 1x 40.2 AP -> 43.7 AP
with CrossKD (teacher GFL R101 2x-ms: 44.9 AP).

    kd-tasks detect --teacher-config mmdet::gfl/gfl_r101_fpn_ms-2x_coco.py \\
        --teacher-checkpoint gfl_r101_fpn_mstrain_2x_coco_20200629_200126-dd12f847.pth \\
        --student-config mmdet::gfl/gfl_r50_fpn_1x_coco.py \\
        --recipe configs/detection/crosskd_gfl.py --work-dir work_dirs/crosskd_gfl_r101_r50

A narrower student head is mapped to the teacher's width by a 1x1 convolution inside the loss
(``connector="auto"``: the identity when the widths match, as here). One term per FPN level and branch; P3..P7 are the head's calls 0..4 (``bbox_head.cls_convs.2#k``) and
elements 0..4 of its outputs (``bbox_head:0.k`` class scores, ``bbox_head:1.k`` box distributions).

Where this differs from the authors (see ``kd_tasks/detection/crosskd.py``), and how the weights follow:

* class scores: ``dense_kd`` (binary KL per class, summed over classes, averaged over the level's
  positions; the same gradient as ``sigmoid_kd`` times the number of classes, and 0 when the predictions
  agree) instead of KD-QFL, which sums over all positions of all levels, multiplies by
  ``|σ(cross) - σ(teacher)|`` and divides by the number of positive anchors. Weight of level l:
  ``150 x share_l``, where ``share_l`` is the level's share of all positions (P3 ~ 75 %, each coarser level
  a quarter of the previous), so the five terms together are a mean over all positions as the authors'
  sum is. 150 is derived, not tuned: the authors' normaliser is about 300 positions per positive anchor
  on COCO at 1333x800 (~20,000 positions per image; ATSS gives about 0.2·k·L = 9 positives per object and
  COCO has ~7.3 objects per image), halved for the focal factor (|Δσ| ~ 0.1 to 0.5 where it matters).
* boxes: ``ld`` on the cells covering a ground-truth box (``region="boxes"``), averaged over cells and
  sides; the authors weight every position by the teacher's highest class score and divide by the sum of
  those weights. Weight ``4 x share_l`` (their sum over the 4 sides per position).
* the student's head feature enters the teacher's conv as it is; the authors first rescale its
  pre-activation channels to the teacher's mean and standard deviation.
"""

_LEVELS = 5
_SHARE = [4.0**-level / sum(4.0**-j for j in range(_LEVELS)) for level in range(_LEVELS)]

distill = dict(
    terms=[
        dict(name=f"crosskd_cls_p{level + 3}",
             loss=dict(type="crosskd", branch="cls", reused_index=3, connector="auto",
                       loss=dict(type="dense_kd", mode="sigmoid", temperature=1.0)),
             student=f"bbox_head.cls_convs.2#{level}", teacher=f"bbox_head:0.{level}",
             weight=round(150.0 * _SHARE[level], 3))
        for level in range(_LEVELS)
    ] + [
        dict(name=f"crosskd_reg_p{level + 3}",
             loss=dict(type="crosskd", branch="reg", reused_index=3, level=level, connector="auto",
                       loss=dict(type="ld", reg_max=16, temperature=1.0, region="boxes")),
             student=f"bbox_head.reg_convs.2#{level}", teacher=f"bbox_head:1.{level}",
             weight=round(4.0 * _SHARE[level], 4))
        for level in range(_LEVELS)
    ],
)

# Distillation adds gradient; clip it (see the project README on non-finite losses).
cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
