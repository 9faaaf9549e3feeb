"""Tree-crown detection on real aerial images: student alone vs student + channel-wise distillation.

Data: the Pascal VOC annotated images bundled in the ``deepforest==2.1.0`` wheel (MIT licence), installed
for this benchmark only::

    .venv/bin/python -m pip install --no-deps deepforest==2.1.0

The two Yellowstone scenes ``2019_YELL_2_528000_4978000_image_crop2`` (2299x2472, 574 trees) and
``2019_YELL_2_541000_4977000_image_crop`` (1249x1035, 279 trees) are split spatially: the tiles of the
right-most ``--val-fraction`` of each scene's width are the validation set, the rest (plus ``OSBS_029``,
400x400, 61 trees) the training set. Images are downscaled by ``--scale`` and cut into ``--tile``-pixel
tiles; boxes are clipped to each tile and kept when at least half of the box is inside.

MMEngine runs (the teacher once, with the first seed; both students once per seed):
1. teacher: a RetinaNet (ResNet-18 layout, ``--teacher-width`` base channels) trained from scratch;
2. student alone: a narrower RetinaNet trained from scratch (plain MMDetection Runner);
3. student + CWD: the same student trained with ``kd-tasks detect`` and the CWD recipe on the five FPN
   levels (``configs/detection/cwd_retinanet_fpn.py``; a 1x1 connector maps the student's FPN width to
   the teacher's).

Validation: MMDetection's COCO metric (pycocotools) on the validation tiles: mAP@[.5:.95] and mAP@.5.
No pretrained weights exist offline, so everything starts from random initialisation; the numbers are
far below published tree detectors and only compare the two students with each other.

    .venv/bin/python benchmarks/detection_trees.py --out /tmp/trees --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCENES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
TRAIN_ONLY = ("OSBS_029",)
RECIPE = ROOT / "configs" / "detection" / "cwd_retinanet_fpn.py"


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
    """Tiles as PNG files and one COCO annotation dict per split (one class: tree)."""
    import cv2

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
    return coco


def write_config(path: Path, data: Path, width: int, fpn: int, tile: int, iters: int, seed: int) -> Path:
    """An MMDetection config: RetinaNet with a ResNet-18 layout of ``width`` base channels, from scratch."""
    base = Path(__import__("mmdet").__file__).parent / ".mim" / "configs" / "retinanet" / "retinanet_r18_fpn_1x_coco.py"
    dataset = dict(type="CocoDataset", data_root=str(data), metainfo=dict(classes=("tree",)))
    resize = dict(type="Resize", scale=(tile, tile), keep_ratio=True)  # a no-op that records scale_factor
    train_pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True), resize,
                      dict(type="RandomFlip", prob=0.5, direction=["horizontal", "vertical"]),
                      dict(type="PackDetInputs")]
    test_pipeline = [dict(type="LoadImageFromFile"), resize, dict(type="LoadAnnotations", with_bbox=True),
                     dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                           "scale_factor"))]
    model = dict(
        backbone=dict(depth=18, base_channels=width, init_cfg=None, frozen_stages=-1, norm_eval=False),
        neck=dict(in_channels=[width * 2**i for i in range(4)], out_channels=fpn),
        bbox_head=dict(num_classes=1, in_channels=fpn, feat_channels=fpn, stacked_convs=2,
                       anchor_generator=dict(octave_base_scale=2)),  # trees of 8-40 px after downscaling
        test_cfg=dict(score_thr=0.05, max_per_img=100),
    )
    text = f"""_base_ = [{str(base)!r}]
model = dict(data_preprocessor=dict(pad_size_divisor=32), **{model!r})
train_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False, batch_sampler=None,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(_delete_=True, ann_file='train.json', data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True),
                 pipeline={train_pipeline!r}, **{dataset!r}))
val_dataloader = dict(batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, ann_file='val.json', data_prefix=dict(img='val/'), test_mode=True,
                 pipeline={test_pipeline!r}, **{dataset!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={str(data / 'val.json')!r})
test_evaluator = val_evaluator
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=0.002, weight_decay=0.05),
                     clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end={min(50, iters // 4)}),
                   dict(type='CosineAnnealingLR', by_epoch=False, begin={min(50, iters // 4)}, end={iters}, eta_min=1e-5)]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(by_epoch=False, interval={iters}),
                     visualization=dict(draw=False))
log_processor = dict(by_epoch=False)
randomness = dict(seed={seed})
"""
    path.write_text(text)
    return path


def val_metrics(runner) -> dict:
    """The COCO metrics of the runner's last validation (MMEngine keeps them in its MessageHub)."""
    hub = runner.message_hub
    return {"mAP": float(hub.get_scalar("val/coco/bbox_mAP").current()),
            "mAP50": float(hub.get_scalar("val/coco/bbox_mAP_50").current())}


def own_visualizer(cfg) -> None:
    """MMDetection's configs name their visualizer 'visualizer', so a second run in one process would log
    into the first run's directory; let MMEngine name it after the run instead."""
    if isinstance(cfg.get("visualizer"), dict):
        cfg.visualizer.pop("name", None)


def train_plain(config: Path, work_dir: Path) -> dict:
    from mmengine.config import Config
    from mmengine.runner import Runner

    cfg = Config.fromfile(str(config))
    cfg.work_dir = str(work_dir)
    own_visualizer(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    return val_metrics(runner)


def train_distilled(student: Path, teacher: Path, ckpt: Path, work_dir: Path) -> dict:
    """What ``kd-tasks detect --teacher-config T --teacher-checkpoint C --student-config S --recipe R
    --work-dir W`` runs, keeping the runner to read its metrics."""
    from kd_tasks.detection.train import build_config, build_parser, run

    args = build_parser().parse_args(["--teacher-config", str(teacher), "--teacher-checkpoint", str(ckpt),
                                      "--student-config", str(student), "--recipe", str(RECIPE),
                                      "--work-dir", str(work_dir)])
    return val_metrics(run(build_config(args)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/kd_trees"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher-iters", type=int, default=1000)
    p.add_argument("--student-iters", type=int, default=500)
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--student-width", type=int, default=8)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import kd_tasks.detection  # noqa: F401

    data = args.out / "data"
    tiles = make_tiles(data, args.scale, args.tile, args.val_fraction)
    for split, content in tiles.items():
        print(f"{split}: {len(content['images'])} tiles, {len(content['annotations'])} boxes")

    results: dict[str, list] = {"teacher": [], "student alone": [], "student + CWD": []}
    times: dict[str, float] = {k: 0.0 for k in results}

    def timed(name: str, seed: int, job) -> None:
        start = time.time()
        metrics = job()
        times[name] += time.time() - start
        results[name].append(metrics)
        print(f"seed {seed} {name}: {metrics}  ({time.time() - start:.0f} s)", flush=True)

    teacher_dir = args.out / "teacher"
    t_cfg = write_config(args.out / "teacher.py", data, args.teacher_width, 2 * args.teacher_width, args.tile,
                         args.teacher_iters, args.seeds[0])
    timed("teacher", args.seeds[0], lambda: train_plain(t_cfg, teacher_dir))
    ckpt = teacher_dir / f"iter_{args.teacher_iters}.pth"
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        run.mkdir(parents=True, exist_ok=True)
        s_cfg = write_config(run / "student.py", data, args.student_width, 2 * args.student_width, args.tile,
                             args.student_iters, seed)
        timed("student alone", seed, lambda: train_plain(s_cfg, run / "student"))
        timed("student + CWD", seed, lambda: train_distilled(s_cfg, t_cfg, ckpt, run / "student_cwd"))

    print("\n| model | mAP@[.5:.95] | mAP@.5 | runs | train time (s, all seeds) |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        cells = []
        for key in ("mAP", "mAP50"):
            values = [r[key] for r in rows]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread} ({', '.join(f'{v:.3f}' for v in values)})")
        print(f"| {name} | {cells[0]} | {cells[1]} | {len(rows)} | {times[name]:.0f} |")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results, "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
