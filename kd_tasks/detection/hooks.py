"""MMEngine hooks for :class:`~kd_tasks.detection.distiller.DetectionDistiller` runs.

``kd-tasks detect`` adds the first four, the compression report unless ``--no-report``, and the ONNX
export with ``--export onnx``; in a config of your own::

    custom_imports = dict(imports=["kd_tasks.detection"], allow_failed_imports=False)
    custom_hooks = [
        dict(type="DistillStepHook"),        # weight schedules follow runner.iter (also after resume)
        dict(type="TeacherCheckHook"),       # is the teacher really trained and loaded?
        dict(type="SafeCheckpointHook"),     # checkpoints that torch.load(weights_only=True) reads
        dict(type="StudentExportHook"),      # work_dir/student.pth + student_config.py for plain mmdet
        dict(type="CompressionReportHook"),  # work_dir/report.md/.json/.png: teacher vs student
        dict(type="OnnxExportHook"),         # work_dir/student.onnx (raw head tensors) + student_onnx.json
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
from .export import (config_input_size, detection_report, evaluate_detector, example_input, export_detector_onnx,
                     pick_metric)

__all__ = ["DistillStepHook", "TeacherCheckHook", "StudentExportHook", "SafeCheckpointHook", "OnnxExportHook",
           "CompressionReportHook", "distiller_of", "export_student", "total_loss", "KD_HOOK_TYPES"]

# the hooks of this module: none of them goes into the student_config.py written for plain MMDetection
KD_HOOK_TYPES = ("DistillStepHook", "TeacherCheckHook", "StudentExportHook", "SafeCheckpointHook", "OnnxExportHook",
                 "CompressionReportHook")


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
            cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") not in KD_HOOK_TYPES]
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


def _size(input_size: Any) -> tuple[int, int] | None:
    """A hook's ``input_size`` argument as ``(height, width)`` (an int is a square), refused in one line if odd."""
    if input_size is None:
        return None
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise KDConfigError(f"input_size must be (height, width) in pixels, got {input_size!r}")
    return size


def _example_of(runner, detector, input_size: tuple[int, int] | None) -> tuple[torch.Tensor, str]:
    """One preprocessed validation image at the detector's test input size, and where that size comes from:
    the hook's ``input_size``, else the fixed resize of the config's test pipeline (padded as the data
    preprocessor pads), else the first validation image's own shape."""
    loader = runner.val_loop.dataloader if getattr(runner, "_val_loop", None) is not None else None
    if input_size is not None:
        size, source = input_size, "the hook's input_size"
    else:
        pad = int(getattr(getattr(detector, "data_preprocessor", None), "pad_size_divisor", 1) or 1)
        found = config_input_size(getattr(runner, "cfg", None), pad)
        size, source = found or (None, "the first validation image (no fixed-scale resize in the test pipeline)")
    return example_input(detector, size, loader), source


@HOOKS.register_module()
class OnnxExportHook(Hook):
    """After training, writes ``<work_dir>/<filename>``: the student's tensor forward as ONNX (the raw head
    outputs, not an end-to-end detector: box decoding and NMS stay in MMDetection / mmdeploy), checked
    against PyTorch with onnxruntime, and ``<stem>_onnx.json`` saying what the graph takes and gives (see
    :func:`kd_tasks.detection.export.export_detector_onnx`). Main process only. ``input_size``:
    ``(height, width)`` of the export, default the config's test input size; ``atol`` / ``rtol``: the
    tolerance of the check (a larger difference is refused)."""

    priority = "LOW"

    def __init__(self, filename: str = "student.onnx", input_size: Any = None, atol: float = 1e-3,
                 rtol: float = 1e-3, opset: int = 17):
        if not str(filename).endswith(".onnx"):
            raise KDConfigError(f"OnnxExportHook filename must end in .onnx, got {filename!r}")
        if not (float(atol) >= 0 and float(rtol) >= 0):
            raise KDConfigError(f"OnnxExportHook atol and rtol must be >= 0, got atol={atol}, rtol={rtol}")
        self.filename, self.input_size = str(filename), _size(input_size)
        self.atol, self.rtol, self.opset = float(atol), float(rtol), int(opset)
        self.record: dict[str, Any] = {}

    def after_train(self, runner) -> None:
        if not is_main_process():
            return
        student = distiller_of(runner).student
        example, source = _example_of(runner, student, self.input_size)
        path = Path(runner.work_dir) / self.filename
        self.record = export_detector_onnx(student, example, path, atol=self.atol, rtol=self.rtol, opset=self.opset,
                                           meta={"input_size_from": source, "iter": int(runner.iter)})
        h, w = example.shape[-2:]
        print_log(f"OnnxExportHook: {path} written (input {h}x{w} from {source}; outputs "
                  f"{', '.join(o['name'] for o in self.record['outputs'])}); onnxruntime matches PyTorch within "
                  f"{self.record['check']['max_abs_diff']:.3g}. The graph gives raw head tensors, not boxes: "
                  f"decoding and NMS stay in MMDetection / mmdeploy (see {path.stem}_onnx.json)", logger="current")


@HOOKS.register_module()
class CompressionReportHook(Hook):
    """After training, the shared compression report of teacher and student in ``<work_dir>/<stem>.md``,
    ``.json`` and ``.png`` (:func:`kd_tasks.detection.export.detection_report`): params, FLOPs per image,
    size on disk, latency, throughput and peak memory of their tensor forward at the test input size, and
    the validation mAP.

    The student's metric is the last validation result of the run (``metric_key``, default the first
    ``*bbox_mAP`` / ``*mAP``; a validation pass is run if the run made none). The teacher's metric comes from
    one validation pass of the teacher (its own data preprocessor and ``test_cfg``) through the run's
    evaluator on the same set, on every process; ``teacher_metric=False`` skips it and leaves the teacher's
    metric empty, saying so in the report (the teacher check measures the teacher's loss, not its mAP).
    The report itself is measured and written by the main process.
    """

    priority = "LOW"

    def __init__(self, teacher_metric: bool = True, metric_key: str | None = None, input_size: Any = None,
                 batch_size: int = 2, warmup: int = 2, repeats: int = 10, stem: str = "report"):
        if int(batch_size) < 1 or int(repeats) < 1 or int(warmup) < 0:
            raise KDConfigError(f"CompressionReportHook needs batch_size >= 1, repeats >= 1, warmup >= 0; got "
                                f"batch_size={batch_size}, repeats={repeats}, warmup={warmup}")
        self.teacher_metric, self.metric_key, self.input_size = bool(teacher_metric), metric_key, _size(input_size)
        self.batch_size, self.warmup, self.repeats, self.stem = int(batch_size), int(warmup), int(repeats), str(stem)
        self.metrics: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}

    def before_train(self, runner) -> None:
        if getattr(runner, "_val_loop", None) is None:
            raise KDConfigError("the compression report's metric is the student's validation mAP, and this run has "
                                "no validation (val_dataloader, val_cfg, val_evaluator)",
                                hint="add them to the student config, or skip the report (kd-tasks detect --no-report)")

    def after_val_epoch(self, runner, metrics: dict[str, float] | None = None) -> None:
        self.metrics = dict(metrics or {})

    def after_train(self, runner) -> None:
        model = distiller_of(runner)
        if self.metrics is None:  # e.g. resumed at the end of its schedule: no validation ran in this process
            runner.val_loop.run()
        key, student_metric = pick_metric(self.metrics or {}, self.metric_key)
        notes = []
        if student_metric is None:
            notes.append("The student's metric is empty: its last validation gave no metrics (see the log: e.g. no "
                         "detection above the score threshold, or format_only).")
        teacher_metric = None
        if self.teacher_metric:
            loop = runner.val_loop
            teacher_key, teacher_metric = pick_metric(evaluate_detector(model.teacher, loop.dataloader, loop.evaluator),
                                                      key)
            key = key or teacher_key
            if teacher_metric is None:
                notes.append("The teacher's metric is empty: its validation pass gave no metrics (see the log).")
            else:
                notes.append("The teacher's: one validation pass of the teacher (its own data preprocessor and "
                             "test_cfg) through the same evaluator after training.")
        else:
            notes.append("The teacher's metric is empty (so are its share kept and the figures of merit): its "
                         "validation pass was skipped (--no-teacher-val); the teacher check measures the teacher's "
                         "detection loss, not its mAP.")
        if not is_main_process():
            return
        notes.insert(0, f"Metric: {key or 'bbox mAP'} on the validation set; the student's is the run's last "
                        f"validation result (iteration {int(runner.iter)}).")
        example, source = _example_of(runner, model.student, self.input_size)
        notes.append(f"Input size from {source}; the teacher is measured at the student's input size (the run feeds "
                     "both the same images).")
        report, self.paths = detection_report(
            model.student, model.teacher, example, runner.work_dir, student_metric=student_metric,
            teacher_metric=teacher_metric, metric_name=f"val {key or 'bbox mAP'}", notes=notes,
            batch_size=self.batch_size, warmup=self.warmup, repeats=self.repeats, stem=self.stem)
        print_log("CompressionReportHook:\n" + report.to_text() + f"\nreport: {self.paths['markdown']}  "
                  f"{self.paths['json']}  plot: {self.paths.get('png')}", logger="current")
