"""Logit KD on the dense classification maps of a one-stage head, level by level.

Hinton, Vinyals & Dean (2015) applied per prediction: every anchor (or point) of every level is a set of
per-class binary distributions (sigmoid heads: RetinaNet, FCOS, ATSS, GFL) and the student's follow the
teacher's (``dense_kd``: binary KL summed over classes, averaged over predictions, times T²). Student and
teacher must share the head layout (anchors per position and classes; the class count is read from the
student's head). Levels are named by stride (``bbox_head:0@P3`` = the class scores of the stride-8 level).
This is the classic "logit mimicking" baseline that LD and CrossKD compare against; no single published
number is its target here (those papers report it only inside their own ablations), so treat it as the
baseline for ``ld_gfl.py`` and ``crosskd_gfl.py``.

    kd-tasks detect --teacher-config mmdet::gfl/gfl_r101_fpn_ms-2x_coco.py --teacher-checkpoint gfl_r101.pth \\
        --student-config mmdet::gfl/gfl_r50_fpn_1x_coco.py \\
        --recipe configs/detection/dense_kd_heads.py --work-dir work_dirs/dense_kd_gfl
"""

_LEVELS = (3, 4, 5, 6, 7)

distill = dict(
    terms=[
        dict(name=f"cls_kd_p{level}", loss=dict(type="dense_kd", mode="sigmoid", temperature=1.0),
             student=f"bbox_head:0@P{level}", teacher=f"bbox_head:0@P{level}", weight=1.0)
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
