"""MMDetection 3.x / MMEngine adapter: distil an MMDetection detector with MMEngine's ``Runner``.

Importing this package imports mmdet and registers, in MMDetection's registries:

* model ``DetectionDistiller`` (:mod:`kd_tasks.detection.distiller`): student + frozen teacher +
  distillation terms from the shared core;
* hooks ``DistillStepHook``, ``TeacherCheckHook``, ``StudentExportHook``, ``SafeCheckpointHook``
  (:mod:`kd_tasks.detection.hooks`);
* losses ``fg_feature`` (:mod:`kd_tasks.detection.losses`) and ``crosskd`` (:mod:`kd_tasks.detection.crosskd`,
  student head features through the teacher's head) in the shared ``LOSSES`` registry.

``kd-tasks detect`` (:mod:`kd_tasks.detection.train`) builds the MMEngine config and runs it.
``import kd_tasks`` alone never imports this package.
"""

from .crosskd import CrossKDLoss
from .runner import KDRunner
from .checkpoint import extract_state_dict, load_checkpoint_file, load_weights
from .distiller import DetectionDistiller, build_detector
from .hooks import DistillStepHook, SafeCheckpointHook, StudentExportHook, TeacherCheckHook
from .losses import ForegroundFeatureLoss, boxes_to_mask

__all__ = [
    "DetectionDistiller", "build_detector", "DistillStepHook", "TeacherCheckHook", "StudentExportHook",
    "SafeCheckpointHook", "ForegroundFeatureLoss", "boxes_to_mask", "load_checkpoint_file",
    "extract_state_dict", "load_weights", "CrossKDLoss", "KDRunner",
]
