"""ONNX export checked against PyTorch with onnxruntime, and int8 dynamic quantisation."""

import numpy as np
import pytest
import torch
from torch import nn

from kd_tasks.classify import build_model
from kd_tasks.shared.errors import KDConfigError
from kd_tasks.shared.export import check_onnx, export_onnx, quantize_dynamic_int8, run_onnx
from kd_tasks.shared.report import size_on_disk

torch.set_num_threads(1)


def test_classifier_round_trip_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = build_model("cnn:4", 10, in_channels=1, image_size=8).eval()
    with torch.no_grad():  # not the identity BN statistics of a fresh model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 1, 8, 8)
    path = export_onnx(model, x, tmp_path / "student.onnx")
    for batch in (1, 7):
        xb = torch.randn(batch, 1, 8, 8)
        got = run_onnx(path, xb)[0]
        with torch.no_grad():
            ref = model(xb).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert check_onnx(model, x, path) < 1e-4
    assert model.training is False and next(model.parameters()).requires_grad  # the model itself is untouched


def test_check_onnx_catches_another_model(tmp_path):
    torch.manual_seed(0)
    a, b = build_model("cnn:4", 10, 1, 8), build_model("cnn:4", 10, 1, 8)
    x = torch.randn(4, 1, 8, 8)
    path = export_onnx(a, x, tmp_path / "a.onnx")
    with pytest.raises(KDConfigError, match="differs from PyTorch"):
        check_onnx(b, x, path)


def test_int8_dynamic_quantisation_is_smaller_and_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    q = quantize_dynamic_int8(model)
    assert isinstance(model[1], nn.Linear)  # the float model is unchanged
    assert size_on_disk(q) < size_on_disk(model) / 2.5
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert (ref - got).abs().max() < 0.05 * ref.abs().max()
    assert (ref.argmax(1) == got.argmax(1)).float().mean() > 0.9


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x, scale=None):
        return self.proj(x * scale.unsqueeze(-1)).sum(1)


def test_keyword_inputs_in_forward_order_with_named_dynamic_axes(tmp_path):
    torch.manual_seed(0)
    model = _Keywords().eval()
    example = {"scale": torch.rand(2, 5), "x": torch.randn(2, 5, 3)}  # not in forward's order
    axes = {"x": {0: "batch", 1: "sequence"}, "scale": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    path = export_onnx(model, example, tmp_path / "kw.onnx", dynamic_axes=axes)
    for batch, length in ((1, 2), (4, 9)):
        inputs = {"x": torch.randn(batch, length, 3), "scale": torch.rand(batch, length)}
        with torch.no_grad():
            np.testing.assert_allclose(run_onnx(path, inputs)[0], model(**inputs).numpy(), atol=1e-5, rtol=1e-4)
        assert check_onnx(model, inputs, path) < 1e-4
    with pytest.raises(KDConfigError, match=r"dynamic_axes names \['mask'\]"):
        export_onnx(model, example, tmp_path / "bad.onnx", dynamic_axes={"mask": {0: "batch"}})
