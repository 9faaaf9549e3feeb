"""PKD: Pearson-correlation feature distillation of the FPN levels, for any pair of FPN detectors.

Cao, Zhang, Gao, Cheng, Cheng & Cheng (NeurIPS 2022), "PKD: General Distillation Framework for Object
Detectors via Pearson Correlation Coefficient". Each channel of the student's and the teacher's FPN output is
standardised (zero mean, unit variance over batch and positions) before a squared error: the teacher's
feature magnitudes, which differ between detector families and heads, no longer matter, so the teacher
may be another family (two-stage, anchor-free). Loss weight 10 per level (the authors' RetinaNet configs;
6 for Faster R-CNN students). Published: FCOS X101 teacher -> RetinaNet R50 student, COCO 36.5 -> 40.3 AP.

Levels are named by stride (``neck@P3`` = the FPN output of stride 8), so an FPN of P2-P6 (Faster R-CNN)
and one of P3-P7 (RetinaNet, FCOS) pair correctly; this recipe uses P3-P6, which both kinds have (for two
P3-P7 FPNs, add P7). An ``auto`` connector maps a narrower student FPN to the teacher's width.

    kd-tasks detect --teacher-config mmdet::fcos/fcos_x101-64x4d_fpn_gn-head_ms-640-800-2x_coco.py \\
        --teacher-checkpoint fcos_x101.pth \\
        --student-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --recipe configs/detection/pkd_fpn.py --work-dir work_dirs/pkd_fcos_x101_retina_r50
"""

_LEVELS = (3, 4, 5, 6)

distill = dict(
    terms=[
        dict(name=f"pkd_p{level}", loss=dict(type="pkd"), student=f"neck@P{level}", teacher=f"neck@P{level}",
             connector="auto", weight=10.0)
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
