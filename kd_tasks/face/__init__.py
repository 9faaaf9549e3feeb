"""Face-recognition adapter: compact embedding students distilled from a face-recognition teacher.

- :mod:`.models` -- students (``mobilefacenet``, ``mobilefacenet_s``, ``resnet_face``) by name;
- :mod:`.margins` -- ArcFace / CosFace / SphereFace-style margin softmax heads;
- :mod:`.losses` -- embedding KD (``embedding_cosine``, ``embedding_l2``) and angular relational KD
  (``margin_rkd``), registered in ``LOSSES`` on import of this package;
- :mod:`.teachers` -- torch, ONNX (onnxruntime) and dlib teachers producing embeddings;
- :mod:`.data` -- identity-folder datasets and verification pairs;
- :mod:`.verify` -- ROC / AUC, TAR@FAR and k-fold verification accuracy;
- :mod:`.train` -- the ``kd-tasks face`` command.

onnxruntime and dlib are imported only when an ONNX or dlib teacher is built.
"""

from . import losses
from .data import IdentityFolder, split_identities, verification_pairs
from .losses import EmbeddingKDLoss, MarginRKDLoss
from .margins import ArcFace, CosFace, MarginSoftmaxLoss, NormSoftmax, SphereFace, build_margin_head
from .models import STUDENTS, FaceResNet, MobileFaceNet, build_student, load_student, save_student
from .teachers import DlibTeacher, ONNXTeacher, TorchTeacher, load_teacher
from .verify import embed, evaluate_embeddings, pair_scores, verification_metrics

__all__ = [
    "losses", "IdentityFolder", "split_identities", "verification_pairs", "EmbeddingKDLoss", "MarginRKDLoss",
    "ArcFace", "CosFace", "SphereFace", "NormSoftmax", "MarginSoftmaxLoss", "build_margin_head", "STUDENTS",
    "MobileFaceNet", "FaceResNet", "build_student", "load_student", "save_student", "TorchTeacher", "ONNXTeacher",
    "DlibTeacher", "load_teacher", "embed", "evaluate_embeddings", "pair_scores", "verification_metrics",
]
