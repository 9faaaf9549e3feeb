"""Students: shapes, sizes, save / reload."""

import pytest
import torch

from kd_tasks.face.models import STUDENTS, build_student, load_student, save_student


@pytest.mark.parametrize("name", ["mobilefacenet", "mobilefacenet_s", "resnet_face"])
def test_students_give_embeddings(name):
    torch.manual_seed(0)
    model = build_student(name, embedding_dim=32, input_size=32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_mobilefacenet_has_the_paper_size():
    n = sum(p.numel() for p in build_student("mobilefacenet", embedding_dim=128, input_size=112).parameters())
    assert 0.95e6 < n < 1.05e6  # the paper reports 0.99 M parameters


def test_save_and_reload(tmp_path):
    torch.manual_seed(0)
    model = build_student("mobilefacenet_s", embedding_dim=16, input_size=16)
    model(torch.randn(4, 3, 16, 16))  # updates BatchNorm statistics
    model.eval()
    save_student(model, tmp_path / "s")
    again = load_student(tmp_path / "s")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(again(x), model(x))
    assert "mobilefacenet" in STUDENTS and "resnet_face" in STUDENTS.names()
    with pytest.raises(FileNotFoundError, match="student.json"):
        load_student(tmp_path)
