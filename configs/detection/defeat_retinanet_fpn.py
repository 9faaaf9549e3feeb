"""Decoupled feature imitation (DeFeat) of the five FPN levels, RetinaNet teacher -> RetinaNet student.

Guo, Han, Wang, Xu, Xu & Xu (CVPR 2021), "Distilling Object Detectors via Decoupled Features". The
student's FPN output passes an adaptation 1x1 convolution and imitates the teacher's with a squared
error averaged separately inside and outside the ground-truth boxes (loss ``fg_feature``). The authors'
released RetinaNet setting weights the background FOUR times the object regions (``neg_gain=4``):
regions without objects carry much of the knowledge that the paper is about. Each of the five levels
P3-P7 gets 1/5 of the weight, so the total is the mean over levels. Published: RetinaNet R101 -> R50 on
COCO, 37.4 -> 39.7 AP (paper, Table 6).

Not included: the RoI-head distillation of the two-stage variant (Faster R-CNN); a one-stage student
has no RoI head.

    kd-tasks detect --teacher-config mmdet::retinanet/retinanet_r101_fpn_1x_coco.py \\
        --teacher-checkpoint retinanet_r101_fpn_1x_coco.pth \\
        --student-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
        --recipe configs/detection/defeat_retinanet_fpn.py --work-dir work_dirs/defeat_r101_r50
"""

_LEVELS = (3, 4, 5, 6, 7)

distill = dict(
    terms=[
        dict(name=f"defeat_p{level}", loss=dict(type="fg_feature", fg_weight=1.0, bg_weight=4.0),
             student=f"neck@P{level}", teacher=f"neck@P{level}", connector="conv1x1", weight=1.0 / len(_LEVELS))
        for level in _LEVELS
    ],
)

cfg_options = {"optim_wrapper.clip_grad": dict(max_norm=35, norm_type=2)}
