"""``kd-tasks face``: train a compact face-embedding student from a face-recognition teacher.

Steps: split the identity folders into training and held-out verification identities; run the
teacher once over both sets and cache its embeddings (:class:`~kd_tasks.shared.cache.TeacherCache`,
keyed by the teacher file, the images and the preprocessing); train the student with a margin
softmax head (ArcFace / CosFace / ...) on the training identities plus a distillation term on the
embeddings, through the shared :class:`~kd_tasks.shared.training.Trainer` (checkpoints, resume,
TensorBoard); evaluate verification (AUC, k-fold accuracy, TAR@FAR) on pairs of the held-out
identities, for the teacher and the student. Outputs in ``--output-dir``:
``export/model.safetensors`` + ``export/student.json`` (reload with
:func:`kd_tasks.face.models.load_student`), ``verification.json``, ``log.jsonl``, ``tensorboard/``,
checkpoints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = """example:
  kd-tasks face --teacher teacher.onnx --data faces/ --student mobilefacenet --embedding-dim 128 \\
      --margin arcface --kd cosine --epochs 20 --output-dir runs/face
  kd-tasks face --teacher dlib:dlib_face_recognition_resnet_model_v1.dat \\
      --shape-predictor shape_predictor_5_face_landmarks.dat --data orl/ --kd margin_rkd --output-dir runs/dlib
  kd-tasks face --config configs/face/mobilefacenet_arcface_cosine.yaml --teacher t.onnx --data faces/
  kd-tasks face --config configs/face/few_labels_unlabelled_centred.yaml --teacher t.onnx --data few_labelled/ \
      --unlabelled-data more_faces/ --val-data held_out/ --output-dir runs/few_labels

data: faces/<identity>/<image>.png|pgm|jpg; grayscale images are repeated to 3 channels.
--teacher: an .onnx file, a TorchScript .pt file, or dlib:<path to dlib_face_recognition_resnet_model_v1.dat>.
"""

# --kd choice -> LOSSES config; True where student and teacher widths must be equal
KD_LOSSES: dict[str, tuple[Any, bool]] = {
    "cosine": ("embedding_cosine", True),
    "l2": ("embedding_l2", True),
    "mse": ("mse", True),
    "rkd": ("rkd", False),
    "sp": ("sp", False),
    "pkt": ("pkt", False),
    "cc": ("cc", False),
    "margin_rkd": ("margin_rkd", False),
    "centred": ({"type": "embedding_conditioned", "mode": "centre"}, True),
    "whitened": ({"type": "embedding_conditioned", "mode": "whiten"}, True),
    "ekd": ("ekd", False),
    "adadistill": ("adadistill", False),
    "margin_distillation": ("margin_distillation", False),
    "none": (None, False),
}
# --kd choices that are margin heads themselves: they replace the --margin head
HEAD_METHODS = ("adadistill", "margin_distillation")
# --kd choices whose labels come from the identity folders
NEEDS_LABELS = ("ekd", "adadistill", "margin_distillation")
# --kd choices that read no identity labels (usable on images without identities)
LABEL_FREE_KD = ("centred", "whitened", "cosine", "l2", "mse", "rkd", "sp", "pkt", "cc")
SPACE_CHOICES = ("none", "centre", "whiten")
MARGIN_CHOICES = ("arcface", "cosface", "sphereface", "softmax", "none")


def option_rules() -> dict[str, tuple]:
    from kd_tasks.shared.validate import AT_LEAST_2, NON_NEG_INT, NON_NEGATIVE, POS_INT, POSITIVE

    return {
        "val_identities": AT_LEAST_2, "max_pairs": AT_LEAST_2, "image_size": ("int", 8, None, False),
        "teacher_input_size": ("int", 8, None, False), "embedding_dim": POS_INT, "margin_m": NON_NEGATIVE,
        "scale": POSITIVE, "margin_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "epochs": POSITIVE,
        "max_steps": POS_INT, "labelled_repeat": POS_INT, "batch_size": ("int", 2, None, False), "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "warmup_steps": NON_NEG_INT, "seed": NON_NEG_INT, "split_seed": NON_NEG_INT, "eval_every": POS_INT,
        "save_every": POS_INT, "log_every": POS_INT, "min_teacher_auc": ("number", 0, 1, False),
    }


def check_options(args: argparse.Namespace, config_path: str | None = None) -> None:
    """Every numeric option (from the command line or the --config file), named, before any work."""
    from kd_tasks.shared.errors import KDConfigError
    from kd_tasks.shared.validate import check_rules

    check_rules(vars(args), option_rules())
    for key in ("teacher", "data", "output_dir", "val_data", "cache_dir", "shape_predictor", "student",
                "unlabelled_data"):
        value = getattr(args, key)
        if value is not None and not isinstance(value, str):
            where = f" (in {config_path})" if config_path else ""
            raise KDConfigError(f"--{key.replace('_', '-')}{where} must be a path or name, got {value!r}")
    for key, choices in (("margin", MARGIN_CHOICES), ("kd", tuple(KD_LOSSES)), ("optimizer", ("sgd", "adamw", "adam")),
                         ("scheduler", ("cosine", "linear", "constant")), ("image_fit", ("pad", "stretch")),
                         ("teacher_scaling", ("insightface", "unit", "raw")), ("teacher_channels", ("rgb", "bgr")),
                         ("teacher_layout", ("auto", "nchw", "nhwc")), ("head_init", ("random", "teacher")),
                         ("teacher_space", (None, *SPACE_CHOICES))):
        if getattr(args, key) not in choices:
            named = ", ".join(c for c in choices if c is not None)
            raise KDConfigError(f"--{key.replace('_', '-')} must be one of {named}, got {getattr(args, key)!r}")
    if args.exclude is not None and (not isinstance(args.exclude, list) or
                                     not all(isinstance(e, str) for e in args.exclude)):
        raise KDConfigError(f"--exclude must be file patterns like s10/target.jpg, got {args.exclude!r}")
    for key in ("flip", "resume", "overwrite", "rebuild_cache", "cpu", "quiet", "freeze_head", "unlabelled"):
        if not isinstance(getattr(args, key), bool):
            raise KDConfigError(f"--{key.replace('_', '-')} must be true or false, got {getattr(args, key)!r}")
    if args.resume and args.overwrite:
        raise KDConfigError("--resume and --overwrite both given",
                            hint="--resume continues the run in --output-dir, --overwrite replaces it: give one")


def build_parser() -> argparse.ArgumentParser:
    from kd_tasks.shared.errors import ArgumentParser

    p = ArgumentParser(
        prog="kd-tasks face",
        description="Train a compact face-embedding student from a face-recognition teacher "
                    "(margin softmax + embedding distillation), and report verification metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", "--recipe", dest="config",
                   help="YAML file of option values (keys as the long options, '-' or '_'); command-line options "
                        "override it (--recipe: the same)")
    g = p.add_argument_group("inputs")
    g.add_argument("--teacher", help="teacher: .onnx, TorchScript .pt, or dlib:<path.dat> (required)")
    g.add_argument("--data", help="folder of identity folders for training (required)")
    g.add_argument("--val-data", help="folder of identity folders for verification (default: hold out "
                                      "identities of --data)")
    g.add_argument("--val-identities", type=int, default=None,
                   help="identities of --data held out for verification (default: 25%%, at least 2)")
    g.add_argument("--max-pairs", type=int, default=6000, help="at most this many verification pairs")
    g.add_argument("--image-size", type=int, default=112, help="square image side for the student (112)")
    g.add_argument("--teacher-input-size", type=int, default=None,
                   help="the teacher reads the images at this side (default: --image-size; an ONNX model with a "
                        "fixed input size gets its own size)")
    g.add_argument("--shape-predictor", help="dlib teacher: shape_predictor_5_face_landmarks.dat for alignment")
    g.add_argument("--image-fit", default="pad", help="pad (keep the aspect ratio, default) or stretch images to "
                                                      "the square")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="leave out files of --data/--val-data matching <identity>/<file> patterns "
                        "(repeatable; e.g. s10/target.jpg)")
    g.add_argument("--unlabelled", action="store_true",
                   help="--data is a folder of face images without identities (any depth): train from the teacher's "
                        "embeddings alone (needs --val-data with identity folders and a --kd without labels)")
    g.add_argument("--unlabelled-data", metavar="FOLDER",
                   help="face images without identities (any depth) to train on beside the labelled --data: the "
                        "distillation term acts on every image, the margin loss on the labelled ones only (needs a "
                        "--kd without labels: centred, whitened, cosine, l2, mse, rkd, sp, pkt, cc)")
    g.add_argument("--labelled-repeat", type=int, default=1, metavar="R",
                   help="with --unlabelled-data: list every labelled image R times per epoch, so that a few labelled "
                        "images keep their share of each batch beside many unlabelled ones (1)")
    g.add_argument("--teacher-scaling", default="insightface",
                   help="ONNX teacher input scaling: insightface ((x-127.5)/127.5, default), unit (x/255), raw (0..255)")
    g.add_argument("--teacher-channels", default="rgb", help="ONNX teacher channel order: rgb (default) or bgr")
    g.add_argument("--teacher-layout", default="auto", help="ONNX teacher input layout: auto, nchw or nhwc")
    g.add_argument("--min-teacher-auc", type=float, default=0.6,
                   help="refuse a teacher whose own verification AUC on the validation pairs is below this (0.6; "
                        "0 skips the check)")
    g = p.add_argument_group("model and losses")
    g.add_argument("--student", default="mobilefacenet", help="student architecture (mobilefacenet, "
                                                               "mobilefacenet_s, resnet_face)")
    g.add_argument("--embedding-dim", type=int, default=None, help="student embedding width (default: the teacher's)")
    g.add_argument("--margin", default="arcface", choices=MARGIN_CHOICES,
                   help="margin softmax on the training identities; none = distillation only")
    g.add_argument("--margin-m", type=float, default=None, help="margin m (default: the head's, e.g. ArcFace 0.5)")
    g.add_argument("--scale", type=float, default=32.0, help="logit scale s of the margin head (32)")
    g.add_argument("--margin-weight", type=float, default=1.0, help="weight of the margin loss")
    g.add_argument("--kd", default="cosine", choices=list(KD_LOSSES), help="distillation loss on the embeddings")
    g.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation term")
    g.add_argument("--teacher-space", default=None,
                   help="condition the teacher's embeddings with training-set statistics: none, centre or whiten "
                        "(default: centre for --kd centred and --head-init teacher, whiten for whitened, none -- "
                        "the papers' -- for ekd, adadistill, margin_distillation)")
    g.add_argument("--head-init", default="random",
                   help="random, or teacher: start the margin head at the teacher's class centres")
    g.add_argument("--freeze-head", action="store_true", help="keep the margin head fixed (with --head-init teacher)")
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", help="where checkpoints, the student and the report go (required)")
    g.add_argument("--epochs", type=float, default=10)
    g.add_argument("--max-steps", type=int, default=None, help="optimiser steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.05,
                   help="peak learning rate (--learning-rate: the same)")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw", "adam"))
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--scheduler", default="cosine", choices=("cosine", "linear", "constant"))
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--flip", action="store_true", help="random horizontal flips (the teacher cache keeps the "
                                                        "un-flipped view)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split-seed", type=int, default=0, help="seed of the identity split")
    g.add_argument("--eval-every", type=int, default=None, help="verify every N steps (and at the end)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output-dir (checkpoints, logs, export; the teacher cache stays)")
    g.add_argument("--cache-dir", help="teacher-embedding cache (default: <output-dir>/teacher_cache)")
    g.add_argument("--rebuild-cache", action="store_true", help="recompute the cached teacher embeddings")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--quiet", action="store_true", help="no progress bar or per-step console log")
    g.add_argument("--no-report", action="store_true",
                   help="skip the compression report of teacher and student (report.md/.json/.png: parameters, "
                        "FLOPs, size, latency, memory, verification AUC)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    config_path = _find_config(argv)
    if config_path is not None:
        parser.set_defaults(**load_config(config_path, parser))
    args = parser.parse_args(argv)
    missing = [opt for opt in ("teacher", "data", "output_dir") if getattr(args, opt) is None]
    if missing:
        parser.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))
    check_options(args, config_path)
    return args


def _find_config(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", "--recipe", dest="config")
    known, _ = pre.parse_known_args(argv)
    return known.config


def load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Option values from a YAML mapping; unknown keys are rejected with close matches."""
    import yaml

    from kd_tasks.shared.errors import KDConfigError, suggest

    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise KDConfigError(f"config {path!r} is not valid YAML ({' '.join(str(e).split())})",
                            hint="fix its syntax") from None
    if not isinstance(data, dict):
        raise KDConfigError(f"config {path!r} must be a mapping of option: value")
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = parser._option_string_actions.get(f"--{key}")
        if dest not in dests and action is not None and action.dest in dests:
            dest = action.dest  # any spelling of an option, e.g. learning-rate for lr
        if dest not in dests:
            raise KDConfigError(f"config {path!r}: {suggest(dest, sorted(dests), 'option')}")
        out[dest] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """``kd-tasks face`` inside the shared error boundary (:func:`kd_tasks.shared.errors.run_cli`)."""
    from kd_tasks.shared.errors import run_cli

    return run_cli("face", lambda a: run(parse_args(a)), argv)


def build_terms(kd: str, weight: float, student_dim: int, teacher_dim: int, num_classes: int | None = None,
                scale: float | None = None, teacher_space: str | None = None) -> list[dict[str, Any]]:
    """The distiller terms of a ``--kd`` choice (a linear connector when widths must match and differ)."""
    loss, same_width = KD_LOSSES[kd]
    if loss is None or weight == 0:
        return []
    loss = {"type": loss} if isinstance(loss, str) else dict(loss)
    if teacher_space is not None:
        if loss["type"] == "embedding_conditioned":
            loss["mode"] = teacher_space
        elif loss["type"] in ("ekd", *HEAD_METHODS):
            loss["space"] = teacher_space
    if loss["type"] in HEAD_METHODS:
        loss.update(num_classes=num_classes, embedding_dim=student_dim)
        if scale is not None:
            loss["scale"] = scale
    loss = loss["type"] if list(loss) == ["type"] else loss
    term: dict[str, Any] = {"name": f"kd_{kd}", "loss": loss, "weight": weight}
    if same_width and student_dim != teacher_dim:
        term["connector"] = "linear"
    return [term]


def check_unlabelled_data(args: argparse.Namespace) -> None:
    """``--unlabelled-data`` needs labelled identity folders beside it and a distillation loss without labels."""
    from kd_tasks.shared.errors import KDConfigError

    if not args.unlabelled_data:
        if args.labelled_repeat != 1:
            raise KDConfigError("--labelled-repeat balances labelled images against --unlabelled-data images",
                                hint="add --unlabelled-data FOLDER or drop --labelled-repeat")
        return
    if args.unlabelled:
        raise KDConfigError("--unlabelled-data adds images without identities to labelled --data, but --unlabelled "
                            "says --data has no identities", hint="give one of the two")
    if args.kd not in LABEL_FREE_KD:
        raise KDConfigError(f"--unlabelled-data images carry no identity, so only the distillation term can use them: "
                            f"--kd {args.kd} reads labels or distils nothing",
                            hint=f"use --kd {', '.join(LABEL_FREE_KD)}")


def labelled_only(loss):
    """A margin loss over the rows with an identity (``target >= 0``) only; 0, kept in the graph, for a batch
    of images without identities (``--unlabelled-data``)."""
    import torch

    class LabelledOnlyLoss(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, embeddings: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            keep = target >= 0
            if not bool(keep.any()):
                return embeddings.sum() * 0.0
            return self.inner(embeddings[keep], target[keep])

    return LabelledOnlyLoss(loss)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from kd_tasks.shared.cache import TeacherCache
    from kd_tasks.shared.checkpoint import prepare_output_dir
    from kd_tasks.shared.distiller import Distiller
    from kd_tasks.shared.errors import KDConfigError, KDError
    from kd_tasks.shared.training import TrainConfig, Trainer

    from . import losses as _face_losses  # noqa: F401 (registers the face losses)
    from .data import IdentityFolder, ImageFolder, LabelledWithUnlabelled, split_identities, verification_pairs
    from .margins import MarginSoftmaxLoss, build_margin_head, init_head_from_teacher
    from .models import build_student, write_spec
    from .space import TeacherSpace, class_centres
    from .teachers import check_teacher, load_teacher
    from .verify import embed, evaluate_embeddings, pair_scores, plot_roc

    head_method = args.kd in HEAD_METHODS
    margin = "none" if head_method else args.margin
    if margin == "none" and args.kd == "none":
        raise KDConfigError("--margin none with --kd none leaves nothing to train on; choose one")
    if args.unlabelled:
        if not args.val_data:
            raise KDConfigError("--unlabelled needs --val-data (identity folders to verify on)")
        if margin != "none" or args.kd in (*NEEDS_LABELS, "margin_rkd", "none"):
            raise KDConfigError(f"--unlabelled trains from the teacher alone: use --margin none and a --kd without "
                                f"labels (centred, whitened, cosine, l2, rkd, sp, pkt, cc), got --margin {args.margin} "
                                f"--kd {args.kd}")
    check_unlabelled_data(args)
    if args.freeze_head and args.head_init != "teacher":
        raise KDConfigError("--freeze-head keeps the head where --head-init teacher puts it; add --head-init teacher")
    if head_method and args.margin != "none":
        print(f"--kd {args.kd} is a margin head itself: it replaces --margin {args.margin}")
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"--data folder {args.data!r} not found")
    if args.unlabelled_data and not Path(args.unlabelled_data).is_dir():
        raise FileNotFoundError(f"--unlabelled-data folder {args.unlabelled_data!r} not found")
    if args.val_data and not Path(args.val_data).is_dir():
        raise FileNotFoundError(f"--val-data folder {args.val_data!r} not found")
    output_dir = Path(args.output_dir)
    prepare_output_dir(output_dir, args.resume, args.overwrite, "--output-dir")
    try:
        teacher = load_teacher(args.teacher, shape_predictor=args.shape_predictor, scaling=args.teacher_scaling,
                               channels=args.teacher_channels, layout=args.teacher_layout)
    except (KDError, OSError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 -- a file that is not a model (bad ONNX, not TorchScript...)
        raise KDConfigError(f"--teacher {args.teacher!r} cannot be loaded ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})",
                            hint="give a valid .onnx file, a TorchScript .pt file, or dlib:<path to .dat>") from None

    if args.val_data:
        train_ids, val_root, val_ids = None, args.val_data, None
    else:
        train_ids, val_ids = split_identities(args.data, num_test=args.val_identities, seed=args.split_seed)
        val_root = args.data
    view = {"fit": args.image_fit, "exclude": args.exclude or ()}
    if args.unlabelled:
        train_ids = None

        def train_folder(size, flip=False):
            return ImageFolder(args.data, size, flip=flip, fit=args.image_fit, exclude=args.exclude or ())
    elif args.unlabelled_data:
        def train_folder(size, flip=False):
            return LabelledWithUnlabelled(IdentityFolder(args.data, size, train_ids, flip=flip, **view),
                                          ImageFolder(args.unlabelled_data, size, flip=flip, fit=args.image_fit),
                                          repeat=args.labelled_repeat)
    else:
        def train_folder(size, flip=False):
            return IdentityFolder(args.data, size, train_ids, flip=flip, **view)
    train_view = train_folder(args.image_size)
    train_set = train_folder(args.image_size, flip=True) if args.flip else train_view
    val_set = IdentityFolder(val_root, args.image_size, val_ids, **view)
    # the teacher's view of the same samples (same order, aspect kept), e.g. larger images for a bigger teacher
    teacher_size = args.teacher_input_size or args.image_size
    teacher_train = train_folder(teacher_size)
    teacher_val = IdentityFolder(val_root, teacher_size, val_ids, **view)

    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "teacher_cache"
    key = {"teacher_id": teacher.fingerprint(), "rebuild": args.rebuild_cache, "batch_size": 32}
    train_cache = TeacherCache.load_or_build(teacher, teacher_train, cache_dir / "train", **key)
    val_cache = TeacherCache.load_or_build(teacher, teacher_val, cache_dir / "val", **key)
    teacher_dim = int(train_cache.arrays["output"].shape[1])
    print(f"teacher embeddings: {train_cache.status} (train, {len(train_cache)}), {val_cache.status} "
          f"(val, {len(val_cache)}), dim {teacher_dim} -- {cache_dir}")

    pairs = verification_pairs(val_set.labels, max_pairs=args.max_pairs, seed=args.split_seed)
    teacher_metrics = evaluate_embeddings(val_cache.arrays["output"], pairs)
    print(f"teacher check: AUC {teacher_metrics['auc']:.4f} on {len(pairs)} validation pairs")
    check_teacher(teacher_metrics, args.min_teacher_auc)
    train_teacher = np.asarray(train_cache.arrays["output"], dtype=np.float32)
    labelled = (train_view.labels >= 0).numpy()  # rows with an identity (all but --unlabelled-data images)
    if args.unlabelled_data:
        print(f"training images: {int(labelled.sum())} labelled, {int((~labelled).sum())} without identities "
              f"(distillation only)")
    space_mode = args.teacher_space

    student_dim = args.embedding_dim or teacher_dim
    if (head_method or args.head_init == "teacher") and student_dim != teacher_dim:
        what = f"--kd {args.kd}" if head_method else "--head-init teacher"
        raise KDConfigError(f"{what} puts the student's embeddings next to the teacher's class centres: "
                            f"--embedding-dim must be the teacher's width {teacher_dim}, got {student_dim}")
    torch.manual_seed(args.seed)
    student = build_student(args.student, embedding_dim=student_dim, input_size=args.image_size)
    task_loss = None
    if margin != "none":
        head_kwargs = {"scale": args.scale}
        if args.margin_m is not None and margin != "softmax":
            head_kwargs["margin"] = int(args.margin_m) if margin == "sphereface" else args.margin_m
        head = build_margin_head(margin, student_dim, train_view.num_classes, **head_kwargs)
        if args.head_init == "teacher":
            space = TeacherSpace(space_mode or "centre").fit(train_teacher)
            centres = class_centres(train_teacher[labelled], train_view.labels.numpy()[labelled],
                                    train_view.num_classes, space)
            init_head_from_teacher(head, centres, freeze=args.freeze_head)
            print(f"margin head: the teacher's class centres ({space.mode} space)"
                  f"{', frozen' if args.freeze_head else ''}")
        task_loss = MarginSoftmaxLoss(head)
        if args.unlabelled_data:
            task_loss = labelled_only(task_loss)
    elif args.head_init == "teacher":
        raise KDConfigError("--head-init teacher needs a margin head (--margin arcface/cosface/...)")
    terms = build_terms(args.kd, args.kd_weight, student_dim, teacher_dim, num_classes=train_view.num_classes,
                        scale=args.scale, teacher_space=space_mode)
    distiller = Distiller(student, None, terms=terms, task_loss=task_loss, task_weight=args.margin_weight)
    for term in distiller.terms:  # teacher-space statistics and teacher class centres from the training set
        space = getattr(term.loss, "space", None)
        if space is not None:
            space.fit(train_teacher)
        if hasattr(term.loss, "init_centres") and type(term.loss).__name__ == "MarginDistillationLoss":
            term.loss.init_centres(class_centres(train_teacher, train_view.labels, train_view.num_classes, space))

    def eval_fn(model):
        return evaluate_embeddings(embed(model, val_set), pairs)

    config = TrainConfig(
        output_dir=str(output_dir), epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, scheduler=args.scheduler,
        warmup_steps=args.warmup_steps, seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        log_every=args.log_every, resume=bool(args.resume), overwrite=args.overwrite, cpu=args.cpu,
        progress=not args.quiet, console=not args.quiet, drop_last=len(train_set) >= 2 * args.batch_size,
    )
    identity = {
        "recipe": {k: getattr(args, k) for k in ("student", "embedding_dim", "margin", "margin_m", "scale",
                                                 "margin_weight", "kd", "kd_weight", "image_size", "flip",
                                                 "teacher_space", "head_init", "freeze_head", "image_fit", "exclude",
                                                 "unlabelled", "unlabelled_data", "labelled_repeat")},
        "data": {"train": (train_view.sample_names() if args.unlabelled_data else
                           [str(p.relative_to(train_view.root)) for p, _ in train_view.samples]),
                 "cache": train_cache.key.digest},
    }
    result = Trainer(distiller, train_set, config, eval_fn=eval_fn,
                     teacher_cache=train_cache if terms else None, identity=identity).fit()
    write_spec(student, result.export_dir)
    export = {}
    try:
        from .export import export_student

        export = export_student(student.cpu(), result.export_dir, args.image_size)
    except Exception as e:  # noqa: BLE001 -- the safetensors student is written; say why ONNX/TorchScript were not
        print(f"warning: ONNX/TorchScript export skipped ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    student_embeddings = embed(student, val_set)
    student_scores = pair_scores(student_embeddings, pairs)
    try:
        roc = plot_roc({"teacher": (pair_scores(val_cache.arrays["output"], pairs), pairs[:, 2]),
                        "student": (student_scores, pairs[:, 2])}, str(output_dir / "roc.png"),
                       title=f"verification on {len(pairs)} pairs")
    except ImportError as e:
        roc = None
        print(f"warning: {e}")
    compression = None
    if not args.no_report:
        from .report import face_compression_report

        student_auc = evaluate_embeddings(student_embeddings, pairs)["auc"]
        shared_report, paths = face_compression_report(teacher, student, teacher_val, val_set,
                                                       teacher_metrics["auc"], student_auc, output_dir,
                                                       pairs=len(pairs))
        compression = {k: str(v) for k, v in paths.items()}
        print(shared_report.to_text())

    report = {
        "teacher": teacher_metrics,
        "student": result.metrics,
        "steps": result.step,
        "pairs": int(len(pairs)),
        "train_identities": train_view.num_classes,
        "train_images": len(train_view),
        "unlabelled_train_images": int((~labelled).sum()),
        "val_identities": val_set.num_classes,
        "val_images": len(val_set),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "roc_png": roc,
        "compression_report": compression,
        "export": export,
        "args": {k: v for k, v in vars(args).items()},
    }
    if hasattr(teacher, "stats"):
        report["teacher_stats"] = dict(teacher.stats)
    (output_dir / "verification.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    keys = ("auc", "accuracy", "accuracy_std", "tar@far=0.01", "tar@far=0.1")
    lines = [f"verification on {report['pairs']} pairs of {report['val_identities']} held-out identities:",
             f"{'':8}" + "".join(f"{k:>14}" for k in keys)]
    for who in ("teacher", "student"):
        m = report[who]
        lines.append(f"{who:8}" + "".join(f"{m.get(k, float('nan')):>14.4f}" for k in keys))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
