"""Channel-wise distillation (CWD) of the five FPN outputs, RetinaNet R50 teacher -> R18 student.

Shu, Liu, Gao, Yan & Shen (ICCV 2021), "Channel-wise Knowledge Distillation for Dense Prediction".
Each FPN level P3..P7 (``neck@P3`` .. ``neck@P7``: the FPN output of stride 8 .. 128, whatever
position the detector gives it) of the student follows the teacher's per-channel spatial
distributions (temperature 1). The weight 5.0 per level is the value of the RetinaNet CWD configs of
mmdetection-distiller (which sums the KL over positions and divides by N*C, as kd-tasks' ``cwd`` does);
tune it per dataset. Both FPNs have 256 channels, so the ``auto`` connector is the identity; it becomes
a 1x1 convolution if the student's FPN is narrower.

    kd-tasks detect --teacher-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --teacher-checkpoint retinanet_r50_fpn_1x_coco.pth \\
        --student-config mmdet::retinanet/retinanet_r18_fpn_1x_coco.py \\
        --recipe configs/detection/cwd_retinanet_fpn.py --work-dir work_dirs/cwd_r50_r18
"""

distill = dict(
    terms=[
        dict(name=f"cwd_p{level + 3}", loss=dict(type="cwd", temperature=1.0),
             student=f"neck@P{level + 3}", teacher=f"neck@P{level + 3}", connector="auto",
             weight=5.0)
        for level in range(5)
    ],
)

# Distillation adds gradient; clip it (see the project README on non-finite losses).
cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
