"""The face compression report: a teacher run by onnxruntime is measured by its file and graph, a PyTorch
teacher by torch's counters, and the files are written."""

import json

import pytest
import torch

from face_helpers import embedding_net, export_onnx, make_identity_folder
from kd_tasks.face.data import IdentityFolder
from kd_tasks.face.report import face_compression_report, onnx_parameters, outside_torch_figures
from kd_tasks.face.teachers import ONNXTeacher, TorchTeacher


@pytest.fixture
def faces(tmp_path):
    return make_identity_folder(tmp_path / "faces", identities=3, images=3)


def test_onnx_teacher_measured_by_its_file_and_graph(tmp_path, faces):
    net = embedding_net()
    path = export_onnx(net, tmp_path / "t.onnx")
    teacher = ONNXTeacher(path, input_size=24)
    figures = outside_torch_figures(teacher)
    assert onnx_parameters(path) == sum(p.numel() for p in net.parameters()) == figures["params"]
    assert figures["size_bytes"] == path.stat().st_size
    student = embedding_net(seed=1)
    view = IdentityFolder(faces, 24)
    rep, paths = face_compression_report(teacher, student, view, view, 0.95, 0.9, tmp_path / "out", pairs=12,
                                         batch_size=4)
    t, s = rep.rows
    assert t["params"] == figures["params"] and t["size_bytes"] == figures["size_bytes"]
    assert s["params"] == sum(p.numel() for p in student.parameters()) and s["flops"] > 0
    assert s["speedup"] == pytest.approx(s["speedup_latency"])  # the teacher's FLOPs are unknown
    assert s["retained"] == pytest.approx(0.9 / 0.95)
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["flops"] is None and data["metric_name"] == "verification AUC"
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_torch_teacher_measured_by_torch_in_its_own_view(tmp_path, faces):
    net = embedding_net()
    teacher = TorchTeacher(net, input_size=None)
    assert outside_torch_figures(teacher) is None
    rep, _ = face_compression_report(teacher, embedding_net(seed=1), IdentityFolder(faces, 32),
                                     IdentityFolder(faces, 24), 0.95, 0.9, tmp_path / "out", pairs=12, batch_size=4)
    t, s = rep.rows
    assert t["params"] == sum(p.numel() for p in net.parameters())
    # same network, the teacher on 32x32 faces, the student on 24x24: FLOPs scale with the pixels (conv part)
    assert t["flops"] > s["flops"] and s["speedup"] == pytest.approx(t["flops"] / s["flops"])
