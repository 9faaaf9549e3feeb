"""Tiny generated face-like identity folders and a small torch/ONNX embedding teacher for the face tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


def make_identity_folder(root: Path, identities: int = 6, images: int = 6, size: int = 24, seed: int = 0) -> Path:
    """``root/id<k>/<n>.png|pgm``: each identity a smooth random base pattern, each image base + noise + shift."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(identities):
        coarse = rng.uniform(0, 255, (4, 4))
        base = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size + 4, size + 4), Image.BILINEAR),
                          dtype=np.float64)
        folder = root / f"id{k}"
        folder.mkdir(exist_ok=True)
        for n in range(images):
            dx, dy = rng.integers(0, 5, 2)
            img = base[dy:dy + size, dx:dx + size] + rng.normal(0, 12, (size, size))
            ext = ".pgm" if n % 2 else ".png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(folder / f"{n}{ext}")
    return root


def embedding_net(dim: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, dim),
    ).eval()


def export_onnx(model: nn.Module, path: Path, size: int = 24) -> Path:
    torch.onnx.export(model, (torch.randn(2, 3, size, size),), str(path), dynamo=False, input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}})
    return path
