"""FGD: focal and global distillation of the five FPN levels (RetinaNet-style one-stage students).

Yang, Li, Jiang, Wang, Yuan & Yuan (CVPR 2022), "Focal and Global Knowledge Distillation for Detectors".
Per level: the feature error is weighted by the teacher's spatial and channel attention, separately inside
the ground-truth boxes (each box normalised by its area) and in the background; student attention maps
follow the teacher's; and a GcBlock context module on each side makes the student's global relations
match the teacher's. Coefficients are the authors' RetinaNet values (T = 0.5, alpha 1e-3, beta 5e-4,
gamma 5e-4, lambda 5e-6). Needs the ground-truth boxes, which ``DetectionDistiller`` passes. Published:
RetinaNet ResNeXt-101 -> R50, COCO 37.4 -> 40.7 AP.

    kd-tasks detect --teacher-config mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py \\
        --teacher-checkpoint retinanet_x101.pth \\
        --student-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --recipe configs/detection/fgd_fpn.py --work-dir work_dirs/fgd_retina
"""

_LEVELS = (3, 4, 5, 6, 7)

distill = dict(
    terms=[
        dict(name=f"fgd_p{level}",
             loss=dict(type="fgd", temperature=0.5, alpha_fgd=1e-3, beta_fgd=5e-4, gamma_fgd=5e-4, lambda_fgd=5e-6,
                       seed=level),
             student=f"neck@P{level}", teacher=f"neck@P{level}", connector="auto", weight=1.0)
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
