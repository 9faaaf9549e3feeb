"""Face-recognition adapter: compact embedding students distilled from a face-recognition teacher.

- :mod:`.models` -- students (``mobilefacenet``, ``mobilefacenet_s``, ``resnet_face``) by name;
- :mod:`.margins` -- ArcFace / CosFace / SphereFace-style margin softmax heads (initialised or frozen
  at the teacher's class centres with ``init_head_from_teacher``);
- :mod:`.losses` -- embedding KD (``embedding_cosine``, ``embedding_l2``, ``embedding_conditioned``),
  angular relational KD (``margin_rkd``), EKD (``ekd``), AdaDistill (``adadistill``) and
  MarginDistillation (``margin_distillation``), registered in ``LOSSES`` on import of this package;
- :mod:`.space` -- teacher-space conditioning (centre / whiten) and teacher class centres;
- :mod:`.teachers` -- torch, ONNX (onnxruntime; declared input convention) and dlib teachers;
- :mod:`.data` -- identity-folder and unlabelled image datasets (aspect kept), verification pairs;
- :mod:`.formats` -- insightface's ``train.rec``/``train.idx`` and verification ``.bin`` sets;
- :mod:`.align` -- five-landmark alignment to insightface's 112x112 template (``norm_crop``);
- :mod:`.export` -- the student to ONNX (insightface's input convention) and TorchScript;
- :mod:`.verify` -- ROC / AUC (and its PNG), TAR@FAR and k-fold verification accuracy;
- :mod:`.train` -- the ``kd-tasks face`` command.

onnxruntime and dlib are imported only when an ONNX or dlib teacher is built.
"""

from . import losses
from .data import IdentityFolder, ImageFolder, split_identities, verification_pairs
from .losses import (AdaDistillLoss, ConditionedEmbeddingLoss, EKDLoss, EmbeddingKDLoss, MarginDistillationLoss,
                     MarginRKDLoss)
from .margins import (ArcFace, CosFace, MarginSoftmaxLoss, NormSoftmax, SphereFace, build_margin_head,
                      init_head_from_teacher)
from .space import TeacherSpace, class_centres
from .models import STUDENTS, FaceResNet, MobileFaceNet, build_student, load_student, save_student
from .teachers import DlibTeacher, ONNXTeacher, TorchTeacher, load_teacher
from .verify import embed, evaluate_embeddings, pair_scores, verification_metrics

__all__ = [
    "losses", "IdentityFolder", "ImageFolder", "split_identities", "verification_pairs", "EmbeddingKDLoss",
    "MarginRKDLoss", "ConditionedEmbeddingLoss", "EKDLoss", "AdaDistillLoss", "MarginDistillationLoss",
    "init_head_from_teacher", "TeacherSpace", "class_centres",
    "ArcFace", "CosFace", "SphereFace", "NormSoftmax", "MarginSoftmaxLoss", "build_margin_head", "STUDENTS",
    "MobileFaceNet", "FaceResNet", "build_student", "load_student", "save_student", "TorchTeacher", "ONNXTeacher",
    "DlibTeacher", "load_teacher", "embed", "evaluate_embeddings", "pair_scores", "verification_metrics",
]
