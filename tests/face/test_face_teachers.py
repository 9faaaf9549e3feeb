"""Teachers: ONNX vs the torch model it was exported from, TorchScript files, caching, clear errors."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from face_helpers import embedding_net, export_onnx
from kd_tasks.face.teachers import DlibTeacher, ONNXTeacher, TorchTeacher, load_teacher
from kd_tasks.shared.cache import TeacherCache


def test_onnx_teacher_matches_the_torch_model(tmp_path):
    model = embedding_net(16)
    teacher = load_teacher(str(export_onnx(model, tmp_path / "t.onnx")))
    assert isinstance(teacher, ONNXTeacher) and teacher.embedding_dim == 16
    x = torch.randn(5, 3, 24, 24)
    np.testing.assert_allclose(teacher(x).numpy(), model(x).detach().numpy(), atol=1e-5)
    assert teacher(x).dtype == torch.float32 and teacher.fingerprint() == load_teacher(str(tmp_path / "t.onnx")).fingerprint()


def test_onnx_teacher_resizes_to_a_fixed_input(tmp_path):
    model = embedding_net(8)
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 24, 24),), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})
    teacher = ONNXTeacher(path)
    assert teacher.input_size == (24, 24)
    x = torch.randn(3, 3, 32, 32)
    expected = model(F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)).detach()
    np.testing.assert_allclose(teacher(x).numpy(), expected.numpy(), atol=1e-5)


def test_torchscript_teacher_file(tmp_path):
    model = embedding_net(8, seed=1)
    torch.jit.script(model).save(str(tmp_path / "t.pt"))
    teacher = load_teacher(str(tmp_path / "t.pt"))
    assert isinstance(teacher, TorchTeacher)
    x = torch.randn(2, 3, 24, 24)
    torch.testing.assert_close(teacher(x), model(x).detach())
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(Exception, match="TorchScript"):
        load_teacher(str(tmp_path / "bad.pt"))


def test_onnx_teacher_outputs_are_cached(tmp_path):
    model = embedding_net(16)
    teacher = ONNXTeacher(export_onnx(model, tmp_path / "t.onnx"))
    data = [(torch.randn(3, 24, 24), i % 2) for i in range(5)]
    cache = TeacherCache.load_or_build(teacher, data, tmp_path / "c", teacher_id=teacher.fingerprint(),
                                       preprocessing="test", batch_size=2)
    assert cache.status == "built"
    expected = model(torch.stack([x for x, _ in data])).detach()
    torch.testing.assert_close(cache.lookup(torch.arange(5))["output"], expected, atol=1e-5, rtol=1e-5)
    again = TeacherCache.load_or_build(teacher, data, tmp_path / "c", teacher_id=teacher.fingerprint(),
                                       preprocessing="test")
    assert again.status == "hit"


def test_missing_files_and_missing_dlib_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_teacher(str(tmp_path / "nope.onnx"))
    with pytest.raises(FileNotFoundError, match="dlib face-recognition model"):
        load_teacher(f"dlib:{tmp_path / 'nope.dat'}")
    (tmp_path / "model.dat").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "dlib", None)  # as if dlib were not installed
    with pytest.raises(ImportError, match="pip install dlib"):
        DlibTeacher(tmp_path / "model.dat")
    (tmp_path / "t.h5").write_bytes(b"x")
    with pytest.raises(Exception, match="unknown format"):
        load_teacher(str(tmp_path / "t.h5"))
