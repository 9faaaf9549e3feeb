"""``kd-tasks face --unlabelled-data``: few labelled identity images plus face images without identities
(tiny generated faces, a few steps each)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from face_helpers import embedding_net, export_onnx, make_identity_folder
from kd_tasks.face.data import UNLABELLED, IdentityFolder, ImageFolder, LabelledWithUnlabelled
from kd_tasks.face.train import labelled_only, main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """labelled/ (4 identities x 2 images), pool/ (their other 4 images each, no identity, nested),
    val/ (2 identities never seen in training)."""
    root = tmp_path_factory.mktemp("face_semi")
    make_identity_folder(root / "all", identities=6, images=6, size=24)
    for k in range(6):
        files = sorted((root / "all" / f"id{k}").iterdir())
        if k >= 4:
            shutil.copytree(root / "all" / f"id{k}", root / "val" / f"id{k}")
            continue
        (root / "labelled" / f"id{k}").mkdir(parents=True)
        (root / "pool" / f"batch{k % 2}").mkdir(parents=True, exist_ok=True)
        for n, f in enumerate(files):
            labelled = root / "labelled" / f"id{k}" / f.name
            shutil.copy(f, labelled if n < 2 else root / "pool" / f"batch{k % 2}" / f"{k}_{f.name}")
    export_onnx(embedding_net(16), root / "teacher.onnx")
    return root


def args(root, out, *extra):
    return ["--teacher", str(root / "teacher.onnx"), "--data", str(root / "labelled"), "--val-data", str(root / "val"),
            "--unlabelled-data", str(root / "pool"), "--output-dir", str(out), "--student", "mobilefacenet_s",
            "--image-size", "16", "--batch-size", "8", "--embedding-dim", "16", "--max-steps", "4", "--log-every", "1",
            "--quiet", "--cpu", "--optimizer", "adam", "--lr", "0.01", "--margin", "arcface", "--scale", "16", *extra]


def test_labelled_with_unlabelled_set(setup):
    both = LabelledWithUnlabelled(IdentityFolder(setup / "labelled", 16, flip=True), ImageFolder(setup / "pool", 16))
    assert len(both) == 8 + 16 and both.num_classes == 4 and both.num_labelled == 8
    assert both.labels[:8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (both.labels[8:] == UNLABELLED).all() and both[20][1] == UNLABELLED
    names = both.sample_names()
    assert names[0] == "id0/0.png" and names[8].startswith("unlabelled:batch0/")
    still = both.deterministic()
    assert not still.transform.flip and [p for p, _ in still.samples] == [p for p, _ in both.samples]
    twice = LabelledWithUnlabelled(IdentityFolder(setup / "labelled", 16), ImageFolder(setup / "pool", 16), repeat=2)
    assert len(twice) == 2 * 8 + 16 and twice.num_labelled == 16
    assert twice.labels[:16].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2 and len(twice.sample_names()) == 32


def test_labelled_only_margin_loss_skips_images_without_identity():
    torch.manual_seed(0)

    class CrossEntropy(torch.nn.Module):  # stands in for a margin loss: cross-entropy of linear logits
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, emb, target):
            return F.cross_entropy(self.linear(emb), target)

    inner = CrossEntropy()
    loss = labelled_only(inner)
    emb = torch.randn(5, 4, requires_grad=True)
    target = torch.tensor([2, UNLABELLED, 0, UNLABELLED, 1])
    torch.testing.assert_close(loss(emb, target), inner(emb[[0, 2, 4]], target[[0, 2, 4]]))
    assert list(dict(loss.named_parameters())) == ["inner.linear.weight", "inner.linear.bias"]
    none = loss(emb, torch.full((5,), UNLABELLED))
    assert none.item() == 0.0 and none.requires_grad


def test_training_uses_unlabelled_images_for_distillation_only(setup, tmp_path, capsys):
    out = tmp_path / "semi"
    assert main(args(setup, out, "--kd", "centred", "--kd-weight", "4", "--head-init", "teacher",
                     "--labelled-repeat", "2")) == 0
    report = json.loads((out / "verification.json").read_text())
    assert report["train_identities"] == 4 and report["train_images"] == 2 * 8 + 16
    assert report["unlabelled_train_images"] == 16 and report["val_identities"] == 2
    assert json.loads((out / "teacher_cache" / "train" / "meta.json").read_text())["count"] == 32
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "task" in e and "kd_centred" in e] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["task"])) for e in log if "task" in e)
    assert "16 labelled, 16 without identities" in capsys.readouterr().out


def test_unlabelled_data_errors_are_one_line(setup, tmp_path, capsys):
    assert main(args(setup, tmp_path / "a", "--kd", "ekd")) == 2
    err = capsys.readouterr().err
    assert "--unlabelled-data images carry no identity" in err and "--kd ekd" in err
    assert main(args(setup, tmp_path / "b", "--kd", "margin_rkd")) == 2
    assert "--kd margin_rkd" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "c", "--kd", "centred", "--unlabelled", "--margin", "none")) == 2
    assert "give one of the two" in capsys.readouterr().err
    missing = args(setup, tmp_path / "d", "--kd", "centred")
    missing[missing.index("--unlabelled-data") + 1] = str(tmp_path / "nowhere")
    assert main(missing) == 2
    assert "--unlabelled-data folder" in capsys.readouterr().err
    alone = args(setup, tmp_path / "e", "--kd", "none", "--labelled-repeat", "3")
    del alone[alone.index("--unlabelled-data"):alone.index("--unlabelled-data") + 2]
    assert main(alone) == 2
    assert "--labelled-repeat balances labelled images" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "f", "--kd", "centred", "--labelled-repeat", "0")) == 2
    assert "--labelled-repeat" in capsys.readouterr().err


def test_shipped_few_label_recipe_runs(setup, tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "configs" / "face" / "few_labels_unlabelled_centred.yaml"
    out = tmp_path / "recipe"
    assert main(args(setup, out, "--config", str(recipe), "--image-size", "16", "--max-steps", "2",
                     "--batch-size", "8")) == 0
    report = json.loads((out / "verification.json").read_text())
    assert report["args"]["kd"] == "centred" and report["unlabelled_train_images"] == 16
