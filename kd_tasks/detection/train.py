"""``kd-tasks detect``: distil an MMDetection 3.x detector with MMEngine's Runner.

The student's config file is the base of the run (its datasets, schedule, optimiser, hooks); its
``model`` becomes a :class:`~kd_tasks.detection.distiller.DetectionDistiller` holding the student, the
teacher (from its own config file and checkpoint) and the recipe's terms. Multi-GPU and multi-machine
runs go through MMEngine's ``pytorch`` launcher: start the command with ``torchrun`` (or
``accelerate launch``) and pass ``--launcher pytorch``; on a machine without GPUs the same command
trains with CPU processes over gloo (see :func:`_cpu_processes`).

After training the run writes the student alone (``student.pth`` + ``student_config.py``), the compression
report of teacher and student (``report.md/.json/.png``; ``--no-report`` skips it) and, with ``--export
onnx``, ``student.onnx``: the student's raw head tensors, checked against PyTorch with onnxruntime (see
:mod:`kd_tasks.detection.export`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from kd_tasks.shared.config import check_keys, load_config
from kd_tasks.shared.errors import ArgumentParser, KDConfigError, OutputDirInUseError, run_cli

EPILOG = """example (RetinaNet R50 teacher -> R18 student, channel-wise distillation of the FPN outputs):
  kd-tasks detect \\
      --teacher-config mmdet::retinanet/retinanet_r50_fpn_1x_coco.py \\
      --teacher-checkpoint checkpoints/retinanet_r50_fpn_1x_coco.pth \\
      --student-config mmdet::retinanet/retinanet_r18_fpn_1x_coco.py \\
      --recipe configs/detection/cwd_retinanet_fpn.py --work-dir work_dirs/cwd_r50_r18

  4 GPUs:  torchrun --nproc_per_node 4 -m kd_tasks.detection.train ... --launcher pytorch
           (without GPUs the same command runs CPU processes over gloo)
           (or: accelerate launch --multi_gpu --num_processes 4 -m kd_tasks.detection.train ... --launcher pytorch)
  resume:  add --resume (latest checkpoint of --work-dir) or --resume work_dirs/x/iter_2000.pth

The recipe (YAML, JSON or .py) holds a `distill` section (terms: name, loss, student/teacher taps such as
'neck@P3' (the FPN level of stride 8) or 'bbox_head:0@P3', weight, connector; optional task_weight for the student's own losses, teacher_dtype)
and optionally `cfg_options` (dotted config keys, e.g. optim_wrapper.clip_grad.max_norm: 10).
The run writes <work-dir>/student.pth and student_config.py, usable by plain MMDetection, and the
compression report of teacher and student (report.md/.json/.png: params, FLOPs, size, latency, memory,
validation mAP; --no-report skips it). --export onnx adds student.onnx (+ student_onnx.json): the student's
raw head tensors (class scores and box regressions per FPN level) at the test input size, checked against
PyTorch with onnxruntime -- not an end-to-end detector: box decoding and NMS stay in MMDetection / mmdeploy.
"""

RECIPE_KEYS = ("distill", "cfg_options")
CHECKPOINTS = ("iter_*.pth", "epoch_*.pth")  # MMEngine's checkpoint files in a work dir
KD_HOOKS = ("DistillStepHook", "TeacherCheckHook", "SafeCheckpointHook", "StudentExportHook")
EXPORTS = ("onnx",)  # --export formats


def build_parser() -> argparse.ArgumentParser:
    from_mmengine = _dict_action()
    p = ArgumentParser(
        prog="kd-tasks detect",
        description="Distil an MMDetection 3.x teacher into a student with MMEngine's Runner.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher-config", required=True, help="teacher's MMDetection config (.py), or mmdet::<path>")
    p.add_argument("--teacher-checkpoint", required=True, help="teacher's trained weights (.pth)")
    p.add_argument("--student-config", required=True,
                   help="student's MMDetection config: its data, schedule and runtime settings drive the run")
    p.add_argument("--recipe", "--config", dest="recipe", required=True,
                   help="distillation recipe (.yaml / .json / .py), see configs/detection/")
    p.add_argument("--work-dir", "--output-dir", dest="work_dir", required=True,
                   help="directory for logs, checkpoints and the exported student (MMEngine's name; --output-dir as in "
                        "the other subcommands)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the run (default: the student config's randomness.seed, else MMEngine's)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="train this many iterations instead of the config's schedule (iteration-based loop; validation and "
                        "checkpoint at the end; epoch-based LR milestones are dropped)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="resume: the latest checkpoint in --work-dir, or the given one")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a --work-dir that holds an earlier run: its checkpoints, exported student and "
                        "report are removed first (other files stay); without it a used --work-dir is refused")
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun / accelerate launch (multi-GPU, multi-machine)")
    p.add_argument("--teacher-not-strict", action="store_true",
                   help="load a teacher checkpoint whose keys do not all match its config (warns instead of failing)")
    p.add_argument("--teacher-check", choices=["raise", "warn"], default=None,
                   help="what to do when the teacher's detection loss is not clearly below that of the same detector "
                        "untrained (default: raise, i.e. stop before training; a TeacherCheckHook in the student "
                        "config's custom_hooks keeps its own setting unless this flag is given)")
    p.add_argument("--export", choices=EXPORTS, default=None,
                   help="after training also export the student: 'onnx' writes student.onnx (its raw head tensors at "
                        "the test input size, checked against PyTorch with onnxruntime; box decoding and NMS are not "
                        "in the graph) and student_onnx.json")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the compression report of teacher and student (report.md/.json/.png)")
    p.add_argument("--no-teacher-val", dest="teacher_val", action="store_false",
                   help="report: do not run the one validation pass of the teacher that gives its mAP (its metric "
                        "stays empty)")
    p.add_argument("--cfg-options", nargs="+", action=from_mmengine, default=None, metavar="KEY=VALUE",
                   help="override config keys, e.g. train_dataloader.batch_size=4 model.distill.task_weight=0.5")
    return p


def _dict_action():
    try:
        from mmengine.config import DictAction
    except ImportError:  # mmengine missing: parse anyway so --help works; main() reports it
        return "append"
    return DictAction


def _file(path: str, what: str) -> str:
    """``path`` made absolute after checking it exists (``mmdet::`` paths resolve in the installed mmdet)."""
    if path.startswith("mmdet::"):
        import mmdet

        resolved = Path(mmdet.__file__).parent / ".mim" / "configs" / path[len("mmdet::"):]
        if not resolved.is_file():
            raise KDConfigError(f"{what} {path!r} is not a config of the installed MMDetection ({resolved})")
        return str(resolved)
    if not Path(path).is_file():
        raise KDConfigError(f"{what} {path!r} does not exist")
    return str(Path(path).resolve())


def _read_config(path: str, what: str):
    from mmengine.config import Config

    try:
        return Config.fromfile(path)
    except Exception as e:  # syntax errors, missing _base_ files, ...
        raise KDConfigError(f"cannot read the {what} {path!r}: {type(e).__name__}: {e}") from None


def build_config(args: argparse.Namespace):
    """The MMEngine config of the distillation run described by the parsed arguments."""
    student_path = _file(args.student_config, "--student-config")
    teacher_path = _file(args.teacher_config, "--teacher-config")
    ckpt = _file(args.teacher_checkpoint, "--teacher-checkpoint")
    recipe = load_config(_file(args.recipe, "--recipe"))
    check_keys(recipe, RECIPE_KEYS, f"recipe {args.recipe}")
    if "distill" not in recipe:
        raise KDConfigError(f"recipe {args.recipe!r} has no 'distill' section; see configs/detection/ for examples")

    cfg = _read_config(student_path, "student config")
    teacher_cfg = _read_config(teacher_path, "teacher config")
    for what, c in (("student", cfg), ("teacher", teacher_cfg)):
        if not isinstance(c.get("model"), dict) or "type" not in c.model:
            raise KDConfigError(f"the {what} config has no model = dict(type=...)")

    for c in (cfg, teacher_cfg):  # a model from another OpenMMLab package (e.g. mmyolo) keeps its registry
        if c.get("default_scope") not in (None, "mmdet"):
            c.model.setdefault("_scope_", c.default_scope)
    cfg.model = dict(
        type="DetectionDistiller",
        student=cfg.model,
        teacher=teacher_cfg.model,
        teacher_ckpt=ckpt,
        teacher_strict=not args.teacher_not_strict,
        distill=recipe["distill"],
    )
    imports = ["kd_tasks.detection"]
    for c in (cfg, teacher_cfg):
        imports += [m for m in c.get("custom_imports", {}).get("imports", []) if m not in imports]
    cfg.custom_imports = dict(imports=imports, allow_failed_imports=False)
    cfg.default_scope = "mmdet"
    cfg.custom_hooks = _kd_hooks(cfg.get("custom_hooks", []), args)
    if isinstance(cfg.get("visualizer"), dict):  # MMDetection's fixed name 'visualizer' would send a second run
        cfg.visualizer.pop("name", None)  # in the same process to the first run's log directory
    cfg.work_dir = str(Path(args.work_dir).resolve())
    if args.seed is not None:
        cfg.randomness = dict(cfg.get("randomness") or {}, seed=int(args.seed))
    cfg.launcher = args.launcher
    if args.max_iters is not None:
        _iteration_schedule(cfg, args.max_iters)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, latest_intact_checkpoint(Path(args.work_dir))
    elif args.resume:
        cfg.resume, cfg.load_from = True, _file(args.resume, "--resume checkpoint")
    for options in (recipe.get("cfg_options") or {}, args.cfg_options or {}):
        if not isinstance(options, dict):
            raise KDConfigError(f"cfg_options must be a mapping of dotted keys to values, got {options!r}")
        cfg.merge_from_dict(options)
    if not args.resume and cfg.get("load_from"):  # the student config's own starting weights
        cfg.model["student_ckpt"] = _file(cfg.load_from, "the student config's load_from")
        cfg.load_from = None
    _check_model_keys(cfg.model)
    return cfg


def latest_intact_checkpoint(work_dir: Path) -> str | None:
    """The newest ``iter_*.pth`` / ``epoch_*.pth`` in ``work_dir`` that reads back whole; a damaged newer one is
    named in a warning and skipped. ``None`` when there is none (the run starts fresh)."""
    from .checkpoint import load_checkpoint_file

    def number(path: Path) -> int:
        try:
            return int(path.stem.split("_")[-1])
        except ValueError:
            return -1

    found = sorted((p for pattern in CHECKPOINTS for p in work_dir.glob(pattern)), key=number, reverse=True)
    damaged = []
    for path in found:
        try:
            state = load_checkpoint_file(path)
            if not isinstance(state, dict) or "state_dict" not in state:
                raise ValueError("no state_dict")
        except Exception as e:  # noqa: BLE001 -- any unreadable file is skipped, and named
            damaged.append(f"{path.name} ({type(e).__name__})")
            continue
        if damaged:
            print(f"kd-tasks detect: warning: damaged checkpoint {', '.join(damaged)} skipped; resuming from {path.name}",
                  file=sys.stderr)
        return str(path)
    if damaged:
        raise KDConfigError(f"every checkpoint in --work-dir {str(work_dir)!r} is damaged: {', '.join(damaged)}",
                            hint="start again with --overwrite, or restore the files")
    return None


def _kd_hooks(hooks: list, args: argparse.Namespace) -> list:
    """The config's custom hooks with every kd-tasks hook present once: a user's own settings of a kd-tasks
    hook are kept (``--teacher-check`` overrides that hook's ``on_fail``, ``--no-teacher-val`` the report's
    ``teacher_metric``); missing ones are added. The report (``CompressionReportHook``) comes unless
    ``--no-report`` (which also drops one the config has), the ONNX export (``OnnxExportHook``) with
    ``--export onnx``; both after ``StudentExportHook``."""
    wanted = list(KD_HOOKS)
    report = getattr(args, "report", True)
    if report:
        wanted.append("CompressionReportHook")
    if getattr(args, "export", None) == "onnx":
        wanted.append("OnnxExportHook")
    hooks = [dict(h) for h in hooks if report or h.get("type") != "CompressionReportHook"]
    present = {h.get("type") for h in hooks}
    hooks += [dict(type=name) for name in wanted if name not in present]
    for hook in hooks:
        if hook.get("type") == "TeacherCheckHook" and args.teacher_check is not None:
            hook["on_fail"] = args.teacher_check
        if hook.get("type") == "CompressionReportHook" and not getattr(args, "teacher_val", True):
            hook["teacher_metric"] = False
    return hooks


def _check_model_keys(model_cfg) -> None:
    """A typo in a ``model.*`` key (``--cfg-options model.distil=...``) fails here, naming close matches."""
    from kd_tasks.shared.registry import check_kwargs

    from .distiller import DetectionDistiller

    if model_cfg.get("type") != "DetectionDistiller":
        raise KDConfigError(f"model.type must stay 'DetectionDistiller', got {model_cfg.get('type')!r}")
    check_kwargs(DetectionDistiller, {k: v for k, v in model_cfg.items() if k != "type"}, "model (DetectionDistiller)")


def _iteration_schedule(cfg, max_iters: int) -> None:
    """An iteration-based loop of ``max_iters`` with validation and a checkpoint at the end, drawing
    batches from an endless sampler."""
    if max_iters <= 0:
        raise KDConfigError(f"--max-iters must be positive, got {max_iters}")
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    hooks = cfg.setdefault("default_hooks", {})
    hooks["checkpoint"] = dict(hooks.get("checkpoint", {}) or {}, type="CheckpointHook", by_epoch=False,
                               interval=max_iters)
    cfg.log_processor = dict(cfg.get("log_processor", {}) or {}, by_epoch=False)
    sampler = cfg.get("train_dataloader", {}).get("sampler") or {}
    if sampler.get("type") == "DefaultSampler":  # restarting a finite sampler costs MMEngine a 2 s pause each time
        sampler["type"] = "InfiniteSampler"
        sampler.pop("round_up", None)
    schedulers = cfg.get("param_scheduler") or []
    schedulers = [schedulers] if isinstance(schedulers, dict) else schedulers
    cfg.param_scheduler = [s for s in schedulers if not s.get("by_epoch", True)]  # epoch milestones do not apply


def _cpu_processes(cfg) -> None:
    """Multi-process training without GPUs (``--launcher pytorch`` on a CPU machine): MMEngine's pytorch
    launcher calls ``torch.cuda.set_device`` and its DDP wrapper passes a CUDA device id, so the process
    group is started here with gloo, and DDP is built without device ids."""
    import torch
    import torch.distributed as dist

    if cfg.get("launcher") != "pytorch" or torch.cuda.is_available():
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise KDConfigError(f"--launcher pytorch needs the variables torchrun sets ({', '.join(missing)} missing): "
                            "start the command with torchrun --nproc_per_node N -m kd_tasks.detection.train ...")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper.setdefault("type", "MMDistributedDataParallel")
    wrapper.setdefault("device_ids", None)
    wrapper.setdefault("broadcast_buffers", False)
    cfg.model_wrapper_cfg = wrapper


def run(cfg) -> Any:
    """Build MMEngine's Runner from ``cfg`` and train; returns the runner."""
    import kd_tasks.detection  # noqa: F401  registers the model and hooks

    from .runner import KDRunner

    _cpu_processes(cfg)
    runner = KDRunner.from_cfg(cfg)
    runner.train()
    return runner


RUN_OUTPUTS = (*CHECKPOINTS, "last_checkpoint", "student.pth", "student_config.py", "student.onnx", "student_onnx.json",
               "report.md", "report.json", "report.png")


def check_work_dir(args: argparse.Namespace) -> None:
    """Refuse a ``--work-dir`` that holds another run (its checkpoints would be mixed with this run's and its
    exported student overwritten) unless ``--resume`` or ``--overwrite``; ``--overwrite`` removes that run's
    checkpoints, exports and report, nothing else. Only the main process removes files."""
    work = Path(args.work_dir)
    if work.exists() and not work.is_dir():
        raise KDConfigError(f"--work-dir {args.work_dir!r} is a file", hint="give a directory path")
    used = sorted(p for pattern in RUN_OUTPUTS for p in work.glob(pattern)) if work.is_dir() else []
    if not used or args.resume:
        return
    if not args.overwrite:
        raise OutputDirInUseError(
            f"--work-dir {args.work_dir!r} holds an earlier run ({', '.join(p.name for p in used[:3])}"
            f"{', ...' if len(used) > 3 else ''})",
            hint="continue it with --resume, replace it with --overwrite, or choose another --work-dir")
    if os.environ.get("RANK", "0") == "0":
        for path in used:
            path.unlink()


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import mmdet  # noqa: F401
        import mmengine  # noqa: F401
    except ImportError as e:
        raise KDConfigError(f"kd-tasks detect needs MMDetection 3.x ({e})",
                            hint="pip install 'kd-tasks[detection]'") from None
    if args.resume and args.overwrite:
        raise KDConfigError("--resume and --overwrite contradict each other", hint="give one of them")
    cfg = build_config(args)
    check_work_dir(args)
    run(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``kd-tasks detect``: one-line errors and exit code 2 for wrong inputs (the shared boundary)."""
    return run_cli("detect", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
