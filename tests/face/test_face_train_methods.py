"""``kd-tasks face`` with the margin-aware methods, teacher-space conditioning, the teacher check, unlabelled
training, aspect-kept views, ROC PNG and exports (tiny generated faces, a few steps each)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from face_helpers import embedding_net, export_onnx, make_identity_folder
from kd_tasks.face.train import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("face_methods")
    make_identity_folder(root / "data", identities=6, images=6, size=24)
    export_onnx(embedding_net(16), root / "teacher.onnx")

    class Constant(torch.nn.Module):  # the same embedding for every face: verifies at chance
        def forward(self, x):
            return torch.ones(x.shape[0], 16) + 0.0 * x.mean()

    export_onnx(Constant(), root / "constant.onnx")
    flat = root / "unlabelled"
    flat.mkdir()
    for k, f in enumerate(sorted(f for f in (root / "data").rglob("*") if f.suffix in (".png", ".pgm"))):
        (flat / ("sub" if k % 2 else "")).mkdir(exist_ok=True)
        Image.open(f).save(flat / ("sub" if k % 2 else "") / f"img{k}.png")
    return root


def args(root, out, *extra):
    return ["--teacher", str(root / "teacher.onnx"), "--data", str(root / "data"), "--output-dir", str(out),
            "--student", "mobilefacenet_s", "--image-size", "16", "--batch-size", "8", "--val-identities", "2",
            "--embedding-dim", "16", "--max-steps", "3", "--quiet", "--cpu", "--optimizer", "adam", "--lr", "0.01",
            *extra]


@pytest.mark.parametrize("extra", [
    ("--kd", "adadistill", "--teacher-space", "centre"),
    ("--kd", "margin_distillation"),
    ("--kd", "ekd"),
    ("--kd", "centred", "--head-init", "teacher", "--freeze-head"),
    ("--kd", "whitened", "--margin", "cosface"),
], ids=["adadistill", "margin_distillation", "ekd", "centred+frozen-head", "whitened"])
def test_methods_train_and_write_roc_and_exports(setup, tmp_path, extra):
    out = tmp_path / "run"
    assert main(args(setup, out, *extra)) == 0
    report = json.loads((out / "verification.json").read_text())
    assert report["steps"] == 3 and 0 <= report["student"]["auc"] <= 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(e[f"kd_{extra[1]}"]) for e in log if f"kd_{extra[1]}" in e)
    if extra[1] in ("adadistill", "margin_distillation"):
        assert not any("task" in e for e in log)  # the method is the margin head
    with Image.open(report["roc_png"]) as img:
        assert img.format == "PNG"
    for name in ("model.onnx", "model.torchscript.pt", "input.json", "model.safetensors"):
        assert (out / "export" / name).is_file()


def test_frozen_head_stays_at_the_teacher_centres(setup, tmp_path, monkeypatch):
    import kd_tasks.face.margins as margins

    seen = {}
    original = margins.init_head_from_teacher

    def spy(head, centres, freeze=False):
        seen["head"], seen["centres"], seen["freeze"] = head, centres.clone(), freeze
        return original(head, centres, freeze)

    monkeypatch.setattr(margins, "init_head_from_teacher", spy)
    assert main(args(setup, tmp_path / "frozen", "--kd", "none", "--head-init", "teacher", "--freeze-head")) == 0
    assert seen["freeze"] and not seen["head"].weight.requires_grad
    torch.testing.assert_close(seen["head"].weight.detach(), seen["centres"])  # unchanged by 3 steps of training
    # centred teacher space: the centres of the 4 training identities are not all in one narrow cone
    cos = seen["centres"] @ seen["centres"].t()
    assert cos[~torch.eye(4, dtype=torch.bool)].mean() < 0.5
    assert main(args(setup, tmp_path / "trained", "--kd", "none", "--head-init", "teacher")) == 0
    assert not torch.allclose(seen["head"].weight.detach(), seen["centres"])  # not frozen: it trains


def test_teacher_near_chance_is_refused(setup, tmp_path, capsys):
    argv = args(setup, tmp_path / "c", "--kd", "centred")
    argv[1] = str(setup / "constant.onnx")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "AUC 0.500" in err and "chance" in err and "--min-teacher-auc" in err
    assert main(argv + ["--min-teacher-auc", "0", "--overwrite"]) == 0


def test_unlabelled_training_from_teacher_embeddings_alone(setup, tmp_path, capsys):
    out = tmp_path / "u"
    base = args(setup, out, "--margin", "none", "--kd", "centred", "--unlabelled", "--val-data", str(setup / "data"))
    base[3] = str(setup / "unlabelled")
    assert main(base) == 0
    report = json.loads((out / "verification.json").read_text())
    assert report["train_images"] == 36 and report["val_identities"] == 6
    assert main(base + ["--margin", "arcface", "--overwrite"]) == 2
    assert "--unlabelled trains from the teacher alone" in capsys.readouterr().err


def test_new_option_errors_are_one_line(setup, tmp_path, capsys):
    assert main(args(setup, tmp_path / "a", "--freeze-head")) == 2
    assert "--head-init teacher" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "b", "--exclude", "id0/nothing.png")) == 2
    assert "match no file" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "c", "--teacher-space", "sphere")) == 2
    assert "--teacher-space" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "d", "--teacher-scaling", "zscore")) == 2
    assert "--teacher-scaling" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "e", "--kd", "adadistill", "--embedding-dim", "8")) == 2
    assert "--embedding-dim must be the teacher's width 16" in capsys.readouterr().err


def test_exclude_and_aspect_kept_view_reach_the_run(setup, tmp_path):
    out = tmp_path / "ex"
    assert main(args(setup, out, "--kd", "cosine", "--exclude", "id*/0.png")) == 0
    report = json.loads((out / "verification.json").read_text())
    # 6 identities x 6 images, image 0 of each left out
    assert report["train_images"] + report["val_images"] == 30
    assert Path(out / "roc.png").is_file()
