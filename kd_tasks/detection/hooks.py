"""MMEngine hooks for :class:`~kd_tasks.detection.distiller.DetectionDistiller` runs.

``kd-tasks detect`` adds all four; in a config of your own::

    custom_imports = dict(imports=["kd_tasks.detection"], allow_failed_imports=False)
    custom_hooks = [
        dict(type="DistillStepHook"),        # weight schedules follow runner.iter (also after resume)
        dict(type="TeacherCheckHook"),       # is the teacher really trained and loaded?
        dict(type="SafeCheckpointHook"),     # checkpoints that torch.load(weights_only=True) reads
        dict(type="StudentExportHook"),      # work_dir/student.pth + student_config.py for plain mmdet
    ]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from mmdet.registry import HOOKS

from kd_tasks.shared.checkpoint import check_identity, preserved_rng
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.schedules import Constant

from .checkpoint import make_weights_only, restore_weights_only
from .distiller import DetectionDistiller

__all__ = ["DistillStepHook", "TeacherCheckHook", "StudentExportHook", "SafeCheckpointHook", "distiller_of",
           "export_student", "total_loss"]


def distiller_of(runner) -> DetectionDistiller:
    """The runner's :class:`DetectionDistiller`, unwrapped from DDP and similar wrappers."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    if not isinstance(model, DetectionDistiller):
        raise KDConfigError(f"this hook needs model type DetectionDistiller, the runner's model is {type(model).__name__}")
    return model


def total_loss(losses: dict[str, Any]) -> float:
    """Sum of the ``loss*`` entries of an MMDetection loss dict (lists summed), as MMEngine does."""
    total = 0.0
    for key, value in losses.items():
        if "loss" not in key:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        total += float(sum(v.mean() for v in values))
    return total


@HOOKS.register_module()
class DistillStepHook(Hook):
    """Sets the distiller's step to ``runner.iter`` before every iteration, so weight schedules
    continue where they stopped after a resume, and logs the weights that follow a schedule."""

    priority = "NORMAL"

    def before_train_iter(self, runner, batch_idx: int, data_batch: Any = None) -> None:
        model = distiller_of(runner)
        model.set_step(runner.iter)
        scheduled = [t.name for t in model.distiller.terms if not isinstance(t.weight, Constant)]
        if not isinstance(model.task_weight, Constant):
            scheduled.append("task")
        weights = model.weights()
        for name in scheduled:
            runner.message_hub.update_scalar(f"train/weight_{name}", weights[name])


@HOOKS.register_module()
class TeacherCheckHook(Hook):
    """Before training, checks that the teacher is a trained, loaded detector, and stops the run if not.

    1. Reports the teacher checkpoint's missing / unexpected keys (or that none was given).
    2. On a fresh run (iteration 0), computes the teacher's own detection loss on the first
       ``num_batches`` batches of the training set, and the loss of an *untrained copy of the same
       teacher* (same config, fresh random weights, no pretrained parts) on the same batches: same head,
       same loss terms, so the two numbers are comparable whatever the student is. Both in eval mode,
       without gradients, the random-number state preserved. A trained teacher has a much lower loss; if
       ``teacher_loss > (1 - min_gain) · untrained_loss`` its checkpoint probably did not load, or is not
       for these classes.

    ``on_fail``: ``"raise"`` (default) stops the run with :class:`KDConfigError`; ``"warn"`` logs a loud
    warning and goes on (``kd-tasks detect --teacher-check warn``). ``result`` keeps the measured numbers.
    """

    priority = "LOW"

    def __init__(self, num_batches: int = 2, min_gain: float = 0.1, on_fail: str = "raise"):
        if on_fail not in ("warn", "raise"):
            raise KDConfigError(f"TeacherCheckHook on_fail must be 'warn' or 'raise', got {on_fail!r}")
        if int(num_batches) < 1 or not 0.0 <= float(min_gain) < 1.0:
            raise KDConfigError(f"TeacherCheckHook needs num_batches >= 1 and 0 <= min_gain < 1, got "
                                f"num_batches={num_batches}, min_gain={min_gain}")
        self.num_batches, self.min_gain, self.on_fail = int(num_batches), float(min_gain), on_fail
        self.result: dict[str, Any] = {}

    def _fail(self, message: str) -> None:
        self.result["ok"] = False
        if self.on_fail == "raise":
            raise KDConfigError(f"teacher check failed: {message} (to train anyway: --teacher-check warn)")
        print_log("!" * 20 + f" TEACHER CHECK FAILED: {message}", logger="current", level=logging.WARNING)

    def before_train(self, runner) -> None:
        model = distiller_of(runner)
        self.result = {"ok": True}
        report = model.teacher_load_report
        if report is None:
            self._fail("no teacher checkpoint was loaded; the teacher has random weights")
        elif not report.ok:
            self._fail(f"the teacher checkpoint does not match its config: {report.summary()}")
        if runner.iter > 0:
            return  # resumed: checked when the run started
        teacher_loss, untrained_loss = self.measure(model, self._first_batches(runner.train_dataloader))
        self.result.update(teacher_loss=teacher_loss, untrained_loss=untrained_loss)
        print_log(f"TeacherCheckHook: the teacher's own detection loss on {self.num_batches} training batches: "
                  f"{teacher_loss:.4f}; the same detector untrained: {untrained_loss:.4f}", logger="current")
        if not teacher_loss <= (1.0 - self.min_gain) * untrained_loss:
            self._fail(
                f"the teacher's detection loss ({teacher_loss:.4f}) is not clearly below that of the same detector "
                f"with random weights ({untrained_loss:.4f}): is --teacher-checkpoint the trained one, for this "
                "config and these classes?"
            )

    def _first_batches(self, dataloader):
        """The dataset's first batches, in order, from a loader of their own: the training loader's sampler
        is left untouched (MMEngine's ``InfiniteSampler`` can be iterated only once). The batch size is the
        loader's, or its batch sampler's (MMDetection's stock configs use ``AspectRatioBatchSampler``, which
        leaves ``DataLoader.batch_size`` unset)."""
        from torch.utils.data import DataLoader

        if not hasattr(dataloader, "dataset"):
            return dataloader
        batch_size = dataloader.batch_size or getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None)
        return DataLoader(dataloader.dataset, batch_size=int(batch_size or 1), shuffle=False, num_workers=0,
                          collate_fn=dataloader.collate_fn)

    @torch.no_grad()
    def measure(self, model: DetectionDistiller, dataloader) -> tuple[float, float]:
        """Mean detection loss of the teacher and of its untrained copy over the first ``num_batches`` batches."""
        teacher_total = untrained_total = 0.0
        count = 0
        untrained = model.untrained_teacher()
        with preserved_rng():
            for batch in dataloader:
                data = model.data_preprocessor(batch, False)
                inputs, samples = model.teacher_inputs(data["inputs"]), data["data_samples"]
                teacher_total += total_loss(model.teacher.loss(inputs, samples))
                untrained_total += total_loss(untrained.loss(inputs, samples))
                count += 1
                if count >= self.num_batches:
                    break
        if count == 0:
            raise KDConfigError("TeacherCheckHook: the training dataloader is empty")
        return teacher_total / count, untrained_total / count


def export_student(model: DetectionDistiller, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save the student alone as ``{"meta": ..., "state_dict": ...}``: the keys of the plain MMDetection
    model, loadable with ``torch.load(weights_only=True)`` and ``mmengine.runner.load_checkpoint``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.student.state_dict().items()}
    torch.save({"meta": dict(meta or {}), "state_dict": state}, path)
    return path


@HOOKS.register_module()
class StudentExportHook(Hook):
    """After training, writes ``<work_dir>/<filename>`` (the student's weights only, see
    :func:`export_student`) and ``student_config.py`` (the run's config with the student as its model),
    so ``mmdet``'s own test script and ``init_detector`` take the distilled student directly."""

    priority = "LOW"

    def __init__(self, filename: str = "student.pth", config_filename: str | None = "student_config.py"):
        self.filename, self.config_filename = filename, config_filename

    def after_train(self, runner) -> None:
        if not is_main_process():
            return
        model = distiller_of(runner)
        meta = {"iter": int(runner.iter), "epoch": int(runner.epoch), "source": "kd-tasks DetectionDistiller student"}
        dataset_meta = getattr(getattr(runner.train_dataloader, "dataset", None), "metainfo", None)
        if dataset_meta:
            meta["dataset_meta"] = {k: v for k, v in dataset_meta.items() if isinstance(v, (str, int, float, list, tuple))}
        path = export_student(model, Path(runner.work_dir) / self.filename, make_weights_only({"meta": meta})["meta"])
        print_log(f"StudentExportHook: student weights for plain MMDetection saved to {path}", logger="current")
        if self.config_filename and getattr(runner, "cfg", None) is not None:
            self._dump_config(runner, Path(runner.work_dir) / self.config_filename)

    @staticmethod
    def _dump_config(runner, path: Path) -> None:
        from mmengine.config import Config

        try:
            cfg = Config(runner.cfg.to_dict())
            cfg.model = cfg.model["student"]
            ours = {"DistillStepHook", "TeacherCheckHook", "StudentExportHook", "SafeCheckpointHook"}
            cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") not in ours]
            cfg.pop("custom_imports", None)
            cfg.dump(str(path))
        except Exception as e:  # the weights are saved; the config is a convenience
            print_log(f"StudentExportHook: could not write {path}: {e}", logger="current", level=logging.WARNING)


@HOOKS.register_module()
class SafeCheckpointHook(Hook):
    """Makes MMEngine's checkpoints readable by ``torch.load(weights_only=True)`` and reads them back, and
    records the run's identity in them (``meta.kd_run_identity``), checked when a run resumes.

    MMEngine 0.10.7 stores its ``MessageHub`` (``HistoryBuffer`` objects, NumPy arrays) in every
    checkpoint; torch >= 2.6 refuses to unpickle those by default, so ``--resume`` fails. Before a
    checkpoint is written they become plain lists and numbers; after one is loaded the history buffers
    are rebuilt (see :mod:`kd_tasks.detection.checkpoint`). No allow-list of classes is needed.
    """

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = distiller_of(runner)
        checkpoint.setdefault("meta", {})["kd_run_identity"] = dict(model.run_identity)
        make_weights_only(checkpoint)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Before MMEngine loads a resumed checkpoint's weights: refuse one written by another run (other
        student architecture, teacher weights or recipe), naming the part that differs."""
        saved = (checkpoint.get("meta") or {}).get("kd_run_identity")
        check_identity(saved, distiller_of(runner).run_identity, getattr(runner, "_load_from", None) or "the checkpoint")
        restore_weights_only(checkpoint)
