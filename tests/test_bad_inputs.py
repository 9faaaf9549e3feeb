"""Bad inputs to every subcommand (demo, classify, face, nlp): each ends as one line
``kd-tasks <cmd>: error: ...`` naming the offending flag, key or file, exit code 2, no traceback,
before any training starts."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kd_tasks.cli import main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "face"))
sys.path.insert(0, str(ROOT / "tests" / "nlp"))
RECIPE = ROOT / "configs" / "shared" / "offline_hinton.yaml"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Every file the cases point at: good ones (to get past them) and bad ones."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    p = {"root": root}
    p["a_file"] = root / "a_file.txt"
    p["a_file"].write_text("not a directory\n")
    # recipes
    p["recipe"] = RECIPE
    for name, text in {
        "lr_fast": "distill:\n  terms: [{name: kd, loss: {type: kd, temperature: 4}}]\ntrain: {lr: fast}\n",
        "str_temperature": "distill:\n  terms: [{name: kd, loss: {type: kd, temperature: hot}}]\n",
        "neg_weight": "distill:\n  task_weight: 0.5\n  terms: [{name: kd, loss: kd, weight: -1}]\n",
        "typo": "distil:\n  terms: [{name: kd, loss: kd}]\n",
        "malformed": "distill: [unclosed\n",
        "epochs0": "distill:\n  terms: [{name: kd, loss: kd}]\ntrain: {epochs: 0}\n",
        "lerning_rate": "distill:\n  terms: [{name: kd, loss: kd}]\ntrain: {lerning_rate: 0.1}\n",
        "schedule_str": "distill:\n  terms: [{name: kd, loss: kd, weight: {schedule: linear, start: 0, end: high, steps: 10}}]\n",
        "batch_str": "distill:\n  terms: [{name: kd, loss: kd}]\ntrain: {batch_size: '64'}\n",
        "list_top": "- distill\n",
    }.items():
        p[f"recipe_{name}"] = root / f"recipe_{name}.yaml"
        p[f"recipe_{name}"].write_text(text)
    # image folders
    def image_tree(name, classes, bad=False, empty_class=False):
        tree = root / name
        g = np.random.default_rng(0)
        for split in ("train", "val"):
            for c in range(classes):
                folder = tree / split / f"c{c}"
                folder.mkdir(parents=True)
                if empty_class and c == 1:
                    continue
                for i in range(2):
                    Image.fromarray(g.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if bad:
            (tree / "train" / "c0" / "notes.png").write_text("this is not an image")
        return tree

    p["one_class"] = image_tree("one_class", 1)
    p["bad_image"] = image_tree("bad_image", 2, bad=True)
    p["empty_class"] = image_tree("empty_class", 2, empty_class=True)
    p["no_val"] = root / "no_val"
    (p["no_val"] / "train" / "a").mkdir(parents=True)
    # teacher weights
    p["truncated_pth"] = root / "truncated.pth"
    torch.save({f"w{i}": torch.randn(64, 64) for i in range(4)}, p["truncated_pth"])
    data = p["truncated_pth"].read_bytes()
    p["truncated_pth"].write_bytes(data[: len(data) // 2])
    p["garbage_safetensors"] = root / "garbage.safetensors"
    p["garbage_safetensors"].write_bytes(b"\x00\x01garbage" * 10)
    # a used classify output directory
    p["used_classify"] = root / "used_classify"
    (p["used_classify"] / "student" / "checkpoints" / "step-00000010").mkdir(parents=True)
    (p["used_classify"] / "student" / "checkpoints" / "step-00000010" / "state.pt").write_bytes(b"x")
    # face
    from face_helpers import embedding_net, export_onnx, make_identity_folder

    p["faces"] = make_identity_folder(root / "faces", identities=5, images=2, size=16)
    p["teacher_onnx"] = export_onnx(embedding_net(8), root / "teacher.onnx", size=16)
    p["garbage_onnx"] = root / "garbage.onnx"
    p["garbage_onnx"].write_bytes(b"this is not an onnx model")
    p["empty_faces"] = root / "empty_faces"
    p["empty_faces"].mkdir()
    p["bad_faces"] = make_identity_folder(root / "bad_faces", identities=5, images=2, size=16)
    (p["bad_faces"] / "id0" / "9.png").write_text("not an image either")
    p["used_face"] = root / "used_face"
    (p["used_face"]).mkdir()
    (p["used_face"] / "log.jsonl").write_text('{"step": 1}\n')
    for name, text in {"lr_fast": "lr: fast\n", "typo": "margn: cosface\n", "epochs_list": "epochs: [3]\n",
                       "malformed": "margin: [cosface\n", "bool_flip": "flip: maybe\n"}.items():
        p[f"face_cfg_{name}"] = root / f"face_{name}.yaml"
        p[f"face_cfg_{name}"].write_text(text)
    # nlp
    from nlp_helpers import make_tokenizer, tiny_config
    from transformers import BertForSequenceClassification

    tok = make_tokenizer(root / "tok")
    torch.manual_seed(0)
    p["nlp_teacher"] = root / "nlp_teacher"
    BertForSequenceClassification(tiny_config(len(tok))).save_pretrained(p["nlp_teacher"])
    tok.save_pretrained(p["nlp_teacher"])
    p["nlp_broken"] = root / "nlp_broken"
    shutil.copytree(p["nlp_teacher"], p["nlp_broken"])
    weights = p["nlp_broken"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    p["csv"] = root / "train.csv"
    p["csv"].write_text("sentence,label\n" + "".join(f"good movie {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    p["empty_csv"] = root / "empty.csv"
    p["empty_csv"].write_text("")
    p["header_csv"] = root / "header.csv"
    p["header_csv"].write_text("sentence,label\n")
    p["one_class_csv"] = root / "one_class.csv"
    p["one_class_csv"].write_text("sentence,label\n" + "".join(f"good movie {i},pos\n" for i in range(20)))
    p["bad_ext"] = root / "train.xlsx"
    p["bad_ext"].write_text("x")
    p["used_nlp"] = root / "used_nlp"
    (p["used_nlp"] / "checkpoint-4").mkdir(parents=True)
    for name, text in {"temp_hot": "temperature: hot\n", "typo": "student-layer: 2\n", "epochs_list": "epochs: [3]\n",
                       "alpha_str": "alpha-kd: lots\n"}.items():
        p[f"nlp_cfg_{name}"] = root / f"nlp_{name}.yaml"
        p[f"nlp_cfg_{name}"].write_text(text)
    return p


def classify(p, *extra, recipe="recipe", out="out_classify"):
    base = ["classify", "--recipe", str(p[recipe]), "--output-dir", str(p["root"] / out), "--quiet"]
    if not any(a in ("--data", "--dataset") for a in extra):
        base += ["--dataset", "digits"]
    if "--teacher" not in extra:
        base += ["--teacher", "cnn:4", "--train-teacher-epochs", "1"]
    if "--student" not in extra:
        base += ["--student", "cnn:2"]
    return base + [str(a) for a in extra]


def face(p, *extra, out="out_face", teacher="teacher_onnx", data="faces"):
    argv = ["face", "--teacher", str(p[teacher]), "--data", str(p[data]), "--output-dir", str(p["root"] / out),
            "--student", "mobilefacenet_s", "--image-size", "16", "--batch-size", "4", "--val-identities", "2",
            "--quiet", "--cpu", "--max-steps", "1"]
    return argv + [str(a) for a in extra]


def nlp(p, *extra, out="out_nlp", teacher="nlp_teacher", train="csv"):
    argv = ["nlp", "--teacher", str(p[teacher]), "--train-file", str(p[train]), "--output-dir", str(p["root"] / out),
            "--cpu", "--student-layers", "1", "--max-steps", "1", "--no-report"]
    return argv + [str(a) for a in extra]


def P(name):
    """A path of the fixture, resolved when the case runs."""
    return lambda p: str(p[name])


# (id, argv builder, what the message must name: a string, or a function of the paths)
CASES = [
    # ------------------------------------------------------------------ demo
    ("demo-seeds-0", lambda p: ["demo", "--seeds", "0"], "--seeds"),
    ("demo-seeds-neg", lambda p: ["demo", "--seeds", "-2"], "--seeds"),
    ("demo-seeds-word", lambda p: ["demo", "--seeds", "three"], "--seeds"),
    ("demo-epochs-0", lambda p: ["demo", "--epochs", "0"], "--epochs"),
    ("demo-student-width-0", lambda p: ["demo", "--student-width", "0"], "--student-width"),
    ("demo-teacher-width-neg", lambda p: ["demo", "--teacher-width", "-3"], "--teacher-width"),
    ("demo-unknown-flag", lambda p: ["demo", "--sedes", "3"], "--sedes"),
    # ------------------------------------------------------------------ classify
    ("classify-epochs-0", lambda p: classify(p, "--epochs", "0"), "--epochs"),
    ("classify-epochs-neg", lambda p: classify(p, "--epochs", "-1"), "--epochs"),
    ("classify-epochs-nan", lambda p: classify(p, "--epochs", "nan"), "--epochs"),
    ("classify-batch-0", lambda p: classify(p, "--batch-size", "0"), "--batch-size"),
    ("classify-lr-0", lambda p: classify(p, "--lr", "0"), "--lr"),
    ("classify-lr-word", lambda p: classify(p, "--lr", "fast"), "--lr"),
    ("classify-lr-inf", lambda p: classify(p, "--lr", "inf"), "--lr"),
    ("classify-seed-neg", lambda p: classify(p, "--seed", "-1"), "--seed"),
    ("classify-image-size-0", lambda p: classify(p, "--image-size", "0"), "--image-size"),
    ("classify-image-size-3", lambda p: classify(p, "--image-size", "3"), "--image-size"),
    ("classify-num-classes-1", lambda p: classify(p, "--num-classes", "1"), "--num-classes"),
    ("classify-num-classes-wrong", lambda p: classify(p, "--num-classes", "5"), "--num-classes"),
    ("classify-teacher-epochs-neg", lambda p: classify(p, "--train-teacher-epochs", "-2", "--teacher", "cnn:4"),
     "--train-teacher-epochs"),
    ("classify-cnn-width-0", lambda p: classify(p, "--student", "cnn:0"), "cnn:0"),
    ("classify-cnn-width-word", lambda p: classify(p, "--student", "cnn:wide"), "cnn:wide"),
    ("classify-unknown-model", lambda p: classify(p, "--student", "resnet1800"), "resnet1800"),
    ("classify-recipe-missing", lambda p: classify(p, recipe="root") + ["--recipe", str(p["root"] / "nope.yaml")],
     "nope.yaml"),
    ("classify-recipe-lr-fast", lambda p: classify(p, recipe="recipe_lr_fast"), "train.lr"),
    ("classify-recipe-str-temperature", lambda p: classify(p, recipe="recipe_str_temperature"), "temperature"),
    ("classify-recipe-neg-weight", lambda p: classify(p, recipe="recipe_neg_weight"), "weight"),
    ("classify-recipe-typo", lambda p: classify(p, recipe="recipe_typo"), "distil"),
    ("classify-recipe-malformed", lambda p: classify(p, recipe="recipe_malformed"), "recipe_malformed.yaml"),
    ("classify-recipe-epochs-0", lambda p: classify(p, recipe="recipe_epochs0"), "train.epochs"),
    ("classify-recipe-unknown-train-key", lambda p: classify(p, recipe="recipe_lerning_rate"), "lerning_rate"),
    ("classify-recipe-schedule-str", lambda p: classify(p, recipe="recipe_schedule_str"), "weight.end"),
    ("classify-recipe-batch-str", lambda p: classify(p, recipe="recipe_batch_str"), "train.batch_size"),
    ("classify-recipe-list", lambda p: classify(p, recipe="recipe_list_top"), "recipe_list_top.yaml"),
    ("classify-data-missing", lambda p: classify(p, "--data", p["root"] / "nowhere"), "nowhere"),
    ("classify-data-no-val", lambda p: classify(p, "--data", p["no_val"]), "val/"),
    ("classify-data-one-class", lambda p: classify(p, "--data", p["one_class"]), "at least 2"),
    ("classify-data-empty-class", lambda p: classify(p, "--data", p["empty_class"]), "c1"),
    ("classify-data-not-an-image", lambda p: classify(p, "--data", p["bad_image"]), "notes.png"),
    ("classify-weights-truncated", lambda p: classify(p, "--teacher", "cnn:4", "--teacher-weights", p["truncated_pth"]),
     "truncated.pth"),
    ("classify-weights-garbage", lambda p: classify(p, "--teacher", "cnn:4", "--teacher-weights",
                                                    p["garbage_safetensors"]), "garbage.safetensors"),
    ("classify-weights-count", lambda p: classify(p, "--teacher", "cnn:4", "--teacher-weights", p["truncated_pth"],
                                                  "--teacher-weights", p["truncated_pth"]), "--teacher-weights"),
    ("classify-output-is-file", lambda p: classify(p, "--output-dir", p["a_file"]), "a_file.txt"),
    ("classify-output-used", lambda p: classify(p, "--output-dir", p["used_classify"]), "--overwrite"),
    ("classify-resume-and-overwrite", lambda p: classify(p, "--resume", "--overwrite"), "--overwrite"),
    ("classify-unknown-flag", lambda p: classify(p, "--epoch", "3"), "--epoch"),
    ("classify-assistant-not-takd", lambda p: classify(p, "--assistant", "cnn:3"), "--assistant"),
    # ------------------------------------------------------------------ face
    ("face-epochs-0", lambda p: face(p, "--epochs", "0"), "--epochs"),
    ("face-max-steps-0", lambda p: face(p, "--max-steps", "0"), "--max-steps"),
    ("face-batch-1", lambda p: face(p, "--batch-size", "1"), "--batch-size"),
    ("face-lr-neg", lambda p: face(p, "--lr", "-0.1"), "--lr"),
    ("face-lr-word", lambda p: face(p, "--lr", "quick"), "--lr"),
    ("face-image-size-4", lambda p: face(p, "--image-size", "4"), "--image-size"),
    ("face-val-identities-1", lambda p: face(p, "--val-identities", "1"), "--val-identities"),
    ("face-max-pairs-0", lambda p: face(p, "--max-pairs", "0"), "--max-pairs"),
    ("face-scale-0", lambda p: face(p, "--scale", "0"), "--scale"),
    ("face-kd-weight-neg", lambda p: face(p, "--kd-weight", "-1"), "--kd-weight"),
    ("face-embedding-dim-0", lambda p: face(p, "--embedding-dim", "0"), "--embedding-dim"),
    ("face-seed-neg", lambda p: face(p, "--seed", "-5"), "--seed"),
    ("face-nothing-to-train", lambda p: face(p, "--margin", "none", "--kd", "none"), "--margin"),
    ("face-margin-choice", lambda p: face(p, "--margin", "arcfase"), "--margin"),
    ("face-teacher-missing", lambda p: face(p, teacher="root") + ["--teacher", str(p["root"] / "gone.onnx")],
     "gone.onnx"),
    ("face-teacher-not-onnx", lambda p: face(p, teacher="garbage_onnx"), "garbage.onnx"),
    ("face-data-missing", lambda p: face(p, data="root") + ["--data", str(p["root"] / "no_faces")], "no_faces"),
    ("face-data-empty", lambda p: face(p, data="empty_faces"), "empty_faces"),
    ("face-data-not-an-image", lambda p: face(p, data="bad_faces"), "9.png"),
    ("face-output-is-file", lambda p: face(p, "--output-dir", p["a_file"]), "a_file.txt"),
    ("face-output-used", lambda p: face(p, out="used_face"), "--resume"),
    ("face-resume-and-overwrite", lambda p: face(p, "--resume", "--overwrite"), "--overwrite"),
    ("face-config-lr-fast", lambda p: face(p, "--config", p["face_cfg_lr_fast"]), "--lr"),
    ("face-config-typo", lambda p: face(p, "--config", p["face_cfg_typo"]), "margn"),
    ("face-config-epochs-list", lambda p: face(p, "--config", p["face_cfg_epochs_list"]), "--epochs"),
    ("face-config-malformed", lambda p: face(p, "--config", p["face_cfg_malformed"]), "face_malformed.yaml"),
    ("face-config-flip-word", lambda p: face(p, "--config", p["face_cfg_bool_flip"]), "--flip"),
    ("face-config-missing", lambda p: face(p, "--config", p["root"] / "no_config.yaml"), "no_config.yaml"),
    # ------------------------------------------------------------------ nlp
    ("nlp-temperature-0", lambda p: nlp(p, "--temperature", "0"), "--temperature"),
    ("nlp-temperature-word", lambda p: nlp(p, "--temperature", "hot"), "--temperature"),
    ("nlp-epochs-0", lambda p: nlp(p, "--epochs", "0"), "--epochs"),
    ("nlp-max-steps-0", lambda p: nlp(p, "--max-steps", "0"), "--max-steps"),
    ("nlp-batch-0", lambda p: nlp(p, "--batch-size", "0"), "--batch-size"),
    ("nlp-lr-neg", lambda p: nlp(p, "--learning-rate", "-0.0001"), "--learning-rate"),
    ("nlp-max-length-2", lambda p: nlp(p, "--max-length", "2"), "--max-length"),
    ("nlp-alpha-neg", lambda p: nlp(p, "--alpha-kd", "-1"), "--alpha-kd"),
    ("nlp-alphas-zero", lambda p: nlp(p, "--alpha-kd", "0", "--alpha-task", "0"), "--alpha"),
    ("nlp-seed-neg", lambda p: nlp(p, "--seed", "-3"), "--seed"),
    ("nlp-warmup-neg", lambda p: nlp(p, "--warmup", "-1"), "--warmup"),
    ("nlp-grad-accum-0", lambda p: nlp(p, "--gradient-accumulation-steps", "0"), "--gradient-accumulation-steps"),
    ("nlp-student-layers-0", lambda p: nlp(p, "--student-layers", "0"), "--student-layers"),
    ("nlp-fp16-bf16", lambda p: nlp(p, "--fp16", "--bf16"), "--bf16"),
    ("nlp-teacher-inputs-choice", lambda p: nlp(p, "--teacher-inputs", "both"), "--teacher-inputs"),
    ("nlp-config-temperature-word", lambda p: nlp(p, "--config", p["nlp_cfg_temp_hot"]), "--temperature"),
    ("nlp-config-typo", lambda p: nlp(p, "--config", p["nlp_cfg_typo"]), "student-layer"),
    ("nlp-config-epochs-list", lambda p: nlp(p, "--config", p["nlp_cfg_epochs_list"]), "--epochs"),
    ("nlp-config-alpha-word", lambda p: nlp(p, "--config", p["nlp_cfg_alpha_str"]), "--alpha-kd"),
    ("nlp-train-file-missing", lambda p: nlp(p, train="root") + ["--train-file", str(p["root"] / "gone.csv")],
     "gone.csv"),
    ("nlp-train-file-empty", lambda p: nlp(p, train="empty_csv"), "empty.csv"),
    ("nlp-train-file-header-only", lambda p: nlp(p, train="header_csv"), "header.csv"),
    ("nlp-train-file-one-class", lambda p: nlp(p, train="one_class_csv"), "'label'"),
    ("nlp-train-file-extension", lambda p: nlp(p, train="bad_ext"), "train.xlsx"),
    ("nlp-teacher-missing", lambda p: nlp(p, teacher="root") + ["--teacher", str(p["root"] / "no_teacher")],
     "no_teacher"),
    ("nlp-teacher-truncated", lambda p: nlp(p, teacher="nlp_broken"), "nlp_broken"),
    ("nlp-resume-missing", lambda p: nlp(p, "--resume", p["root"] / "no_checkpoint"), "--resume"),
    ("nlp-output-is-file", lambda p: nlp(p, "--output-dir", p["a_file"]), "a_file.txt"),
    ("nlp-output-used", lambda p: nlp(p, out="used_nlp"), "--overwrite"),
    ("nlp-resume-and-overwrite", lambda p: nlp(p, "--resume", "--overwrite"), "--overwrite"),
]


def call(argv) -> int:
    """The exit code of ``kd-tasks ARGV`` run in this process (argparse's usage errors exit through SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_the_table_is_large_and_covers_every_subcommand():
    assert len(CASES) >= 60
    assert {c[1].__code__.co_consts for c in CASES}  # lambdas, built per case
    cmds = {case[0].split("-")[0] for case in CASES}
    assert cmds == {"demo", "classify", "face", "nlp"}
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("name, build, named", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(paths, capsys, monkeypatch, name, build, named):
    from kd_tasks.shared.training import Trainer

    monkeypatch.delenv("KD_TASKS_DEBUG", raising=False)
    monkeypatch.setattr(Trainer, "_run_epoch", lambda self: pytest.fail("training started on a bad input"))
    argv = build(paths)
    cmd = argv[0]
    rc = call(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"kd-tasks {cmd}: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert named in errors[0], errors[0]


def test_debug_shows_the_traceback(paths, capsys, monkeypatch):
    monkeypatch.delenv("KD_TASKS_DEBUG", raising=False)
    assert call(["--debug", "demo", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "kd-tasks demo: error: --seeds" in err
    monkeypatch.setenv("KD_TASKS_DEBUG", "1")
    assert call(classify(paths, "--epochs", "0")) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "--epochs" in err.splitlines()[-1]


def test_a_bug_shows_the_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    import kd_tasks.demo as demo

    def broken(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(demo, "run", broken)
    assert call(["demo", "--seeds", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert "internal error" in err and "bug in kd-tasks" in err


def test_an_unwritable_output_directory_is_named(paths, capsys, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert call(classify(paths, "--output-dir", ro / "out")) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
