"""MGD: masked generative distillation of the five FPN levels (RetinaNet-style one-stage students).

Yang, Li, Shao, Shi, Yuan & Yuan (ECCV 2022), "Masked Generative Distillation". On each level, a random
65 % of the student's positions is zeroed and a small generation block (3x3 conv, ReLU, 3x3 conv) must
rebuild the teacher's full feature map from what is left: the student learns features from which the
teacher's can be generated, not a copy of them. ``alpha_mgd=2e-5``, ``lambda_mgd=0.65`` are the authors'
RetinaNet values (their two-stage values: 5e-7 and 0.45). Each level has its own block and its own mask
generator (``seed``), so the masks never touch the run's global random numbers. Published: RetinaNet
ResNeXt-101 -> R50, COCO 37.4 -> 41.0 AP.

    kd-tasks detect --teacher-config mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py \\
        --teacher-checkpoint retinanet_x101.pth \\
        --student-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --recipe configs/detection/mgd_fpn.py --work-dir work_dirs/mgd_retina
"""

_LEVELS = (3, 4, 5, 6, 7)

distill = dict(
    terms=[
        dict(name=f"mgd_p{level}", loss=dict(type="mgd", alpha_mgd=2e-5, lambda_mgd=0.65, seed=level),
             student=f"neck@P{level}", teacher=f"neck@P{level}", connector="auto", weight=1.0)
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
