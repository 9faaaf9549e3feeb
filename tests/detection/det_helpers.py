"""Tiny RetinaNet configs built on mmdet's bundled configs, and generated 64x64 images with boxes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

CLASSES = ("square", "disc")


def mmdet_config_dir() -> Path:
    import mmdet

    return Path(os.path.dirname(mmdet.__file__)) / ".mim" / "configs"


def tiny_retinanet(base_channels: int, out_channels: int, num_classes: int = len(CLASSES)) -> dict:
    """Overrides of ``retinanet_r18_fpn_1x_coco.py`` for a tiny, randomly initialised RetinaNet."""
    return dict(
        backbone=dict(depth=18, base_channels=base_channels, init_cfg=None, frozen_stages=-1, norm_eval=False),
        neck=dict(in_channels=[base_channels * 2**i for i in range(4)], out_channels=out_channels),
        bbox_head=dict(num_classes=num_classes, in_channels=out_channels, feat_channels=out_channels,
                       stacked_convs=1),
        test_cfg=dict(nms_pre=100, max_per_img=20, score_thr=0.05),
    )


def tiny_faster_rcnn(base_channels: int = 16, out_channels: int = 32, num_classes: int = len(CLASSES)) -> dict:
    """A tiny, randomly initialised two-stage detector from mmdet's bundled ``faster-rcnn_r50_fpn_1x_coco.py``:
    its FPN returns P2-P6 (strides 4-64), one level finer than a RetinaNet's P3-P7."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(mmdet_config_dir() / "faster_rcnn" / "faster-rcnn_r50_fpn_1x_coco.py")).model
    cfg.backbone.update(depth=18, base_channels=base_channels, init_cfg=None, frozen_stages=-1, norm_eval=False)
    cfg.neck.update(in_channels=[base_channels * 2**i for i in range(4)], out_channels=out_channels)
    cfg.rpn_head.update(in_channels=out_channels, feat_channels=out_channels)
    cfg.roi_head.bbox_roi_extractor.update(out_channels=out_channels)
    cfg.roi_head.bbox_head.update(in_channels=out_channels, fc_out_channels=64, num_classes=num_classes)
    return cfg.to_dict()


def tiny_gfl(base_channels: int, out_channels: int, num_classes: int = len(CLASSES)) -> dict:
    """A tiny, randomly initialised GFL detector (distribution box head, ``reg_max=16``) from mmdet's bundled
    ``gfl_r50_fpn_1x_coco.py``: the head LD and CrossKD need."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(mmdet_config_dir() / "gfl" / "gfl_r50_fpn_1x_coco.py")).model
    cfg.backbone.update(depth=18, base_channels=base_channels, init_cfg=None, frozen_stages=-1, norm_eval=False)
    cfg.neck.update(in_channels=[base_channels * 2**i for i in range(4)], out_channels=out_channels)
    cfg.bbox_head.update(num_classes=num_classes, in_channels=out_channels, feat_channels=out_channels,
                         stacked_convs=4, norm_cfg=None)
    return cfg.to_dict()


def make_images(n_images: int, seed: int = 0, size: int = 64) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``n_images`` BGR images with 1-2 filled rectangles (class 0) or ellipses (class 1) on noise:
    ``(image (size, size, 3) uint8, boxes (n, 4) float32 x1 y1 x2 y2, labels (n,) int64)``."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        img = (rng.random((size, size, 3)) * 40).astype(np.uint8)
        boxes, labels = [], []
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(14, 30, size=2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            cls = int(rng.integers(0, len(CLASSES)))
            color = (60 + 190 * cls, 220, 250 - 190 * cls)
            if cls == 0:
                cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), color, -1)
            else:
                cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, color, -1)
            boxes.append([x, y, x + w, y + h])
            labels.append(cls)
        out.append((img, np.array(boxes, dtype=np.float32), np.array(labels, dtype=np.int64)))
    return out


def raw_batch(images) -> dict:
    """What MMDetection's ``PackDetInputs`` + collate give for ``images`` (before the data preprocessor)."""
    import torch
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for img, boxes, labels in images:
        h, w = img.shape[:2]
        inputs.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=torch.from_numpy(boxes), labels=torch.from_numpy(labels))
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


def draw_dataset(root: Path, n_images: int, seed: int = 0, size: int = 64) -> Path:
    """Write :func:`make_images` as PNG files and a COCO annotation file under ``root``."""
    import cv2

    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (img, boxes, labels) in enumerate(make_images(n_images, seed, size)):
        for (x1, y1, x2, y2), cls in zip(boxes.tolist(), labels.tolist()):
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=cls + 1,
                                    bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0))
        name = f"img_{i:03d}.png"
        cv2.imwrite(str(root / "images" / name), img)
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
    categories = [dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)]
    ann = root / "annotations.json"
    ann.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return ann


def write_config(path: Path, data_root: Path, base_channels: int, out_channels: int, batch_size: int = 2) -> Path:
    """An MMDetection config file inheriting mmdet's R18 RetinaNet, made tiny and pointed at ``data_root``."""
    base = mmdet_config_dir() / "retinanet" / "retinanet_r18_fpn_1x_coco.py"
    model = tiny_retinanet(base_channels, out_channels)
    pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(64, 64), keep_ratio=True),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(64, 64), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    dataset = dict(type="CocoDataset", data_root=str(data_root), ann_file="annotations.json",
                   data_prefix=dict(img="images/"), metainfo=dict(classes=CLASSES), filter_cfg=None)
    text = f"""_base_ = [{str(base)!r}]
model = dict(data_preprocessor=dict(pad_size_divisor=32), **{model!r})
train_dataloader = dict(batch_size={batch_size}, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(_delete_=True, **{dict(dataset, pipeline=pipeline)!r}))
val_dataloader = dict(batch_size={batch_size}, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, test_mode=True, **{dict(dataset, pipeline=test_pipeline)!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={str(data_root / 'annotations.json')!r}, format_only=False)
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=10, norm_type=2))
param_scheduler = []
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
"""
    path.write_text(text)
    return path
