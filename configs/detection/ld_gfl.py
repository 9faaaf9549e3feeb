"""LD: localization distillation of GFL box distributions, level by level.

Zheng, Ye, Wang, Ren, Hu & Cheng (CVPR 2022), "Localization Distillation for Dense Object Detection". A GFL
head predicts each box side as a distribution over ``reg_max + 1 = 17`` bins; the student's distributions
follow the teacher's (KL of the softened distributions, T = 10 as in mmdet's ``ld_r18-gflv1-r101`` config)
on the cells that cover a ground-truth box (``region="boxes"``, the "main distillation region"; mmdet's
``LDHead`` uses the positive anchors of its assigner). Both heads must be GFL-style with the same
``reg_max``. The scale differs from mmdet's (a mean over cells and sides of the KL summed over bins, against
mmdet's sum over positives of the per-bin mean, weighted by class score, divided by 4), so the weight here
is this project's choice, not mmdet's 0.25. Published: GFL R101 -> R18 on COCO, 35.8 -> 36.5 AP (LD on
the main region, paper Table 7); the issue's reference, GFL R50 40.1 -> 41.0 with a R101 teacher.

    kd-tasks detect --teacher-config mmdet::gfl/gfl_r101_fpn_ms-2x_coco.py --teacher-checkpoint gfl_r101.pth \\
        --student-config mmdet::gfl/gfl_r50_fpn_1x_coco.py \\
        --recipe configs/detection/ld_gfl.py --work-dir work_dirs/ld_gfl
"""

_LEVELS = (3, 4, 5, 6, 7)

distill = dict(
    terms=[
        dict(name=f"ld_p{level}", loss=dict(type="ld", reg_max=16, temperature=10.0, region="boxes"),
             student=f"bbox_head:1@P{level}", teacher=f"bbox_head:1@P{level}", weight=1.0)
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
